"""Checkpoints of the guided-latent models: what is saved, how it loads, and format migrations.

A checkpoint (:mod:`pyro_dlatent.checkpoint`) holds a model's config, scaler, weights and
buffers, optimizer state, weight average and history. Loading rebuilds the model from its
config on the meta device first (so a forged config allocates nothing), checks the weights'
shapes and finiteness, then loads strictly. Files of an older format go through
:func:`upgrade_state` (state migrations keyed by the version they upgrade from); format-1 files
lack buffers added since, which :func:`migrate_v1` resets after loading.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pyro.params.param_store import param_with_module_name

from pyro_dlatent.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from pyro_dlatent.latent import AuxScaler
from pyro_dlatent.models.generation import GAUSSIAN, LEGACY_NAMES, NEIGHBOURS, SPLINE
from pyro_dlatent.optim import WeightAverage

if TYPE_CHECKING:
    from pyro_dlatent.models.base import GuidedLatentModel

__all__ = ["MODEL_CLASSES", "load_model", "load_state", "save_model", "upgrade_state"]

MODEL_CLASSES: dict[str, type[GuidedLatentModel]] = {}
"""Model classes by name, filled as subclasses are defined: what a checkpoint's ``kind`` names."""

_GENERATION = "generation"
"""Attribute (and state-dict prefix) of the model's generation map."""
_CALIBRATION = "aux_calibration"
"""Attribute (and state-dict prefix) of the :class:`~pyro_dlatent.calibration.AuxCalibration`."""
_RESIDUAL = "residual_field"
"""Attribute (and state-dict prefix) of the :class:`~pyro_dlatent.residual.ResidualField`."""


def _json_float(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _v2_to_v3(state: dict[str, Any]) -> dict[str, Any]:
    """Format 2 to 3: the generation map's buffers moved from the model into its own module."""

    def renamed(buffers: Mapping[str, Any], prefix: str) -> dict[str, Any]:
        return {
            prefix + LEGACY_NAMES.get(k, k) if k in LEGACY_NAMES else k: v
            for k, v in buffers.items()
        }

    state = dict(state)
    if isinstance(state.get("model"), Mapping):
        state["model"] = renamed(state["model"], f"{_GENERATION}.")
    average = state.get("average")
    if isinstance(average, Mapping) and isinstance(average.get("generation"), Mapping):
        state["average"] = {**average, "generation": renamed(average["generation"], "")}
    return state


_MIGRATIONS = {2: _v2_to_v3}
"""Migrations of a checkpoint's state, keyed by the format version they upgrade from. Format 1
to 2 added buffers, which a format-1 file lacks; the model resets those after loading
(``migrate_v1``)."""


def upgrade_state(state: dict[str, Any], version: int) -> dict[str, Any]:
    """A checkpoint's ``state`` of format ``version`` in the current format's layout."""
    for step in range(version, FORMAT_VERSION):
        migrate = _MIGRATIONS.get(step)
        if migrate is not None:
            state = migrate(state)
    return state


def check_weights(skeleton: torch.nn.Module, state: Mapping[str, Any], what: str) -> None:
    """Refuse weights whose shapes differ from the config's model, or any non-finite tensor."""
    weights = state.get("model")
    if not isinstance(weights, dict):
        raise ValueError(f"{what} holds no model weights")
    expected = {name: tuple(p.shape) for name, p in skeleton.named_parameters()}
    for name, shape in expected.items():
        value = weights.get(name)
        if isinstance(value, torch.Tensor) and tuple(value.shape) != shape:
            raise ValueError(
                f"{what}: weight {name!r} has shape {tuple(value.shape)} but its config makes "
                f"{shape}; the file is inconsistent"
            )
    saved = dict(weights)
    average = state.get("average")
    if isinstance(average, dict) and isinstance(average.get("weights"), dict):
        saved.update({f"average.{k}": v for k, v in average["weights"].items()})
    bad = []
    for name, value in saved.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            if not bool(value.isfinite().all()):
                bad.append(name)
    if bad:
        raise ValueError(f"{what} holds non-finite weights in {bad[:4]}; it cannot be used")


def load_state(
    model: GuidedLatentModel, state: dict[str, Any], what: str, version: int = FORMAT_VERSION
) -> None:
    """Load a checkpoint's weights and optimizer state; older formats are migrated."""
    state = upgrade_state(state, version)
    weights = state.get("model")
    if not isinstance(weights, dict):
        raise ValueError(f"{what} holds no model weights")
    optional = set()
    if version < 2:  # written before some buffers existed: migrate_v1 resets those
        optional = {f"{_GENERATION}.{n}" for n, _ in model.generation.named_buffers()}
        optional |= {f"{_CALIBRATION}.{n}" for n, _ in model.aux_calibration.named_buffers()}
        optional |= {f"{_RESIDUAL}.{n}" for n, _ in model.residual_field.named_buffers()}
        parts = model._collapsed_parts
        optional |= {k for k in model.state_dict() if k.split(".", 1)[0] in parts}
    model.generation.size_tables(weights, what, prefix=f"{_GENERATION}.")
    try:
        result = model.load_state_dict(weights, strict=False)
    except RuntimeError as err:
        raise ValueError(f"{what} does not match {type(model).__name__}: {err}") from err
    missing = sorted(set(result.missing_keys) - optional)
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{what} does not match {type(model).__name__}: missing keys {missing}, "
            f"unexpected keys {sorted(result.unexpected_keys)}"
        )
    if version < 2:
        migrate_v1(model, set(result.missing_keys))
    model.generation.check(what)
    optimizer = state.get("optimizer") or {}
    if model._optim is not None and optimizer:
        names = store_names(model)
        unknown = sorted(set(optimizer) - set(names))
        if unknown:
            raise ValueError(f"{what} has optimizer state for unknown parameters {unknown}")
        model._optim.set_state({names[n]: value for n, value in optimizer.items()})


