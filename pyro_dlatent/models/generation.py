"""The generation map: the guided block's distribution given the auxiliaries, for generation.

The prior ties ``z_aux`` to the standardized auxiliaries only softly, and a trained encoder
settles on its own smooth, monotone version of them, which the generator learns to read.
Generating at ``z_aux = u~`` then asks for the wrong physics, so the models generate from the
encoder's aggregate posterior of the guided block given the auxiliaries instead,

.. math:: z_{aux} \\mid \\tilde u \\sim \\mathcal{N}\\bigl(c + A \\tilde u
          + \\textstyle\\sum_i f_i(\\tilde u_i),\\ S\\bigr),

``f_i`` a natural cubic spline in auxiliary ``i`` with knots at the quantiles
:data:`SPLINE_KNOT_QUANTILES` (:func:`natural_spline_terms`; linear beyond the outer knots, so
requests past the training range extrapolate along a line), ``(c, A, f)`` the least-squares fit
of the encoder means and ``S`` the covariance of its residuals plus the mean encoder variance.

With ``K > 0`` neighbours, a draw does not take the residual from ``N(0, S)``: it keeps the
encoded calibration images and draws

.. math:: z_{aux} = m(\\tilde u) + r_j + s_j \\odot \\epsilon, \\qquad
          \\epsilon \\sim \\mathcal{N}(0, I),

``j`` uniform among the ``K`` calibration images nearest to ``u~`` (Euclidean in the
standardized auxiliaries requested; ties at the ``K``-th distance included), ``r_j`` its encoder
mean's residual from the map's mean ``m`` and ``s_j`` its encoder sd: the aggregate posterior
near ``u~`` moved to ``u~`` along ``m``, because the encoded guided block is not Gaussian about
its mean. Auxiliaries left out of a request are taken from the neighbour. The measurements
behind these choices are on the documentation's history page.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import xarray as xr

from pyro_dlatent.models.tensors import ModelTensors
from pyro_dlatent.validation import check_int

__all__ = [
    "GENERATION_NEIGHBOURS",
    "LEGACY_NAMES",
    "SPLINE_KNOT_QUANTILES",
    "SPLINE_MIN_IMAGES",
    "GenerationMap",
    "GenerationSampling",
    "natural_spline_terms",
]

SPLINE_KNOT_QUANTILES = (0.05, 0.275, 0.5, 0.725, 0.95)
"""Knots of the generation map's natural cubic splines: these quantiles of each auxiliary (the
placement of five knots that Harrell recommends in *Regression Modeling Strategies*)."""
SPLINE_MIN_IMAGES = 100
"""Fewest complete images for which :meth:`GenerationMap.fit` fits splines."""
GENERATION_NEIGHBOURS = 16
"""Default number of nearest calibration images a generated ``z_aux`` borrows its residual from."""

GAUSSIAN = ("fitted", "loc", "matrix", "scale_tril")
"""Buffers of the linear-Gaussian map."""
SPLINE = ("knots", "spline")
"""Its spline terms."""
TABLES = ("table_aux", "table_resid", "table_scale")
"""The encoded calibration images of the neighbour draws, one row each (size set by the data)."""
NEIGHBOURS = ("neighbours", *TABLES)
"""Buffers of the neighbour draws."""
LEGACY_NAMES = {f"guided_{name}": name for name in GAUSSIAN + SPLINE + NEIGHBOURS}
"""Checkpoint format 2 kept the map's buffers on the model as ``guided_<name>``."""
_NEIGHBOUR_ELEMENTS = 2**21
"""Distances between requested rows and calibration images computed at once (memory bound)."""


