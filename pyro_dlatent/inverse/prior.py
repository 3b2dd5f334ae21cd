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
``"field_white"`` for the whitened GRF prior); :mod:`pyro_dlatent.inverse.sites` names them.

The prior of the auxiliaries (:class:`AuxPrior`, :mod:`pyro_dlatent.inverse.aux_prior`), the
GRF prior (:mod:`pyro_dlatent.inverse.grf_field`) and the calibration of ``tau``
(:func:`calibrate_tau`, :mod:`pyro_dlatent.inverse.tau`) live in their own modules and are
importable from here too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

from pyro_dlatent.inverse.aux_prior import AuxPrior
from pyro_dlatent.inverse.grf_field import GRFFieldPrior
from pyro_dlatent.inverse.protocols import FieldPrior, ForwardProblem, Generator, require
from pyro_dlatent.inverse.sites import (
    _LOG_2PI,
    FIELD_SITE,
    OBS_SITE,
    U_SITE,
    WHITE_SITE,
    _field_shape,
)
from pyro_dlatent.inverse.tau import TauCalibration, calibrate_tau
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