def migrate_v1(model: GuidedLatentModel, missing: set[str]) -> None:
    """Format 1 to 2: reset what a file from before each buffer group existed lacks."""
    generation = {key.split(".", 1)[1] for key in missing if key.startswith(f"{_GENERATION}.")}
    if generation & set(GAUSSIAN):  # before generation maps existed
        model.reset_generation()
    elif generation & set(SPLINE):  # a linear map, before splines
        model.generation.reset_spline()
        model.generation.reset_tables()
    elif generation & set(NEIGHBOURS):  # a Gaussian map, before neighbours
        model.generation.reset_tables()
    if any(key.startswith(f"{_CALIBRATION}.") for key in missing):
        model.aux_calibration.reset()  # written before calibrated uncertainty
    if any(key.split(".", 1)[0] in (_RESIDUAL, *model._collapsed_parts) for key in missing):
        model.residual_field.reset()  # written before the collapsed deep prior


def load_weight_set(model: GuidedLatentModel, average: Any, weights: str, what: str) -> None:
    """Put one weight set of a weight-averaged checkpoint in the networks (see :meth:`load`)."""
    if not isinstance(average, dict) or not isinstance(average.get("weights"), dict):
        raise ValueError(
            f"{what} holds one weight set (it was not fitted with ema_decay > 0); "
            f"weights={weights!r} needs a weight average"
        )
    if (weights == "averaged") == bool(average.get("applied")):
        return  # the file's model already holds that set
    generation = average.get("generation")
    # the resume path's checks: afterwards the networks hold the live weights, as in training
    holder = WeightAverage(model, average.get("decay"))
    holder.restore(average, what)
    if weights == "averaged":  # only reached for a mid-fit file
        holder.swap()
    kept = isinstance(generation, dict)
    if kept:
        model.generation.load_state(generation, what)
    uncertainty = average.get("uncertainty")
    own = dict(model._uncertainty_state())
    if isinstance(uncertainty, dict) and set(uncertainty) == set(own):
        if any(
            not isinstance(v, torch.Tensor) or v.shape != own[k].shape
            for k, v in uncertainty.items()
        ):
            raise ValueError(f"{what} holds an uncertainty calibration of another shape")
        model.aux_calibration.load_state_dict(uncertainty)
    elif model.uncertainty_calibrated:
        model.aux_calibration.reset()
        warnings.warn(
            f"{what} keeps no uncertainty calibration for its {weights} weights; predict_aux "
            "reports the guide's sd until calibrate_uncertainty(training, held-out) is run",
            stacklevel=4,
        )
    if bool(model.residual_field.fitted):
        model.residual_field.reset()
        warnings.warn(
            f"{what} keeps no residual field for its {weights} weights; the collapsed deep "
            "prior needs fit_residual_field(training data) first",
            stacklevel=4,
        )
    if not kept and model.generation_calibrated:
        model.reset_generation()
        warnings.warn(
            f"{what} keeps no generation map for its {weights} weights; sampling draws the "
            "guided block from the prior until calibrate_generation(training images) is run",
            stacklevel=4,
        )