def natural_spline_terms(x: torch.Tensor, knots: torch.Tensor) -> torch.Tensor:
    r"""Non-linear terms of a natural (restricted) cubic spline in each column of ``x``.

    With knots :math:`t_1 < \dots < t_K` of column ``i``, term ``j = 1 .. K - 2`` is

    .. math::
        \frac{(x - t_j)_+^3 - (x - t_{K-1})_+^3 \frac{t_K - t_j}{t_K - t_{K-1}}
              + (x - t_K)_+^3 \frac{t_{K-1} - t_j}{t_K - t_{K-1}}}{(t_K - t_1)^2},

    so that ``[1, x, terms]`` spans the cubic splines with these knots that are linear beyond
    the outer two (no wild extrapolation past the data).

    Parameters
    ----------
    x : Tensor, shape ``(n, k)``
    knots : Tensor, shape ``(k, K)``, ``K >= 3``, each row strictly increasing

    Returns
    -------
    Tensor, shape ``(n, k * (K - 2))``: the terms of column ``i`` at ``i * (K - 2) + j``.
    """
    t = knots.to(x.dtype)
    first, previous, last = t[:, :1], t[:, -2:-1], t[:, -1:]
    inner = t[:, :-2]  # (k, K - 2)
    x = x.unsqueeze(-1)  # (n, k, 1)
    terms = (
        (x - inner).clamp_min(0).pow(3)
        - (x - previous).clamp_min(0).pow(3) * (last - inner) / (last - previous)
        + (x - last).clamp_min(0).pow(3) * (previous - inner) / (last - previous)
    ) / (last - first).pow(2)
    return terms.reshape(x.shape[0], -1)


def _placeholder_knots(k: int) -> torch.Tensor:
    """Evenly spaced knots: harmless with zero spline coefficients (the unfitted map)."""
    return torch.linspace(-2.0, 2.0, len(SPLINE_KNOT_QUANTILES)).repeat(k, 1)


