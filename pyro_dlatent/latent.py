"""The guided/residual latent split and the scaler that keeps auxiliaries in physical units.

Every model of the package draws its latent code through :class:`LatentSplit`:

.. math::

    z = (z_{aux}, z_{rec}), \\qquad z_{aux} \\mid u \\sim \\mathcal{N}(\\tilde u, \\tau^2 I),
    \\qquad z_{rec} \\sim \\mathcal{N}(0, I),

where :math:`\\tilde u` is the auxiliary vector :math:`u` standardized by an :class:`AuxScaler`
fitted on the training set. Coordinates whose auxiliary is missing fall back to the marginal
:math:`\\mathcal{N}(0, 1 + \\tau^2)`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam
from torch.distributions import constraints

__all__ = ["AUX_SITE", "REC_SITE", "TRANSFORMS", "AuxScaler", "LatentSplit"]

AUX_SITE = "z_aux"
"""Name of the guided latent sample site."""
REC_SITE = "z_rec"
"""Name of the residual latent sample site."""

TRANSFORMS = ("identity", "log10", "log")
"""Transforms an :class:`AuxScaler` can apply before standardizing."""


def _is_torch(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def _forward_transform(x, kind: str):
    if kind == "identity":
        return x
    if kind == "log10":
        return torch.log10(x) if _is_torch(x) else np.log10(x)
    return torch.log(x) if _is_torch(x) else np.log(x)


def _inverse_transform(x, kind: str):
    if kind == "identity":
        return x
    if kind == "log10":
        return 10.0**x
    return torch.exp(x) if _is_torch(x) else np.exp(x)


class AuxScaler:
    """Named auxiliary variables in physical units and their standardization.

    Each auxiliary ``u_j`` is first passed through a declared transform ``g_j`` (identity,
    ``log10`` or ``log``) and then standardized with the training-set mean and standard deviation:

    .. math:: \\tilde u_j = (g_j(u_j) - m_j) / s_j.

    Parameters
    ----------
    names : sequence of str
        Names of the auxiliary variables, in latent order (``z_aux[..., j]`` tracks ``names[j]``).
    units : sequence of str, optional
        Physical units of each variable (free text such as ``"Msun"``); default ``""``.
    transforms : mapping or sequence of str, optional
        Transform of each variable, one of :data:`TRANSFORMS`; default identity.

    Examples
    --------
    >>> scaler = AuxScaler(["mass", "c"], units=["Msun", ""], transforms={"mass": "log10"})
    >>> scaler = scaler.fit({"mass": [1e14, 1e15], "c": [3.0, 5.0]})
    >>> scaler.transform({"mass": [1e14], "c": [3.0]}).round(3).tolist()
    [[-1.0, -1.0]]
    """

    def __init__(
        self,
        names: Sequence[str],
        units: Sequence[str] | None = None,
        transforms: Mapping[str, str] | Sequence[str] | None = None,
    ) -> None:
        names = [str(n) for n in names]
        if not names:
            raise ValueError("expected at least one name in names, got an empty sequence")
        if len(set(names)) != len(names):
            raise ValueError(f"expected unique names, got {names}")
        units = [""] * len(names) if units is None else [str(u) for u in units]
        if len(units) != len(names):
            raise ValueError(f"expected {len(names)} units (one per name), got {len(units)}")
        if transforms is None:
            transforms = ["identity"] * len(names)
        elif isinstance(transforms, Mapping):
            unknown = set(transforms) - set(names)
            if unknown:
                raise ValueError(f"transforms names unknown auxiliaries {sorted(unknown)}")
            transforms = [transforms.get(n, "identity") for n in names]
        transforms = list(transforms)
        if len(transforms) != len(names):
            raise ValueError(f"expected {len(names)} transforms, got {len(transforms)}")
        for t in transforms:
            if t not in TRANSFORMS:
                raise ValueError(f"expected transforms in {TRANSFORMS}, got {t!r}")
        self.names = names
        self.units = units
        self.transforms = transforms
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None

    @property
    def dim(self) -> int:
        """Number of auxiliary variables."""
        return len(self.names)

    @property
    def fitted(self) -> bool:
        """Whether :meth:`fit` has been called."""
        return self.mean is not None

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{n} [{u}]" + (f" ({t})" if t != "identity" else "")
            for n, u, t in zip(self.names, self.units, self.transforms, strict=True)
        )
        return f"AuxScaler({fields})"

    # ------------------------------------------------------------------ validation
    def as_array(self, aux: Any, *, name: str = "aux", allow_missing: bool = True) -> np.ndarray:
        """Return ``aux`` as a float64 array of shape ``(n, dim)`` in physical units.

        Parameters
        ----------
        aux : mapping of name to array-like, or array-like of shape ``(n, dim)`` or ``(dim,)``
            Auxiliary values; ``NaN`` marks a missing value when ``allow_missing``.
        name : str
            Argument name used in error messages.
        allow_missing : bool
            Whether ``NaN`` entries are accepted (``inf`` never is).
        """
        if isinstance(aux, Mapping):
            unknown = [k for k in aux if k not in self.names]
            if unknown:
                raise ValueError(
                    f"{name} has unknown auxiliary names {unknown}; expected names in {self.names}"
                )
            missing = [k for k in self.names if k not in aux]
            if missing:
                raise ValueError(f"{name} lacks auxiliary names {missing}")
            cols = [np.atleast_1d(np.asarray(aux[k], dtype=np.float64)) for k in self.names]
            lengths = {c.shape for c in cols}
            if len(lengths) != 1 or cols[0].ndim != 1:
                raise ValueError(f"{name} values must be 1-d and of equal length, got {lengths}")
            arr = np.stack(cols, axis=-1)
        else:
            if _is_torch(aux):
                aux = aux.detach().cpu().numpy()
            try:
                arr = np.asarray(aux, dtype=np.float64)
            except (TypeError, ValueError) as err:
                raise TypeError(f"{name} must be numeric or a mapping of names to values") from err
            if arr.ndim == 1:
                arr = arr[None, :]
            if arr.ndim != 2 or arr.shape[1] != self.dim:
                raise ValueError(
                    f"{name} must have shape (n, {self.dim}) for auxiliaries {self.names}, "
                    f"got {tuple(arr.shape)}"
                )
        if np.isinf(arr).any():
            raise ValueError(f"{name} contains infinite values")
        if not allow_missing and np.isnan(arr).any():
            raise ValueError(f"{name} contains NaN values")
        return arr

    # ------------------------------------------------------------------ fit / transform
    def fit(self, aux: Any) -> AuxScaler:
        """Fit mean and standard deviation of the transformed auxiliaries, ignoring NaN.

        Returns ``self``.
        """
        arr = self.as_array(aux)
        self._check_domain(arr, "aux")
        g = np.column_stack(
            [_forward_transform(arr[:, j], t) for j, t in enumerate(self.transforms)]
        )
        counts = np.sum(~np.isnan(g), axis=0)
        if np.any(counts < 2):
            bad = [self.names[j] for j in np.flatnonzero(counts < 2)]
            raise ValueError(
                f"aux needs at least two observed values per variable; {bad} lack them"
            )
        mean = np.nanmean(g, axis=0)
        std = np.nanstd(g, axis=0)
        if np.any(std <= 0):
            bad = [self.names[j] for j in np.flatnonzero(std <= 0)]
            raise ValueError(f"aux variables {bad} are constant; they cannot be standardized")
        self.mean, self.std = mean, std
        return self

    def _check_domain(self, arr: np.ndarray, name: str) -> None:
        for j, t in enumerate(self.transforms):
            col = arr[:, j]
            if t != "identity" and np.any(col[~np.isnan(col)] <= 0):
                raise ValueError(
                    f"{name} variable {self.names[j]!r} uses a {t} transform: values must be > 0"
                )

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError("AuxScaler is not fitted; call fit() first")

    def transform(self, aux: Any) -> np.ndarray:
        """Physical values to standardized values, shape ``(n, dim)``; NaN stays NaN."""
        self._require_fitted()
        arr = self.as_array(aux)
        self._check_domain(arr, "aux")
        g = np.column_stack(
            [_forward_transform(arr[:, j], t) for j, t in enumerate(self.transforms)]
        )
        return (g - self.mean) / self.std

    def inverse_transform(self, standardized: Any) -> np.ndarray:
        """Standardized values (array ``(n, dim)``) back to physical units."""
        self._require_fitted()
        arr = self.as_array(standardized, name="standardized")
        g = arr * self.std + self.mean
        return np.column_stack(
            [_inverse_transform(g[:, j], t) for j, t in enumerate(self.transforms)]
        )

    def transform_tensor(self, u: torch.Tensor) -> torch.Tensor:
        """Differentiable torch version of :meth:`transform` for a tensor ``(..., dim)``."""
        self._require_fitted()
        mean = torch.as_tensor(self.mean, dtype=u.dtype, device=u.device)
        std = torch.as_tensor(self.std, dtype=u.dtype, device=u.device)
        cols = [_forward_transform(u[..., j], t) for j, t in enumerate(self.transforms)]
        return (torch.stack(cols, dim=-1) - mean) / std

    def inverse_transform_tensor(self, standardized: torch.Tensor) -> torch.Tensor:
        """Differentiable torch version of :meth:`inverse_transform`."""
        self._require_fitted()
        mean = torch.as_tensor(self.mean, dtype=standardized.dtype, device=standardized.device)
        std = torch.as_tensor(self.std, dtype=standardized.dtype, device=standardized.device)
        g = standardized * std + mean
        cols = [_inverse_transform(g[..., j], t) for j, t in enumerate(self.transforms)]
        return torch.stack(cols, dim=-1)

    def to_dict(self, aux: np.ndarray) -> dict[str, np.ndarray]:
        """Split an array ``(n, dim)`` into a ``{name: values}`` dict."""
        arr = np.asarray(aux)
        return {n: arr[..., j] for j, n in enumerate(self.names)}

    # ------------------------------------------------------------------ serialization
    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable description of the scaler."""
        return {
            "names": self.names,
            "units": self.units,
            "transforms": self.transforms,
            "mean": None if self.mean is None else self.mean.tolist(),
            "std": None if self.std is None else self.std.tolist(),
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> AuxScaler:
        """Rebuild a scaler from :meth:`state_dict` output, validating every field."""
        try:
            scaler = cls(state["names"], state["units"], state["transforms"])
            mean, std = state["mean"], state["std"]
        except KeyError as err:
            raise ValueError(f"scaler state lacks field {err.args[0]!r}") from err
        if (mean is None) != (std is None):
            raise ValueError("scaler state must have both mean and std, or neither")
        if mean is not None:
            mean = np.asarray(mean, dtype=np.float64)
            std = np.asarray(std, dtype=np.float64)
            if mean.shape != (scaler.dim,) or std.shape != (scaler.dim,):
                raise ValueError(f"scaler state mean/std must have shape ({scaler.dim},)")
            if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
                raise ValueError("scaler state mean/std must be finite with std > 0")
            scaler.mean, scaler.std = mean, std
        return scaler

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialize to a JSON string, and write it to ``path`` if given."""
        text = json.dumps(self.state_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> AuxScaler:
        """Load from a JSON string or a path to a JSON file."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            path = Path(text_or_path)
            if not path.is_file():
                raise ValueError(f"scaler file {str(path)!r} does not exist")
            text = path.read_text()
        try:
            state = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"scaler JSON is malformed: {err}") from err
        if not isinstance(state, dict):
            raise ValueError("scaler JSON must hold an object")
        return cls.from_state_dict(state)


