"""Constructor options of the guided-latent models as frozen, validated dataclasses.

Both models take the options of :class:`ModelConfig`; ``AuxVAEConfig`` and ``DLCFMConfig``
(in their models' modules) add their own and may change a default. A model is built from
keyword options (``AuxVAE(scaler, 32, tau=0.02)``) or a config object
(``AuxVAE(scaler, 32, config=AuxVAEConfig(tau=0.02))``); either way the options are checked
once, here, and a new option is written once, as a field of the class that takes it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, TypeVar

from pyro_dlatent.nn import ACTIVATIONS, NORMS
from pyro_dlatent.penalties import DECORRELATION_FORMS
from pyro_dlatent.validation import check_float, check_int

__all__ = ["ModelConfig", "check_choice"]

_C = TypeVar("_C", bound="ModelConfig")


def check_choice(value: Any, name: str, choices: tuple[str, ...] | Mapping[str, Any]) -> str:
    """``value`` if it is one of ``choices``, else a ValueError naming ``name``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"expected {name} in {sorted(choices)}, got {value!r}")
    return value


def check_bool(value: Any, name: str) -> bool:
    """``value`` if it is a bool, else a ValueError naming ``name``."""
    if not isinstance(value, bool):
        raise ValueError(f"expected {name} True or False, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Options every guided-latent model takes.

    Parameters
    ----------
    residual_dim : int
        Dimension of the residual block ``z_rec`` (``>= 0``).
    tau : float
        Prior sd of the guided block around the standardized auxiliaries: the knob between
        *interpretable* (small) and *flexible* (large).
    learn_tau : bool
        Learn ``tau`` (initialized at ``tau``) instead of fixing it.
    align_weight, decor_weight : float
        Per-pixel weights of the alignment and decorrelation penalties (``>= 0``; 0 removes the
        factor site).
    decor_form : {"abs", "square"}
        Form of the decorrelation penalty (:func:`pyro_dlatent.penalties.decorrelation_penalty`):
        the paper's mean absolute correlation, or the mean summed squared correlation, which
        targets the largest leaks.
    degree : int
        Degree ``K`` of the polynomial lifts in the penalties.
    width, hidden, depth : int
        Network size (:class:`pyro_dlatent.nn.ConvEncoder`; the AuxVAE decoder mirrors it).
    encoder_depth : int, optional
        Convolutions per resolution level of the encoder alone (default: ``depth``). The
        encoder is the estimator of the auxiliaries, so it may need more capacity than the
        decoder.
    activation : {"silu", "gelu"}
    norm : {"group", "none"}
    image_loc, image_scale : float
        Image standardization, ``x_std = (x - image_loc) / image_scale``.
    seed : int, optional
        Seed of the network initialization (the caller's global RNG is left untouched); without
        it the global torch RNG is used.
    """

    residual_dim: int = 4
    tau: float = 0.1
    learn_tau: bool = False
    align_weight: float = 0.01
    decor_weight: float = 1.0
    decor_form: str = "abs"
    degree: int = 2
    width: int = 32
    hidden: int = 256
    depth: int = 1
    encoder_depth: int | None = None
    activation: str = "silu"
    norm: str = "group"
    image_loc: float = 0.0
    image_scale: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        self._set("residual_dim", check_int(self.residual_dim, "residual_dim", 0))
        self._set("tau", check_float(self.tau, "tau", minimum=0.0, strict=True))
        self._set("learn_tau", bool(self.learn_tau))
        for name in ("align_weight", "decor_weight"):
            self._set(name, check_float(getattr(self, name), name, minimum=0.0, strict=False))
        check_choice(self.decor_form, "decor_form", DECORRELATION_FORMS)
        self._set("degree", check_int(self.degree, "degree", 1))
        for name in ("width", "hidden", "depth"):
            self._set(name, check_int(getattr(self, name), name, 1))
        if self.encoder_depth is not None:
            self._set("encoder_depth", check_int(self.encoder_depth, "encoder_depth", 1))
        check_choice(self.activation, "activation", ACTIVATIONS)
        check_choice(self.norm, "norm", NORMS)
        self._set(
            "image_loc", check_float(self.image_loc, "image_loc", minimum=-math.inf, strict=True)
        )
        self._set(
            "image_scale", check_float(self.image_scale, "image_scale", minimum=0.0, strict=True)
        )
        if self.seed is not None:
            self._set("seed", check_int(self.seed, "seed", 0))

    def _set(self, name: str, value: Any) -> None:
        """Store a checked (normalized) value on the frozen instance."""
        object.__setattr__(self, name, value)

    @classmethod
    def build(cls: type[_C], config: _C | None = None, /, **options: Any) -> _C:
        """``config`` (default: the defaults) with ``options`` replaced; unknown names refused."""
        names = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise TypeError(
                f"unexpected keyword argument(s) {unknown}; the options of {cls.__name__} are "
                f"{names}"
            )
        if config is None:
            return cls(**options)
        if not isinstance(config, cls):
            raise TypeError(f"config must be a {cls.__name__}, got {type(config).__name__}")
        return dataclasses.replace(config, **options)

    def to_dict(self) -> dict[str, Any]:
        """The options as a JSON-able dict (what a checkpoint records)."""
        return dataclasses.asdict(self)