class GenerationMap(torch.nn.Module):
    """The fitted distribution of ``z_aux`` given standardized auxiliaries (module docstring).

    Until :meth:`fit` runs it is unfitted (:attr:`fitted` is ``False``) and its owner draws from
    the prior. Its buffers travel in the owner's ``state_dict`` under ``generation.``; the
    neighbour tables are sized by the calibration data, so loading first sizes them from the
    state (:meth:`size_tables`).

    Parameters
    ----------
    aux_dim : int
        Number of auxiliaries ``k``.
    """

    def __init__(self, aux_dim: int) -> None:
        super().__init__()
        k = check_int(aux_dim, "aux_dim", 1)
        self.aux_dim = k
        inner = len(SPLINE_KNOT_QUANTILES) - 2
        self.register_buffer("fitted", torch.tensor(False))
        self.register_buffer("loc", torch.zeros(k))
        self.register_buffer("matrix", torch.eye(k))
        self.register_buffer("scale_tril", torch.zeros(k, k))
        self.register_buffer("knots", _placeholder_knots(k))
        self.register_buffer("spline", torch.zeros(k, k * inner))
        self.register_buffer("neighbours", torch.tensor(0))
        for name in TABLES:
            self.register_buffer(name, torch.zeros(0, k))

    @property
    def device(self) -> torch.device:
        return self.loc.device

    @property
    def is_fitted(self) -> bool:
        """Whether :meth:`fit` has run (the buffer ``fitted`` as a bool)."""
        return bool(self.fitted)

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget the map: the owner draws the guided block from the prior again."""
        with torch.no_grad():
            self.fitted.fill_(False)
            self.loc.zero_()
            self.matrix.copy_(torch.eye(self.aux_dim, device=self.device))
            self.scale_tril.zero_()
        self.reset_spline()
        self.reset_tables()

    def reset_spline(self) -> None:
        """The linear map: zero spline terms."""
        with torch.no_grad():
            self.knots.copy_(_placeholder_knots(self.aux_dim))
            self.spline.zero_()

    def reset_tables(self) -> None:
        """No neighbour draws: :meth:`sample` uses the Gaussian map."""
        self.neighbours.fill_(0)
        for name in TABLES:
            setattr(self, name, torch.zeros(0, self.aux_dim, device=self.device))

    def state(self) -> dict[str, torch.Tensor]:
        """A copy of every buffer, keyed by its name here."""
        return {name: value.detach().clone() for name, value in self.named_buffers()}

    def size_tables(self, source: Mapping[str, Any], what: str, prefix: str = "") -> None:
        """Size the neighbour tables as in the state ``source`` (keys ``prefix + name``)."""
        shapes = {
            name: tuple(source[prefix + name].shape)
            for name in TABLES
            if isinstance(source.get(prefix + name), torch.Tensor)
        }
        if not shapes:
            return
        rows = {shape[0] for shape in shapes.values()}
        if (
            len(shapes) != len(TABLES)
            or len(rows) != 1
            or any(shape[1:] != (self.aux_dim,) for shape in shapes.values())
        ):
            raise ValueError(f"{what} holds neighbour tables of mismatched shapes {shapes}")
        for name, shape in shapes.items():
            setattr(self, name, torch.zeros(shape, device=self.device))

    def check(self, what: str) -> None:
        """Refuse a neighbour count that the table cannot serve."""
        count, rows = int(self.neighbours), self.table_aux.shape[0]
        if not 0 <= count <= rows or (count == 0) != (rows == 0):
            raise ValueError(f"{what} holds {count} neighbours for a table of {rows} images")

    def load_state(self, state: Mapping[str, Any], what: str) -> None:
        """Load a :meth:`state`, or one from before the neighbour draws (its Gaussian map)."""
        own = dict(self.named_buffers())
        if not set(GAUSSIAN + SPLINE) <= set(state) or not set(state) <= set(own):
            raise ValueError(f"{what} holds a generation map with buffers {sorted(state)}")
        self.size_tables(state, what)
        own = dict(self.named_buffers())
        for name, value in state.items():
            if not isinstance(value, torch.Tensor) or value.shape != own[name].shape:
                raise ValueError(f"{what} holds a generation map of another shape")
        with torch.no_grad():
            for name, value in state.items():
                own[name].copy_(value)
        if not set(NEIGHBOURS) <= set(state):
            self.reset_tables()
        self.check(what)

    # ------------------------------------------------------------------ fitting
    def fit(
        self,
        aux: torch.Tensor,
        loc: torch.Tensor,
        scale: torch.Tensor,
        *,
        spline: bool = True,
        neighbours: int = GENERATION_NEIGHBOURS,
    ) -> dict[str, np.ndarray]:
        """Fit the map to encoded calibration images with every auxiliary observed.

        Parameters
        ----------
        aux : Tensor, shape ``(n, k)``
            Standardized auxiliaries, ``n >= k + 2``.
        loc, scale : Tensor, shape ``(n, k)``
            Encoder means and sds of the guided block.
        spline : bool
            Fit the spline terms (with at least :data:`SPLINE_MIN_IMAGES` images and, for each
            auxiliary, distinct knots); ``False`` gives the linear-Gaussian map.
        neighbours : int
            ``K`` of the neighbour draws (at most ``n`` are used); 0 draws from ``N(m, S)``.

        Returns
        -------
        dict
            ``loc`` ``(k,)``, ``matrix`` ``(k, k)``, ``knots`` ``(k, K)``, ``spline``
            ``(k, k (K - 2))`` (zero where unused), ``covariance`` ``(k, k)``, as numpy arrays.
        """
        neighbours = check_int(neighbours, "neighbours", 0)
        k = self.aux_dim
        n = aux.shape[0]
        if aux.shape != (n, k) or loc.shape != (n, k) or scale.shape != (n, k):
            raise ValueError(
                f"expected aux, loc and scale of shape (n, {k}), got {tuple(aux.shape)}, "
                f"{tuple(loc.shape)} and {tuple(scale.shape)}"
            )
        if n < k + 2:
            raise ValueError(f"the map needs at least {k + 2} images, got {n}")
        aux, encoded = aux.double(), loc.double()
        variance = scale.double().pow(2).mean(dim=0)
        inner = len(SPLINE_KNOT_QUANTILES) - 2
        knots = _placeholder_knots(k).double().to(aux.device)
        used = torch.zeros(k, dtype=torch.bool, device=aux.device)
        if spline and n >= SPLINE_MIN_IMAGES:
            levels = torch.tensor(SPLINE_KNOT_QUANTILES, dtype=torch.float64, device=aux.device)
            quantiles = torch.quantile(aux, levels, dim=0).T  # (k, K)
            gaps = quantiles.diff(dim=1)
            used = (gaps > 1e-6 * (quantiles[:, -1:] - quantiles[:, :1]).clamp_min(1e-12)).all(1)
            knots[used] = quantiles[used]
        columns = used.repeat_interleave(inner)
        terms = natural_spline_terms(aux, knots)[:, columns]
        ones = torch.ones(n, 1, dtype=torch.float64, device=aux.device)
        design = torch.cat([ones, aux, terms], dim=1)
        coef = torch.linalg.lstsq(design, encoded).solution
        resid = encoded - design @ coef
        covariance = resid.T @ resid / max(n - design.shape[1], 1) + torch.diag(variance)
        scale_tril = torch.linalg.cholesky(covariance)
        spline_coef = torch.zeros(k, k * inner, dtype=torch.float64, device=aux.device)
        spline_coef[:, columns] = coef[1 + k :].T
        with torch.no_grad():
            self.loc.copy_(coef[0].float())
            self.matrix.copy_(coef[1 : 1 + k].T.float())
            self.knots.copy_(knots.float())
            self.spline.copy_(spline_coef.float())
            self.scale_tril.copy_(scale_tril.float())
            self.fitted.fill_(True)
            self.neighbours.fill_(min(neighbours, n))
            tables = (aux, resid, scale) if neighbours else ()
            for name, value in zip(TABLES, tables, strict=False):
                setattr(self, name, value.float().to(self.device))
            if not neighbours:
                self.reset_tables()
        return {
            "loc": coef[0].cpu().numpy(),
            "matrix": coef[1 : 1 + k].T.cpu().numpy(),
            "knots": knots.cpu().numpy(),
            "spline": spline_coef.cpu().numpy(),
            "covariance": covariance.cpu().numpy(),
        }

    # ------------------------------------------------------------------ use
    def mean(self, standardized: torch.Tensor) -> torch.Tensor:
        """``c + A u~ + sum_i f_i(u~_i)`` at standardized auxiliaries ``(n, k)``."""
        terms = natural_spline_terms(standardized, self.knots)
        return self.loc + standardized @ self.matrix.T + terms @ self.spline.T.to(terms.dtype)

    def sample(
        self,
        standardized: torch.Tensor,
        observed: torch.Tensor,
        noise: torch.Tensor,
        fill: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``z_aux`` at rows of standardized auxiliaries, some of them missing.

        Parameters
        ----------
        standardized, observed : Tensor, shape ``(n, k)``
            Requested values and which of them were given.
        noise : Tensor, shape ``(n, k)``
            Standard normal draws that perturb ``z_aux``.
        fill : Tensor, shape ``(n, k)``
            Standard normal draws that stand in for missing auxiliaries (Gaussian map only).
        generator : torch.Generator, optional
            Of the neighbour picks (default: the global torch RNG).
        """
        if int(self.neighbours) > 0:
            pick = self._neighbours(standardized, observed, generator)
            filled = torch.where(observed, standardized, self.table_aux[pick])
            return self.mean(filled) + self.table_resid[pick] + self.table_scale[pick] * noise
        filled = torch.where(observed, standardized, fill)
        return self.mean(filled) + noise @ self.scale_tril.T

    def _neighbours(
        self, standardized: torch.Tensor, observed: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Index of one calibration image per row, uniform among its ``K`` nearest (ties in)."""
        table = self.table_aux
        count = int(self.neighbours)
        chunk = max(1, _NEIGHBOUR_ELEMENTS // table.shape[0])
        picks = []
        for start in range(0, standardized.shape[0], chunk):
            rows = standardized[start : start + chunk, None, :]
            seen = observed[start : start + chunk, None, :]
            distance = torch.where(seen, rows - table, 0.0).pow(2).sum(-1)
            kth = distance.kthvalue(count, dim=1, keepdim=True).values
            near = (distance <= kth).float()
            picks.append(torch.multinomial(near, 1, generator=generator)[:, 0])
        return torch.cat(picks)


class GenerationSampling:
    """Drawing latent codes for generation, a part of ``GuidedLatentModel``.

    Uses the model's ``generation`` (a :class:`GenerationMap`), ``split``, ``scaler``,
    ``encode``, ``prepare`` and ``device``.
    """

    generation: GenerationMap

    def _aux_rows(self, aux: Mapping[str, Any] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Physical auxiliaries (possibly partial) to standardized rows and an observed mask."""
        k = self.aux_dim
        if aux is None:
            return (
                torch.zeros(1, k, device=self.device),
                torch.zeros(1, k, dtype=torch.bool, device=self.device),
            )
        if not isinstance(aux, Mapping):
            raise TypeError("aux must be a mapping of auxiliary names to values in physical units")
        unknown = [name for name in aux if name not in self.scaler.names]
        if unknown:
            raise ValueError(
                f"aux has unknown auxiliary names {unknown}; expected names in {self.scaler.names}"
            )
        columns: dict[str, np.ndarray] = {}
        for name, values in aux.items():
            try:
                column = np.atleast_1d(np.asarray(values, dtype=np.float64))
            except (TypeError, ValueError) as err:
                raise TypeError(f"aux[{name!r}] must be numeric") from err
            if column.ndim != 1 or column.size == 0:
                raise ValueError(f"aux[{name!r}] must be a scalar or a non-empty 1-d array")
            if not np.isfinite(column).all():
                raise ValueError(f"aux[{name!r}] contains non-finite values")
            columns[name] = column
        lengths = {c.size for c in columns.values()} - {1}
        if len(lengths) > 1:
            raise ValueError(
                f"aux values must be scalars or share one length, got {sorted(lengths)}"
            )
        n = lengths.pop() if lengths else 1
        physical = np.full((n, k), np.nan)
        for j, name in enumerate(self.scaler.names):
            if name in columns:
                physical[:, j] = columns[name]
        standardized = self.scaler.transform(physical)
        observed = np.isfinite(standardized)
        return (
            torch.as_tensor(np.where(observed, standardized, 0.0), dtype=torch.float32).to(
                self.device
            ),
            torch.as_tensor(observed).to(self.device),
        )

    def _generation_state(self) -> dict[str, torch.Tensor]:
        return self.generation.state()

    @property
    def generation_calibrated(self) -> bool:
        """Whether :meth:`calibrate_generation` has fitted the guided block's generation map."""
        return self.generation.is_fitted

    def reset_generation(self) -> None:
        """Forget the generation map: :meth:`sample_latent` draws from the prior again."""
        self.generation.reset()

    def calibrate_generation(
        self,
        data: xr.Dataset | ModelTensors,
        *,
        batch_size: int = 256,
        spline: bool = True,
        neighbours: int = GENERATION_NEIGHBOURS,
    ) -> dict[str, np.ndarray]:
        """Fit the distribution of the encoded guided block given the auxiliaries, for generation.

        Generating at ``z_aux = u~`` asks for the wrong physics, because a trained encoder
        settles on its own smooth, monotone version of the auxiliaries; this fits the encoder's
        aggregate posterior of ``z_aux`` given them (:class:`GenerationMap`: a spline mean, a
        Gaussian spread and, with ``neighbours > 0``, the residuals of the nearest calibration
        images), saved with the model and used by :meth:`sample_latent`.

        The model's ``fit`` ends with this on its training part for classes with
        ``calibrate_after_fit`` (``DLCFM``; not ``AuxVAE``, whose decoder means it made worse).
        The inverse-problem deep prior is unaffected (it keeps the model's prior).

        Parameters
        ----------
        data : xarray.Dataset or ModelTensors
            Labelled images; at least ``aux_dim + 2`` with every auxiliary observed.
        batch_size : int
            Images encoded at once.
        spline : bool
            Fit the spline terms; ``False`` gives the linear-Gaussian map.
        neighbours : int
            ``K`` of the neighbour draws (:data:`GENERATION_NEIGHBOURS`; at most the number of
            complete images is used); 0 draws from ``N(m(u~), S)``.

        Returns
        -------
        dict
            As :meth:`GenerationMap.fit`.
        """
        neighbours = check_int(neighbours, "neighbours", 0)
        tensors = data if isinstance(data, ModelTensors) else self.prepare(data, name="data")
        complete = (
            torch.ones(tensors.aux.shape[0], dtype=torch.bool, device=tensors.aux.device)
            if tensors.mask is None
            else tensors.mask.all(dim=1)
        )
        n = int(complete.sum())
        if n < self.aux_dim + 2:
            raise ValueError(
                f"data needs at least {self.aux_dim + 2} images with every auxiliary observed to "
                f"calibrate generation, got {n}"
            )
        encoding = self.encode(tensors.images[complete], batch_size=batch_size)
        return self.generation.fit(
            tensors.aux[complete],
            encoding.z_aux_loc,
            encoding.z_aux_scale,
            spline=spline,
            neighbours=neighbours,
        )

    def guided_mean(self, standardized: torch.Tensor) -> torch.Tensor:
        """Mean of ``z_aux`` for generation at standardized auxiliaries ``(n, aux_dim)``.

        The generation map's mean once :meth:`calibrate_generation` has run, else the prior
        mean ``u~``.
        """
        if not self.generation_calibrated:
            return standardized
        return self.generation.mean(standardized)

    def sample_latent(
        self, aux: Mapping[str, Any] | None = None, num: int = 1, *, seed: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw latent codes for generation at auxiliaries given in physical units.

        Before :meth:`calibrate_generation` (which ``DLCFM.fit`` runs at its end), from the
        prior: ``z_aux ~ N(u~, tau^2)`` for the auxiliaries given and the marginal
        ``N(0, 1 + tau^2)`` for those left out. After it, from the encoder's aggregate
        posterior near ``u~``: by default the residual of one of the nearest calibration images
        moved to ``u~``, with the auxiliaries left out taken from that image; with
        ``calibrate_generation(..., neighbours=0)``, ``z_aux ~ N(m(u~), S)`` with each
        auxiliary left out drawn as ``u~_j ~ N(0, 1)`` first. Always ``z_rec ~ N(0, I)``.

        Parameters
        ----------
        aux : mapping of name to scalar or 1-d array, optional
            Physical values; scalars broadcast against arrays of one common length ``n``
            (``n = 1`` for scalars only). Missing names are drawn from their marginal.
        num : int
            Draws per auxiliary row.
        seed : int, optional
            Seed of a private generator (default: the global torch RNG).

        Returns
        -------
        z_aux : Tensor, shape ``(n * num, aux_dim)``
        z_rec : Tensor, shape ``(n * num, residual_dim)``
            Row ``i * num + j`` is draw ``j`` at auxiliary row ``i``.
        """
        num = check_int(num, "num", 1)
        standardized, observed = self._aux_rows(aux)
        standardized = standardized.repeat_interleave(num, dim=0)
        observed = observed.repeat_interleave(num, dim=0)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(check_int(seed, "seed", 0))
        k, latent = self.aux_dim, self.latent_dim
        if self.generation_calibrated:
            noise = torch.randn(
                (standardized.shape[0], latent + k), generator=generator, device=self.device
            )
            z_aux = self.generation.sample(
                standardized, observed, noise[:, :k], noise[:, latent:], generator
            )
            return z_aux, noise[:, k:latent]
        prior = self.split.aux_dist(standardized, observed).base_dist
        noise = torch.randn(
            (standardized.shape[0], latent), generator=generator, device=self.device
        )
        with torch.no_grad():
            z_aux = prior.loc + prior.scale * noise[:, :k]
        return z_aux, noise[:, k:]
