"""Priors that emit a field (deep latent prior, Gaussian random field), the inverse-problem model.

A *field prior* is a Pyro model component: calling it emits its sample sites and returns a field
of shape ``(*batch, height, width)`` on the mesh nodes, recorded as the site ``"field"``. Two
are provided:

- :class:`DeepPrior`, the disentangled deep prior of a frozen generator ``G``:

  .. math::

      u \\sim p(u) \\;\\text{(physical units)}, \\qquad
      z_{aux} \\mid u \\sim \\mathcal{N}(\\tilde u, \\mathrm{diag}(\\tau_j^2)), \\qquad
      z_{rec} \\sim \\mathcal{N}(0, I), \\qquad
      \\text{field} = G(z_{aux}, z_{rec}),

  with :math:`\\tilde u` the auxiliaries standardized by the generator's
  :class:`~pyro_dlatent.latent.AuxScaler`;
- :class:`GRFFieldPrior`, the Gaussian-random-field baseline (a wrapper around
  :class:`pyro_dlatent.inverse.grf.GRFPrior`).

:class:`InverseProblemModel` adds the Gaussian likelihood of sensor data,

.. math:: d \\mid \\text{field} \\sim \\mathcal{N}(H\\, S(\\text{field}), \\sigma^2 I),

where ``problem.forward`` computes :math:`H S(\\cdot)` (PDE solve, then sensor read-out).

Site names are fixed: ``"u"``, ``"z_aux"``, ``"z_rec"``, ``"field"``, ``"obs"`` (and
``"field_white"`` for the whitened GRF prior).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.nn import PyroModule
from torch.distributions import constraints

from pyro_dlatent.inverse.protocols import FieldPrior, ForwardProblem, Generator, require
from pyro_dlatent.latent import AUX_SITE, REC_SITE, AuxScaler, LatentSplit

__all__ = [
    "FIELD_SITE",
    "OBS_SITE",
    "U_SITE",
    "WHITE_SITE",
    "AuxPrior",
    "DeepPrior",
    "GRFFieldPrior",
    "InverseProblemModel",
    "TauCalibration",
    "calibrate_tau",
    "check_observations",
]

U_SITE = "u"
"""Name of the site of the auxiliary variables in physical units."""
FIELD_SITE = "field"
"""Name of the field site (deterministic for the deep prior, a sample for the GRF prior)."""
OBS_SITE = "obs"
"""Name of the observation site."""
WHITE_SITE = "field_white"
"""Name of the standard-normal site of the whitened GRF prior."""

_LOG_2PI = math.log(2.0 * math.pi)


def _field_shape(size: Any, name: str) -> tuple[int, int]:
    if isinstance(size, int | np.integer) and not isinstance(size, bool):
        shape = (int(size), int(size))
    else:
        try:
            shape = tuple(int(s) for s in size)
        except TypeError as err:
            raise TypeError(f"{name} must be an int or a pair of ints, got {size!r}") from err
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"{name} must describe a 2-d image, got {size!r}")
    return shape


class AuxPrior(TorchDistribution):
    """Independent priors of named auxiliaries, joined into one vector-valued distribution.

    The joint density is the product of the univariate components,

    .. math:: p(u) = \\prod_{j=1}^{k} p_j(u_j),

    and the event shape is ``(k,)``, so that ``u`` is one sample site whose last axis is
    labelled by :attr:`names`. Components may have different families and supports (a
    ``Uniform`` location next to a ``LogNormal`` amplitude); the support of the joint is then
    the stacked support, which Pyro's autoguides and HMC map to an unconstrained vector
    component by component. When every component has the same family, the components are also
    fused into one vectorized distribution (e.g. one ``Normal`` with ``k`` locations), which
    evaluates ``k`` times fewer small tensor operations.

    Parameters
    ----------
    priors : mapping of str to Distribution
        Univariate distributions (event shape ``()``, equal batch shapes) in physical units,
        in latent order.
    units : mapping of str to str, or sequence of str, optional
        Physical units of each variable (default ``""``).
    """

    arg_constraints: ClassVar[dict] = {}
    has_rsample = False

    def __init__(
        self,
        priors: Mapping[str, torch.distributions.Distribution],
        units: Mapping[str, str] | Sequence[str] | None = None,
        validate_args: bool | None = None,
    ) -> None:
        if not isinstance(priors, Mapping) or not priors:
            raise ValueError("expected priors to be a non-empty mapping of names to distributions")
        names = [str(n) for n in priors]
        components = list(priors.values())
        for name, d in zip(names, components, strict=True):
            if not isinstance(d, torch.distributions.Distribution):
                raise TypeError(f"priors[{name!r}] must be a torch/pyro Distribution, got {d!r}")
            if d.event_shape != torch.Size():
                raise ValueError(
                    f"priors[{name!r}] must be univariate (event shape ()), "
                    f"got event shape {tuple(d.event_shape)}"
                )
            if d.support.is_discrete:
                raise ValueError(f"priors[{name!r}] must be continuous")
        batch_shapes = {d.batch_shape for d in components}
        if len(batch_shapes) != 1:
            raise ValueError(f"priors must share one batch shape, got {sorted(batch_shapes)}")
        if units is None:
            units = [""] * len(names)
        elif isinstance(units, Mapping):
            unknown = set(units) - set(names)
            if unknown:
                raise ValueError(f"units names unknown auxiliaries {sorted(unknown)}")
            units = [str(units.get(n, "")) for n in names]
        else:
            units = [str(u) for u in units]
        if len(units) != len(names):
            raise ValueError(f"expected {len(names)} units (one per prior), got {len(units)}")
        self.names = names
        self.units = units
        self.components = components
        self._joint = _fuse(components)
        super().__init__(
            components[0].batch_shape, torch.Size([len(components)]), validate_args=validate_args
        )

    @classmethod
    def from_scaler(
        cls, scaler: AuxScaler, *, dtype: torch.dtype | None = None, device: Any = None
    ) -> AuxPrior:
        """Default prior: the training population's first two moments, i.e. ``u~ ~ N(0, I)``.

        For an auxiliary with identity transform the prior is ``Normal(m_j, s_j)``; with a
        ``log10`` (``log``) transform it is ``LogNormal(m_j ln 10, s_j ln 10)``
        (``LogNormal(m_j, s_j)``), where ``m_j, s_j`` are the scaler's mean and standard
        deviation of the transformed training values. The standardized auxiliaries are then
        standard normal, so that ``z_aux`` has the marginal ``N(0, (1 + tau^2) I)``, the same
        marginal :class:`~pyro_dlatent.latent.LatentSplit` uses for a missing auxiliary.
        """
        if not isinstance(scaler, AuxScaler):
            raise TypeError(f"scaler must be an AuxScaler, got {type(scaler).__name__}")
        if not scaler.fitted:
            raise ValueError("scaler must be fitted to build the default u_prior")
        dtype = torch.get_default_dtype() if dtype is None else dtype
        priors = {}
        for j, name in enumerate(scaler.names):
            loc = torch.tensor(float(scaler.mean[j]), dtype=dtype, device=device)
            scale = torch.tensor(float(scaler.std[j]), dtype=dtype, device=device)
            kind = scaler.transforms[j]
            if kind == "identity":
                priors[name] = dist.Normal(loc, scale)
            elif kind == "log10":
                priors[name] = dist.LogNormal(loc * math.log(10.0), scale * math.log(10.0))
            else:
                priors[name] = dist.LogNormal(loc, scale)
        return cls(priors, units=scaler.units)

    @property
    def priors(self) -> dict[str, torch.distributions.Distribution]:
        """The components as a ``{name: distribution}`` dict."""
        return dict(zip(self.names, self.components, strict=True))

    @constraints.dependent_property(is_discrete=False, event_dim=1)
    def support(self) -> constraints.Constraint:
        """Support of the joint: the fused family's support, else the stacked supports."""
        if self._joint is not None:
            return constraints.independent(self._joint.support, 1)
        return constraints.stack([d.support for d in self.components], dim=-1)

    @property
    def mean(self) -> torch.Tensor:
        return torch.stack([d.mean for d in self.components], dim=-1)

    @property
    def variance(self) -> torch.Tensor:
        return torch.stack([d.variance for d in self.components], dim=-1)

    def expand(self, batch_shape: torch.Size | Sequence[int], _instance=None) -> AuxPrior:
        batch_shape = torch.Size(batch_shape)
        new = self._get_checked_instance(AuxPrior, _instance)
        new.names, new.units = self.names, self.units
        new.components = [d.expand(batch_shape) for d in self.components]
        new._joint = None
        if self._joint is not None:
            new._joint = self._joint.expand(batch_shape + self.event_shape)
        super(AuxPrior, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def sample(self, sample_shape: torch.Size | Sequence[int] = torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            if self._joint is not None:
                return self._joint.sample(sample_shape)
            return torch.stack([d.sample(sample_shape) for d in self.components], dim=-1)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of the component log densities, shape ``value.shape[:-1]``."""
        if self._validate_args:
            self._validate_sample(value)
        if self._joint is not None:
            return self._joint.log_prob(value).sum(-1)
        terms = [d.log_prob(value[..., j]) for j, d in enumerate(self.components)]
        return torch.stack(terms, dim=-1).sum(-1)


def _fuse(
    components: Sequence[torch.distributions.Distribution],
) -> torch.distributions.Distribution | None:
    """One distribution with the components' parameters stacked on a last axis, if possible.

    Works when all components share a family whose constructor takes the names of its
    ``arg_constraints`` (Normal, LogNormal, Uniform, Gamma, Beta, ...). The fused density is
    checked against the components at one draw of each (drawn under a forked RNG, so the
    caller's random stream is untouched); ``None`` means "evaluate component by component".
    """
    family = type(components[0])
    if any(type(d) is not family for d in components):
        return None
    try:
        params = {
            name: torch.stack([torch.as_tensor(getattr(d, name)) for d in components], dim=-1)
            for name in family.arg_constraints
        }
        fused = family(**params, validate_args=False)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(0)
            probe = torch.stack([d.sample() for d in components], dim=-1)
            expected = torch.stack(
                [d.log_prob(probe[..., j]) for j, d in enumerate(components)], dim=-1
            )
            actual = fused.log_prob(probe)
    except (TypeError, ValueError, RuntimeError, NotImplementedError, AttributeError):
        return None
    if actual.shape != expected.shape or not torch.allclose(actual, expected, equal_nan=True):
        return None
    return fused


class DeepPrior(PyroModule):
    """Disentangled deep prior: named auxiliaries, the latent split and a frozen generator.

    Calling the module emits the sites

    - ``"u"`` — auxiliaries in physical units, event shape ``(aux_dim,)``, prior ``u_prior``;
    - ``"z_aux"`` — ``N(u~, diag(tau^2))`` (one or per-coordinate ``tau``) through
      :class:`~pyro_dlatent.latent.LatentSplit`, with ``u~ = scaler.transform_tensor(u)``
      (differentiable);
    - ``"z_rec"`` — ``N(0, I)``;
    - ``"field"`` — ``pyro.deterministic`` of ``G(z_aux, z_rec)``, shape ``(*batch, H, W)``;

    and returns the field. Leading batch dimensions (from an enclosing ``pyro.plate``, as in
    vectorized prediction or multi-start MAP) are carried through the generator.

    ``tau`` is the one knob between *interpretable* and *flexible*: a small ``tau`` ties the
    guided coordinates to the named parameters ``u``, so the posterior of ``u`` is read off
    directly; it should be the value the generator was trained with.

    Parameters
    ----------
    generator : torch.nn.Module
        ``G(z_aux (batch, aux_dim), z_rec (batch, residual_dim)) -> (batch, H, W)`` with
        attributes ``aux_dim``, ``residual_dim``, ``image_size`` and ``scaler`` (a fitted
        :class:`~pyro_dlatent.latent.AuxScaler`). It is frozen in place: put in eval mode and
        its parameters stop requiring gradients.
    u_prior : mapping of str to Distribution, or AuxPrior, optional
        Prior of each auxiliary in physical units, keyed by the scaler's names. Default:
        :meth:`AuxPrior.from_scaler` (the training population's mean and standard deviation
        in the scaler's transformed space, i.e. ``u~ ~ N(0, I)``).
    tau : float or sequence of float, optional
        Standard deviation of ``z_aux`` around ``u~``: one value, or one per guided coordinate
        (length ``aux_dim``), so that
        :math:`z_{aux} \\mid u \\sim \\mathcal{N}(\\tilde u, \\mathrm{diag}(\\tau_j^2))`.
        Default ``generator.tau`` if the generator carries one. A per-coordinate ``tau``
        calibrated by :func:`calibrate_tau` accounts for the generator's own misalignment
        between its guided coordinates and the standardized auxiliaries (model-error slack).
    """

    def __init__(
        self,
        generator: torch.nn.Module,
        *,
        u_prior: Mapping[str, torch.distributions.Distribution] | AuxPrior | None = None,
        tau: float | Sequence[float] | np.ndarray | torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(generator, torch.nn.Module):
            raise TypeError(f"generator must be a torch.nn.Module, got {type(generator).__name__}")
        require(generator, Generator, "generator")
        scaler = generator.scaler
        if not isinstance(scaler, AuxScaler) or not scaler.fitted:
            raise ValueError("generator.scaler must be a fitted AuxScaler")
        if scaler.dim != int(generator.aux_dim):
            raise ValueError(
                f"generator.aux_dim={generator.aux_dim} does not match the scaler's "
                f"{scaler.dim} auxiliaries {scaler.names}"
            )
        if tau is None:
            tau = getattr(generator, "tau", None)
            if isinstance(tau, torch.Tensor):
                tau = float(tau.detach())
            if tau is None:
                raise ValueError("expected tau > 0, got None (the generator carries no tau)")
        generator.eval()
        generator.requires_grad_(False)
        self.generator = generator
        self.scaler = scaler
        self.field_shape = _field_shape(generator.image_size, "generator.image_size")
        ref = next(iter(generator.parameters()), None)
        dtype = ref.dtype if ref is not None else torch.get_default_dtype()
        device = ref.device if ref is not None else torch.device("cpu")
        self.latent = LatentSplit(int(generator.aux_dim), int(generator.residual_dim), tau)
        self.latent.to(dtype=dtype, device=device)
        if u_prior is None:
            u_prior = AuxPrior.from_scaler(scaler, dtype=dtype, device=device)
        elif not isinstance(u_prior, AuxPrior):
            if not isinstance(u_prior, Mapping):
                raise TypeError("u_prior must be a mapping of auxiliary names to distributions")
            if set(u_prior) != set(scaler.names):
                raise ValueError(
                    f"u_prior must name exactly the auxiliaries {scaler.names}, "
                    f"got {sorted(u_prior)}"
                )
            u_prior = AuxPrior({n: u_prior[n] for n in scaler.names}, units=scaler.units)
        if u_prior.names != scaler.names:
            raise ValueError(f"u_prior names {u_prior.names} must be {scaler.names} in this order")
        if u_prior.batch_shape != torch.Size():
            raise ValueError(f"u_prior must have batch shape (), got {tuple(u_prior.batch_shape)}")
        self.u_prior = u_prior
        self._affine_aux = all(t == "identity" for t in scaler.transforms)
        self.register_buffer("_aux_mean", torch.as_tensor(scaler.mean, dtype=dtype, device=device))
        self.register_buffer("_aux_std", torch.as_tensor(scaler.std, dtype=dtype, device=device))

    @property
    def tau(self) -> float | tuple[float, ...]:
        """Standard deviation of ``z_aux`` around the standardized auxiliaries.

        A float when one ``tau`` serves every coordinate, else a tuple of ``aux_dim`` floats.
        """
        tau = self.latent.tau.detach()
        return float(tau) if tau.dim() == 0 else tuple(tau.tolist())

    @property
    def tau_vector(self) -> torch.Tensor:
        """``tau`` per guided coordinate, shape ``(aux_dim,)`` (the generator's dtype)."""
        return self.latent.tau.detach().expand(self.latent.aux_dim).clone()

    @property
    def aux_names(self) -> list[str]:
        """Names of the auxiliaries, in latent order."""
        return list(self.scaler.names)

    @property
    def aux_units(self) -> list[str]:
        """Units of the auxiliaries."""
        return list(self.u_prior.units)

    @property
    def dtype(self) -> torch.dtype:
        """Floating-point type of the generator (and of the latent sites)."""
        return self.latent.tau.dtype

    @property
    def device(self) -> torch.device:
        """Device of the generator."""
        return self.latent.tau.device

    latent_sites = (U_SITE, AUX_SITE, REC_SITE)
    """Sample sites whose posterior is exported (all real-valued, constrained for ``u``)."""

    def arviz_metadata(self) -> dict[str, Any]:
        """Dims, coords and per-variable attributes of :attr:`latent_sites` for ArviZ export."""
        return {
            "dims": {U_SITE: ["aux"], AUX_SITE: ["aux"], REC_SITE: ["rec"]},
            "coords": {
                "aux": self.aux_names,
                "rec": list(range(self.latent.residual_dim)),
                "aux_units": ("aux", self.aux_units),
            },
            "attrs": {
                U_SITE: {"long_name": "auxiliary variables (physical units)"},
                AUX_SITE: {
                    "long_name": "guided latent block",
                    "tau": self.tau if isinstance(self.tau, float) else list(self.tau),
                },
                REC_SITE: {"long_name": "residual latent block"},
            },
        }

    def standardize(self, u: torch.Tensor) -> torch.Tensor:
        """Physical auxiliaries ``(..., aux_dim)`` to standardized ones, differentiably.

        ``scaler.transform_tensor``, with one fused affine map when every transform is the
        identity.
        """
        u = u.to(self.dtype)
        if self._affine_aux:
            return (u - self._aux_mean) / self._aux_std
        return self.scaler.transform_tensor(u)

    def generate(self, z_aux: torch.Tensor, z_rec: torch.Tensor) -> torch.Tensor:
        """Apply the generator over any leading batch shape.

        Parameters
        ----------
        z_aux : Tensor, shape ``(*batch, aux_dim)``
        z_rec : Tensor, shape ``(*batch, residual_dim)``

        Returns
        -------
        Tensor, shape ``(*batch, H, W)``
        """
        batch = torch.broadcast_shapes(z_aux.shape[:-1], z_rec.shape[:-1])
        if z_aux.shape[:-1] != batch or z_aux.dim() != 2:
            z_aux = z_aux.expand(*batch, z_aux.shape[-1]).reshape(-1, z_aux.shape[-1])
        if z_rec.shape[:-1] != batch or z_rec.dim() != 2:
            z_rec = z_rec.expand(*batch, z_rec.shape[-1]).reshape(-1, z_rec.shape[-1])
        field = self.generator(z_aux.to(self.dtype), z_rec.to(self.dtype))
        if tuple(field.shape[-2:]) != self.field_shape:
            raise ValueError(
                f"generator returned images of shape {tuple(field.shape[-2:])}, "
                f"expected image_size {self.field_shape}"
            )
        return field.reshape(*batch, *self.field_shape)

    def log_density(self, values: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Log prior density of given latents and their field, without Pyro's messengers.

        The same density the sites of :meth:`forward` define,

        .. math:: \\log p(u) + \\log \\mathcal{N}(z_{aux}; \\tilde u, \\mathrm{diag}(\\tau_j^2))
                  + \\log \\mathcal{N}(z_{rec}; 0, I),

        written as plain tensor algebra: the fast path of
        :class:`~pyro_dlatent.inverse.infer.LatentPotential` (tested equal to the trace).

        Parameters
        ----------
        values : mapping
            ``"u"`` ``(*batch, aux_dim)``, ``"z_aux"`` ``(*batch, aux_dim)``,
            ``"z_rec"`` ``(*batch, residual_dim)``.

        Returns
        -------
        log_prob : Tensor, shape ``batch``
        field : Tensor, shape ``(*batch, H, W)``
        """
        u, z_aux, z_rec = values[U_SITE], values[AUX_SITE], values[REC_SITE]
        u_std = torch.nan_to_num(self.standardize(u))
        tau = self.latent.tau
        aux_dim, residual_dim = self.latent.aux_dim, self.latent.residual_dim
        log_norm = -torch.log(tau).expand(aux_dim).sum() - 0.5 * (aux_dim + residual_dim) * _LOG_2PI
        log_prob = (
            self.u_prior.log_prob(u)
            - 0.5 * ((z_aux - u_std) / tau).square().sum(-1)
            - 0.5 * z_rec.square().sum(-1)
            + log_norm
        )
        return log_prob, self.generate(z_aux, z_rec)

    def forward(self) -> torch.Tensor:
        """Emit ``u``, ``z_aux``, ``z_rec``, ``field``; return the field ``(*batch, H, W)``."""
        u = pyro.sample(U_SITE, self.u_prior)
        u_std = self.standardize(u)
        # A diverging HMC trajectory can push u to the edge of its support, where the
        # transform overflows; the density there is already -inf through the "u" site, so
        # finite stand-ins keep LatentSplit's input check from aborting the sampler.
        u_std = torch.nan_to_num(u_std)
        z_aux, z_rec = self.latent(aux=u_std)
        return pyro.deterministic(FIELD_SITE, self.generate(z_aux, z_rec), event_dim=2)


class TauCalibration(NamedTuple):
    """Misalignment between a generator's guided coordinates and the standardized auxiliaries.

    Attributes
    ----------
    tau : ndarray, shape ``(aux_dim,)``
        Root-mean-square misalignment per coordinate,
        :math:`\\sqrt{\\overline{(\\hat z_{aux,j} - \\tilde u_j)^2}}` (bias included):
        the per-coordinate ``tau`` to give :class:`DeepPrior`.
    bias : ndarray, shape ``(aux_dim,)``
        Mean misalignment :math:`\\overline{\\hat z_{aux,j} - \\tilde u_j}`.
    sd : ndarray, shape ``(aux_dim,)``
        Standard deviation of the misalignment (``tau**2 = bias**2 + sd**2``).
    z_aux : ndarray, shape ``(n, aux_dim)``
        The fitted guided coordinates :math:`\\hat z_{aux}`.
    aux_standardized : ndarray, shape ``(n, aux_dim)``
        The standardized auxiliaries :math:`\\tilde u`.
    pixel_rmse : ndarray, shape ``(n,)``
        Root-mean-square pixel misfit :math:`\\lVert G(\\hat z) - x \\rVert / \\sqrt{HW}`.
    residuals : ndarray, shape ``(n, H, W)``
        What the generator leaves unexplained, :math:`x - G(\\hat z)`: samples of its
        approximation error, e.g. to turn into a model-error covariance of the data.
    """

    tau: np.ndarray
    bias: np.ndarray
    sd: np.ndarray
    z_aux: np.ndarray
    aux_standardized: np.ndarray
    pixel_rmse: np.ndarray
    residuals: np.ndarray


def calibrate_tau(
    generator: torch.nn.Module,
    images: Any,
    aux: Any,
    *,
    noise_sd: float,
    init_z_aux: Any = None,
    init_z_rec: Any = None,
    steps: int = 500,
    lr: float = 0.05,
    batch_size: int = 256,
) -> TauCalibration:
    """Calibrate a per-coordinate ``tau`` from held-out labelled images (model-error slack).

    A trained generator does not put the image of auxiliaries :math:`u` exactly at
    :math:`z_{aux} = \\tilde u`: the latent that best reproduces a held-out image sits at
    :math:`\\hat z_{aux} = \\tilde u + e`. In an inverse problem whose data pin the field,
    the posterior of :math:`z_{aux}` concentrates near :math:`\\hat z_{aux}`, so the
    posterior of :math:`u` is only calibrated if the prior's :math:`\\tau_j` covers the
    spread of :math:`e_j`; the generator's training ``tau`` usually does not. For each image
    this function finds the latent the inverse problem would find from a fully observed
    field, the mode of

    .. math::

        \\frac{\\lVert G(z_{aux}, z_{rec}) - x \\rVert^2}{2 \\sigma^2}
        + \\frac{\\lVert z_{aux} \\rVert^2}{2 (1 + \\tau_0^2)}
        + \\frac{\\lVert z_{rec} \\rVert^2}{2},

    with :math:`\\sigma` = ``noise_sd`` and the marginal prior of the guided block (the
    auxiliaries are *not* used, so the fit is not pulled towards them), then returns
    :math:`\\tau_j = \\sqrt{\\overline{e_j^2}}`. This targets the generator's own
    misalignment, unlike the encoder's means on held-out data, whose error also holds the
    encoder's amortization gap, which an inverse problem (that never calls the encoder) does not
    see; the encoder's means are the natural starting point of the fit.

    Parameters
    ----------
    generator : torch.nn.Module
        ``G(z_aux (n, aux_dim), z_rec (n, residual_dim)) -> (n, H, W)`` with ``aux_dim``,
        ``residual_dim`` and a fitted ``scaler`` (as :class:`DeepPrior` requires); ``tau``
        (default 1.0 when absent) sets the marginal prior of the guided block. It is not
        modified.
    images : array-like, shape ``(n, H, W)``
        Held-out images in the generator's output units.
    aux : array-like, shape ``(n, aux_dim)``
        Their auxiliaries in physical units, in the scaler's order.
    noise_sd : float
        Pixel sd of the misfit the generator cannot explain (image units), e.g. the root-mean-
        square reconstruction error of the trained model; it weighs the fit against the prior.
    init_z_aux, init_z_rec : array-like, shapes ``(n, aux_dim)``, ``(n, residual_dim)``, optional
        Starting latents (e.g. the encoder's means); default zeros.
    steps : int
        Adam steps per batch.
    lr : float
        Adam learning rate.
    batch_size : int
        Images fitted together.

    Returns
    -------
    TauCalibration
    """
    require(generator, Generator, "generator")
    if not (isinstance(noise_sd, int | float) and math.isfinite(noise_sd) and noise_sd > 0):
        raise ValueError(f"expected noise_sd > 0, got {noise_sd!r}")
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"expected lr > 0, got {lr!r}")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"expected {name} >= 1, got {value!r}")
    k, r = int(generator.aux_dim), int(generator.residual_dim)
    images = np.asarray(images, dtype=np.float64)
    aux = np.asarray(aux, dtype=np.float64)
    if images.ndim != 3:
        raise ValueError(f"expected images of shape (n, H, W), got {images.shape}")
    n = images.shape[0]
    if n < 2:
        raise ValueError(f"expected at least 2 images, got {n}")
    if aux.shape != (n, k):
        raise ValueError(f"expected aux of shape ({n}, {k}), got {aux.shape}")
    inits = []
    for name, value, dim in (("init_z_aux", init_z_aux, k), ("init_z_rec", init_z_rec, r)):
        value = np.zeros((n, dim)) if value is None else np.asarray(value, dtype=np.float64)
        if value.shape != (n, dim):
            raise ValueError(f"expected {name} of shape ({n}, {dim}), got {value.shape}")
        inits.append(value)
    aux_std = np.asarray(generator.scaler.transform(aux), dtype=np.float64)
    if not np.isfinite(aux_std).all():
        raise ValueError("aux contains values outside the scaler's transform domain")
    tau0 = getattr(generator, "tau", 1.0)
    tau0 = float(torch.as_tensor(tau0).detach().square().mean().sqrt())
    ref = next(iter(generator.parameters()), None)
    dtype = ref.dtype if ref is not None else torch.get_default_dtype()
    device = ref.device if ref is not None else torch.device("cpu")
    aux_precision = 1.0 / (1.0 + tau0**2)
    fitted, residuals = [], []
    for start in range(0, n, batch_size):
        rows = slice(start, start + batch_size)
        target = torch.as_tensor(images[rows], dtype=dtype, device=device)
        z_aux = torch.tensor(inits[0][rows], dtype=dtype, device=device, requires_grad=True)
        z_rec = torch.tensor(inits[1][rows], dtype=dtype, device=device, requires_grad=True)
        optimizer = torch.optim.Adam([z_aux, z_rec], lr=lr)
        for _ in range(steps):
            optimizer.zero_grad()
            misfit = (generator(z_aux, z_rec) - target).square().sum((-2, -1))
            loss = (
                0.5 * misfit / noise_sd**2
                + 0.5 * aux_precision * z_aux.square().sum(-1)
                + 0.5 * z_rec.square().sum(-1)
            )
            loss.sum().backward()
            optimizer.step()
        with torch.no_grad():
            residuals.append((target - generator(z_aux, z_rec)).double().cpu().numpy())
        fitted.append(z_aux.detach().double().cpu().numpy())
    z_hat = np.concatenate(fitted)
    residuals = np.concatenate(residuals)
    error = z_hat - aux_std
    return TauCalibration(
        tau=np.sqrt(np.mean(error**2, axis=0)),
        bias=error.mean(axis=0),
        sd=error.std(axis=0),
        z_aux=z_hat,
        aux_standardized=aux_std,
        pixel_rmse=np.sqrt(np.mean(residuals**2, axis=(-2, -1))),
        residuals=residuals,
    )


class GRFFieldPrior(PyroModule):
    """Gaussian-random-field prior on the mesh nodes, emitting the site ``"field"``.

    With ``whiten=False`` the field is one multivariate-normal sample site,

    .. math:: \\text{field} \\sim \\mathcal{N}(m, C),

    reshaped to ``(size, size)``. With ``whiten=True`` the sampled site is
    ``"field_white" ~ N(0, I)`` and ``field = m + L w`` (``C = L L^T``) is deterministic; the
    two define the same prior, and the whitened one is far better conditioned for HMC.

    Parameters
    ----------
    grf : pyro_dlatent.inverse.grf.GRFPrior
        The Gaussian random field; its dense ``to_distribution()`` (Cholesky of the
        covariance, ``O(N^3)``) is built once, so this is meant for small grids.
    whiten : bool
        Sample standard-normal coordinates instead of the field itself.
    dtype : torch.dtype, optional
        Floating-point type of the sites (default: the default dtype).
    """

    def __init__(self, grf: Any, *, whiten: bool = False, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if not callable(getattr(grf, "to_distribution", None)) or not hasattr(grf, "size"):
            raise TypeError(f"grf must be a GRFPrior, got {type(grf).__name__}")
        self.grf = grf
        self.whiten = bool(whiten)
        self.field_shape = _field_shape(grf.size, "grf.size")
        dtype = torch.get_default_dtype() if dtype is None else dtype
        mvn = grf.to_distribution(dtype=dtype)
        n = self.field_shape[0] * self.field_shape[1]
        if mvn.event_shape != (n,):
            raise ValueError(
                f"grf.to_distribution() must have event shape ({n},), got {tuple(mvn.event_shape)}"
            )
        self.register_buffer("loc", mvn.loc.detach().clone())
        self.register_buffer("scale_tril", mvn.scale_tril.detach().clone())

    @property
    def dtype(self) -> torch.dtype:
        """Floating-point type of the sites."""
        return self.loc.dtype

    @property
    def device(self) -> torch.device:
        """Device of the sites."""
        return self.loc.device

    @property
    def latent_sites(self) -> tuple[str, ...]:
        """Sample sites whose posterior is exported."""
        return (WHITE_SITE,) if self.whiten else (FIELD_SITE,)

    def arviz_metadata(self) -> dict[str, Any]:
        """Dims and coords of :attr:`latent_sites` for ArviZ export."""
        if self.whiten:
            return {"dims": {WHITE_SITE: ["node"]}, "coords": {}, "attrs": {}}
        return {"dims": {FIELD_SITE: ["y", "x"]}, "coords": {}, "attrs": {}}

    def field_dist(self) -> dist.Distribution:
        """``N(m, C)`` with event shape ``(size, size)`` (the nodes in row-major order)."""
        n = self.loc.shape[-1]
        mvn = dist.MultivariateNormal(self.loc, scale_tril=self.scale_tril)
        reshape = torch.distributions.transforms.ReshapeTransform((n,), self.field_shape)
        return dist.TransformedDistribution(mvn, [reshape])

    def log_density(self, values: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Log prior density of the sampled site and the field, without Pyro's messengers.

        Parameters
        ----------
        values : mapping
            ``"field_white"`` ``(*batch, N)`` when whitened, else ``"field"``
            ``(*batch, size, size)``.

        Returns
        -------
        log_prob : Tensor, shape ``batch``
        field : Tensor, shape ``(*batch, size, size)``
        """
        if not self.whiten:
            field = values[FIELD_SITE]
            return self.field_dist().log_prob(field), field
        white = values[WHITE_SITE]
        log_prob = -0.5 * white.square().sum(-1) - 0.5 * white.shape[-1] * _LOG_2PI
        return log_prob, self._colour(white)

    def _colour(self, white: torch.Tensor) -> torch.Tensor:
        flat = self.loc + (white.unsqueeze(-2) @ self.scale_tril.mT).squeeze(-2)
        return flat.reshape(*flat.shape[:-1], *self.field_shape)

    def forward(self) -> torch.Tensor:
        """Emit the field site(s); return the field ``(*batch, size, size)``."""
        if not self.whiten:
            return pyro.sample(FIELD_SITE, self.field_dist())
        white = pyro.sample(
            WHITE_SITE,
            dist.Normal(torch.zeros_like(self.loc), torch.ones_like(self.loc)).to_event(1),
        )
        return pyro.deterministic(FIELD_SITE, self._colour(white), event_dim=2)


class InverseProblemModel(torch.nn.Module):
    """Field prior plus the Gaussian sensor likelihood: a plain Pyro model.

    .. math:: d \\sim \\mathcal{N}\\big(\\text{problem.forward}(\\text{field}),
              \\sigma^2 I\\big), \\qquad \\text{field} \\sim \\text{prior},

    emitted as the site ``"obs"`` (event shape ``(num_sensors,)``), observed when
    ``observations`` is given. Call it with no arguments; compose it with Pyro's handlers
    (``condition``, ``do``, ``trace``, ``reparam``, ``uncondition``) and autoguides as any model.

    It is a plain ``torch.nn.Module`` (not a ``PyroModule``), so one prior can serve many
    problems and observation sets.

    Parameters
    ----------
    problem : object
        ``forward(field (batch, H, W)) -> (batch, num_sensors)``, attributes ``noise_sd``
        (float or per-sensor array) and ``num_sensors``; optionally ``size``.
    prior : DeepPrior or GRFFieldPrior
        Any module whose call emits the field (with ``field_shape``, ``dtype``, ``device``).
    observations : array-like, shape ``(num_sensors,)``, optional
        Sensor data; ``None`` makes ``"obs"`` a free sample site (prior predictive).
    """

    def __init__(self, problem: Any, prior: PyroModule, observations: Any = None) -> None:
        super().__init__()
        require(problem, ForwardProblem, "problem")
        require(prior, FieldPrior, "prior")
        size = getattr(problem, "size", None)
        if size is not None and _field_shape(size, "problem.size") != tuple(prior.field_shape):
            raise ValueError(
                f"prior emits fields of shape {tuple(prior.field_shape)} but the problem's mesh "
                f"has {_field_shape(size, 'problem.size')} nodes"
            )
        num_sensors = int(problem.num_sensors)
        noise_sd = torch.as_tensor(np.asarray(problem.noise_sd, dtype=np.float64))
        if noise_sd.dim() > 1 or (noise_sd.dim() == 1 and noise_sd.shape[0] != num_sensors):
            raise ValueError(
                f"problem.noise_sd must be a scalar or have shape ({num_sensors},), "
                f"got {tuple(noise_sd.shape)}"
            )
        if not (torch.isfinite(noise_sd).all() and (noise_sd > 0).all()):
            raise ValueError(f"expected problem.noise_sd > 0, got {problem.noise_sd}")
        self.problem = problem
        self.prior = prior
        self.num_sensors = num_sensors
        dtype, device = prior.dtype, prior.device
        self.register_buffer("noise_sd", noise_sd.to(dtype=dtype, device=device))
        self._obs_log_norm = float(
            -torch.log(noise_sd).expand(num_sensors).sum() - 0.5 * num_sensors * _LOG_2PI
        )
        if observations is None:
            self.observations = None
        else:
            self.observations = check_observations(observations, num_sensors).to(
                dtype=dtype, device=device
            )

    def predict(self, field: torch.Tensor) -> torch.Tensor:
        """Noise-free sensor values ``problem.forward(field)`` over any leading batch shape.

        Parameters
        ----------
        field : Tensor, shape ``(*batch, H, W)``

        Returns
        -------
        Tensor, shape ``(*batch, num_sensors)``
        """
        batch = field.shape[:-2]
        if not torch.isfinite(field).all():
            # An overflowing field (a diverging HMC trajectory, a wild optimizer step) gets a
            # NaN likelihood, which samplers and optimizers treat as a rejected point, instead
            # of an exception from the forward solver.
            return field.new_full((*batch, self.num_sensors), math.nan).to(self.noise_sd.dtype)
        flat = field.reshape(-1, *field.shape[-2:])
        pred = self.problem.forward(flat)
        return pred.reshape(*batch, pred.shape[-1]).to(self.noise_sd.dtype)

    def obs_dist(self, field: torch.Tensor) -> dist.Distribution:
        """``Normal(problem.forward(field), noise_sd)`` with event shape ``(num_sensors,)``."""
        loc = self.predict(field)
        return dist.Normal(loc, self.noise_sd.expand(loc.shape)).to_event(1)

    def log_joint(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Log joint density ``log p(d, latents)`` as plain tensor algebra.

        Equals the sum of the log densities of the sites :meth:`forward` emits when conditioned
        on ``values`` (the fast path of :class:`~pyro_dlatent.inverse.infer.LatentPotential`).

        Parameters
        ----------
        values : mapping of str to Tensor
            The prior's latent sites, each ``(*batch, *event)``.

        Returns
        -------
        Tensor, shape ``batch``
        """
        if self.observations is None:
            raise ValueError("log_joint needs observations; the model was built without them")
        log_prior, field = self.prior.log_density(values)
        residual = (self.observations - self.predict(field)) / self.noise_sd
        return log_prior + self._obs_log_norm - 0.5 * residual.square().sum(-1)

    def forward(self) -> torch.Tensor:
        """Emit the prior's sites and ``"obs"``; return the field."""
        field = self.prior()
        pyro.sample(OBS_SITE, self.obs_dist(field), obs=self.observations)
        return field


def check_observations(observations: Any, num_sensors: int) -> torch.Tensor:
    """Validate sensor data: finite, real, shape ``(num_sensors,)``; return a float64 tensor."""
    if isinstance(observations, torch.Tensor):
        obs = observations.detach().cpu()
        if not obs.is_floating_point():
            obs = obs.to(torch.float64)
    else:
        try:
            arr = np.asarray(observations)
        except (TypeError, ValueError) as err:
            raise TypeError("observations must be a numeric array") from err
        if arr.dtype.kind not in "fiu":
            raise TypeError(f"observations must be numeric, got dtype {arr.dtype}")
        obs = torch.as_tensor(arr.astype(np.float64))
    if obs.shape != (num_sensors,):
        raise ValueError(
            f"observations must have shape ({num_sensors},) (one value per sensor), "
            f"got {tuple(obs.shape)}"
        )
    if not torch.isfinite(obs).all():
        raise ValueError("observations contain non-finite values")
    return obs.to(torch.float64)
