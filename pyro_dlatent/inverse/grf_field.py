"""The Gaussian-random-field baseline as a field prior: a Pyro module emitting ``"field"``.

It wraps the dense Gaussian of :class:`pyro_dlatent.inverse.grf.GRFPrior`, so that the GRF and
the deep prior of :mod:`pyro_dlatent.inverse.prior` serve the same inverse-problem model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

from pyro_dlatent.inverse.sites import _LOG_2PI, FIELD_SITE, WHITE_SITE, _field_shape

__all__ = ["GRFFieldPrior"]


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