def store_names(model) -> dict[str, str]:
    """Map each parameter's local name (as in ``named_parameters``) to its param-store name."""
    names = {}
    for network in model._networks:
        prefix = f"{model._pyro_name}.{network}"
        for sub, _ in getattr(model, network).named_parameters():
            names[f"{network}.{sub}"] = param_with_module_name(prefix, sub)
    suffix = "_unconstrained"
    for local, _ in model.named_parameters():
        if local.endswith(suffix) and local not in names:
            owner, attribute = local.rsplit(".", 1)
            module_name = model.get_submodule(owner)._pyro_name
            names[local] = f"{module_name}.{attribute[: -len(suffix)]}"
    return names


def optimizer_state(model) -> dict[str, Any]:
    """Optimizer state keyed by local parameter names (independent of the param store)."""
    if model._optim is None:
        return {}
    local = {id(p): name for name, p in model.named_parameters()}
    return {
        local[id(p)]: value for p, value in model._optim.param_states().items() if id(p) in local
    }


def save_model(
    model: GuidedLatentModel, path: str | os.PathLike, *, extra: Mapping[str, Any] | None = None
) -> Path:
    """Write config, scaler, weights, optimizer state and history to one checkpoint file."""
    history = [
        {k: _json_float(v) if isinstance(v, float) else v for k, v in record.items()}
        for record in model.history
    ]
    state = {"model": dict(model.state_dict()), "optimizer": optimizer_state(model)}
    if model._average is not None:
        state["average"] = model._average.state()
    return save_checkpoint(
        path,
        kind=type(model).__name__,
        config=model.config,
        scaler=model.scaler.state_dict(),
        state=state,
        history=history,
        extra=dict(extra or {}),
    )


def load_model(
    cls: type[GuidedLatentModel],
    path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    weights: str | None = None,
) -> GuidedLatentModel:
    """:meth:`GuidedLatentModel.load <pyro_dlatent.models.base.GuidedLatentModel.load>`."""
    if weights not in (None, "averaged", "live"):
        raise ValueError(f"weights must be 'averaged', 'live' or None, got {weights!r}")
    ckpt = load_checkpoint(path)
    what = f"checkpoint file {str(path)!r}"
    klass = MODEL_CLASSES.get(ckpt.kind)
    if klass is None:
        raise ValueError(
            f"{what} holds a {ckpt.kind!r}, which is not a known model class "
            "(import the module that defines it first)"
        )
    if not issubclass(klass, cls):
        raise ValueError(f"{what} holds a {ckpt.kind!r}, not a {cls.__name__}")
    try:
        scaler = AuxScaler.from_state_dict(ckpt.scaler or {})
    except ValueError as err:
        raise ValueError(f"{what} has an invalid scaler: {err}") from err
    config = dict(ckpt.config)
    if ckpt.format_version < 2:
        config = klass._upgrade_config(config)
    config.pop("class", None)
    try:
        with torch.device("meta"):  # shapes first, so a forged config allocates nothing
            skeleton = klass(scaler, **config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} has an invalid config: {err}") from err
    state = upgrade_state(ckpt.state, ckpt.format_version)
    check_weights(skeleton, state, what)
    model = klass(scaler, **config)
    load_state(model, state, what, ckpt.format_version)
    if weights is not None:
        load_weight_set(model, state.get("average"), weights, what)
    model.history = [dict(h) for h in ckpt.history]
    if device is not None:
        model.to(torch.device(device))
    model.eval()
    return model