def _check_tau(tau: Any, aux_dim: int) -> torch.Tensor:
    """``tau`` as a default-dtype tensor of shape ``()`` or ``(aux_dim,)``; all must be > 0."""
    if isinstance(tau, bool):
        raise ValueError(f"expected tau > 0, got {tau!r}")
    if isinstance(tau, int | float):
        if not (math.isfinite(tau) and tau > 0):
            raise ValueError(f"expected tau > 0, got {tau}")
        return torch.tensor(float(tau))
    try:
        values = (
            tau.detach().cpu().double()
            if _is_torch(tau)
            else torch.as_tensor(np.asarray(tau, dtype=np.float64))
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"expected tau > 0 (a float or {aux_dim} floats), got {tau!r}") from err
    if values.dim() == 0:
        return _check_tau(float(values), aux_dim)
    if values.shape != (aux_dim,):
        raise ValueError(
            f"expected tau to be a float or have shape ({aux_dim},) (one per guided "
            f"coordinate), got shape {tuple(values.shape)}"
        )
    if not (torch.isfinite(values).all() and (values > 0).all()):
        raise ValueError(f"expected tau > 0 for every coordinate, got {values.tolist()}")
    return values.to(torch.get_default_dtype())


class LatentSplit(PyroModule):
    """Prior over the guided block ``z_aux`` and the residual block ``z_rec``.

    .. math::

        z_{aux,j} \\mid \\tilde u_j \\sim
            \\begin{cases}
                \\mathcal{N}(\\tilde u_j, \\tau^2) & \\text{if } u_j \\text{ observed} \\\\
                           \\mathcal{N}(0, 1 + \\tau^2) & \\text{if } u_j \\text{ missing,}
            \\end{cases}
        \\qquad z_{rec} \\sim \\mathcal{N}(0, I).

    ``tau`` is the one knob between *interpretable* and *flexible*: small ``tau`` ties each
    guided coordinate tightly to its standardized auxiliary; large ``tau`` lets the decoder use
    the guided block freely, and ``tau -> inf`` removes the tether.

    Calling the module inside a ``pyro.plate`` over the batch emits the sample sites
    ``"z_aux"`` (event shape ``(aux_dim,)``) and ``"z_rec"`` (event shape ``(residual_dim,)``).

    Parameters
    ----------
    aux_dim : int
        Number of guided coordinates (one per auxiliary variable).
    residual_dim : int
        Number of residual coordinates (may be 0).
    tau : float or sequence of float
        Prior standard deviation of the guided block around the standardized auxiliaries:
        one value for every coordinate (stored as a 0-d tensor), or one per coordinate
        (length ``aux_dim``, stored with shape ``(aux_dim,)``), i.e.
        :math:`z_{aux} \\mid u \\sim \\mathcal{N}(\\tilde u, \\mathrm{diag}(\\tau_j^2))`.
    learn_tau : bool
        If true, ``tau`` is a positive Pyro parameter initialised at ``tau``.
    name : str
        Prefix of this split's Pyro names: its parameter is ``"{name}.tau"`` and its sites
        ``"{name}.z_aux"``, ``"{name}.z_rec"`` (default ``""``: ``"tau"``, ``"z_aux"``,
        ``"z_rec"``; inside a named :class:`~pyro.nn.PyroModule` the parameter also takes the
        parent's prefix). Two splits in one model need different names, or they would share
        one ``tau`` and one pair of sites.

    Attributes
    ----------
    aux_site, rec_site : str
        The names of this split's two sample sites.
    """

    def __init__(
        self,
        aux_dim: int,
        residual_dim: int,
        tau: float | Sequence[float] | np.ndarray | torch.Tensor = 0.1,
        learn_tau: bool = False,
        name: str = "",
    ) -> None:
        if not isinstance(name, str):
            raise ValueError(f"name must be a string, got {name!r}")
        super().__init__(name)
        self.aux_site = f"{name}.{AUX_SITE}" if name else AUX_SITE
        self.rec_site = f"{name}.{REC_SITE}" if name else REC_SITE
        if int(aux_dim) != aux_dim or aux_dim < 1:
            raise ValueError(f"expected aux_dim >= 1, got {aux_dim}")
        if int(residual_dim) != residual_dim or residual_dim < 0:
            raise ValueError(f"expected residual_dim >= 0, got {residual_dim}")
        self.aux_dim = int(aux_dim)
        self.residual_dim = int(residual_dim)
        self.learn_tau = bool(learn_tau)
        tau = _check_tau(tau, self.aux_dim)
        if self.learn_tau:
            self.tau = PyroParam(tau, constraint=constraints.positive)
        else:
            self.register_buffer("tau", tau)

    @property
    def latent_dim(self) -> int:
        """``aux_dim + residual_dim``."""
        return self.aux_dim + self.residual_dim

    def check_aux(
        self, aux: torch.Tensor | None, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Validate standardized auxiliaries and mask; return them as tensors on tau's device.

        Non-finite auxiliaries are accepted only where ``mask`` is False (missing).
        """
        ref = self.tau
        if aux is None:
            if mask is not None:
                raise ValueError("mask was given without aux")
            return None, None
        if not _is_torch(aux):
            aux = torch.as_tensor(np.asarray(aux, dtype=np.float64))
        if not aux.is_floating_point():
            raise TypeError(f"aux must be a floating-point tensor, got dtype {aux.dtype}")
        aux = aux.to(device=ref.device)
        if aux.dim() < 1 or aux.shape[-1] != self.aux_dim:
            raise ValueError(
                f"aux must have last dimension aux_dim={self.aux_dim}, got shape {tuple(aux.shape)}"
            )
        if mask is None:
            if not torch.isfinite(aux).all():
                raise ValueError("aux contains non-finite values; mark missing entries with mask")
            return aux, None
        if not _is_torch(mask):
            mask = torch.as_tensor(np.asarray(mask))
        mask = mask.to(device=ref.device)
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = observed), got dtype {mask.dtype}")
        if mask.shape != aux.shape:
            raise ValueError(
                f"mask must have the shape of aux {tuple(aux.shape)}, got {tuple(mask.shape)}"
            )
        if not torch.isfinite(aux[mask]).all():
            raise ValueError("aux contains non-finite values where mask marks them observed")
        return aux, mask

    def aux_dist(
        self, aux: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> dist.Distribution:
        """Distribution of ``z_aux`` given standardized auxiliaries (marginal where missing).

        Parameters
        ----------
        aux : Tensor, shape ``(batch, aux_dim)``, optional
            Standardized auxiliaries; ``None`` gives the marginal for every coordinate.
        mask : Tensor of bool, shape ``(batch, aux_dim)``, optional
            True where the auxiliary is observed.
        """
        aux, mask = self.check_aux(aux, mask)
        tau = self.tau
        marginal_scale = torch.sqrt(1.0 + tau**2)
        if aux is None:
            loc = torch.zeros(self.aux_dim, dtype=tau.dtype, device=tau.device)
            return dist.Normal(loc, marginal_scale.expand(self.aux_dim)).to_event(1)
        aux = aux.to(tau.dtype)
        if mask is None:
            return dist.Normal(aux, tau.expand(aux.shape)).to_event(1)
        loc = torch.where(mask, aux, torch.zeros_like(aux))
        scale = torch.where(mask, tau.expand(aux.shape), marginal_scale.expand(aux.shape))
        return dist.Normal(loc, scale).to_event(1)

    def rec_dist(self, batch_shape: torch.Size | tuple = ()) -> dist.Distribution:
        """Standard normal distribution of ``z_rec`` with event shape ``(residual_dim,)``."""
        tau = self.tau
        loc = torch.zeros((*batch_shape, self.residual_dim), dtype=tau.dtype, device=tau.device)
        return dist.Normal(loc, torch.ones_like(loc)).to_event(1)

    def forward(
        self, aux: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``z_aux`` and ``z_rec``; call inside a ``pyro.plate`` over the batch.

        Returns
        -------
        z_aux : Tensor, shape ``(batch, aux_dim)``
        z_rec : Tensor, shape ``(batch, residual_dim)``
        """
        aux_d = self.aux_dist(aux, mask)
        z_aux = pyro.sample(self.aux_site, aux_d)
        z_rec = pyro.sample(self.rec_site, self.rec_dist(aux_d.batch_shape))
        return z_aux, z_rec
