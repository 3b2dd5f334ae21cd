"""The prior of the named auxiliaries in physical units: one vector-valued distribution."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch.distributions import constraints

from pyro_dlatent.latent import AuxScaler

__all__ = ["AuxPrior"]


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
