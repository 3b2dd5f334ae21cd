"""The exact posterior of a source problem whose truth is a Gaussian bump plus a Gaussian field.

For the ``sources`` simulator the truth is :math:`f = b(u) + r` with :math:`b(u)` the bump of the
named parameters :math:`u = (x_0, y_0, \\log A, w)` and :math:`r \\sim \\mathcal N(0, C)` the
Matérn residual, and the source problem is linear, :math:`d = A f + e`,
:math:`e \\sim \\mathcal N(0, \\sigma^2 I)`. The residual integrates out in closed form,

.. math::

    d \\mid u \\sim \\mathcal N\\bigl(A\\, b(u),\\; \\Sigma\\bigr), \\qquad
    \\Sigma = A C A^\\top + \\sigma^2 I,

so the posterior of the four named parameters under the simulator's own prior (uniform centre and
width, log-uniform amplitude) is a four-dimensional integral that :class:`ExactBumpPosterior`
computes on a grid (midpoint rule, refined where the mass is), and given :math:`u` the residual
is Gaussian conditioning with a covariance that does not depend on :math:`u`:

.. math::

    r \\mid d, u \\sim \\mathcal N\\bigl(K (d - A\\, b(u)),\\; C - K A C\\bigr), \\qquad
    K = C A^\\top \\Sigma^{-1}.

Mixing over the posterior of :math:`u` gives the exact posterior mean and sd *fields*. No prior can
beat it on average on this simulator: it is the reference the deep prior is measured against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xarray as xr

from pyro_dlatent.data.sources import (
    gaussian_bump,
    grid,
    residual_covariance,
    sample_matern_field,
)

__all__ = [
    "NAMES",
    "BumpMean",
    "BumpPrior",
    "ExactBumpPosterior",
    "aux_posterior_means",
    "bump_field",
    "exact_collapsed",
    "known_bump_mean",
    "residual_whitener",
    "sample_problem",
]

NAMES = ("x0", "y0", "log_amplitude", "width")
"""The named parameters, in the order of every array here."""


@dataclass(frozen=True)
class BumpPrior:
    """The ``sources`` simulator's prior: its parameter box and its residual field.

    ``x0``, ``y0`` ~ Uniform(``center_range``), ``log_amplitude`` ~ Uniform(log
    ``amplitude_range``), ``width`` ~ Uniform(``width_range``); the residual is the Matérn field of
    ``residual_sd``, ``length_scale`` and ``smoothness``. The defaults are
    :func:`pyro_dlatent.data.sources.simulate`'s.
    """

    center_range: tuple[float, float] = (0.2, 0.8)
    amplitude_range: tuple[float, float] = (1.0, 10.0)
    width_range: tuple[float, float] = (0.05, 0.15)
    residual_sd: float = 0.25
    length_scale: float = 0.15
    smoothness: float = 1.0

    def __post_init__(self) -> None:
        for name in ("center_range", "amplitude_range", "width_range"):
            lo, hi = getattr(self, name)
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"expected {name} (lo, hi) with lo < hi, got {(lo, hi)!r}")
        if self.amplitude_range[0] <= 0 or self.width_range[0] <= 0:
            raise ValueError("expected amplitude_range and width_range above 0")
        for name in ("residual_sd", "length_scale", "smoothness"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"expected {name} > 0, got {value!r}")

    @classmethod
    def from_dataset(cls, dataset: xr.Dataset) -> BumpPrior:
        """The prior a ``sources`` dataset was simulated with (its ``attrs``)."""
        attrs = dataset.attrs
        if attrs.get("simulator") != "sources":
            raise ValueError(
                f"dataset was simulated by {attrs.get('simulator')!r}, not 'sources': its prior "
                "is not a bump plus a Matérn field"
            )
        return cls(
            center_range=tuple(attrs["center_range"]),
            amplitude_range=tuple(attrs["amplitude_range"]),
            width_range=tuple(attrs["width_range"]),
            residual_sd=float(attrs["residual_sd"]),
            length_scale=float(attrs["length_scale"]),
            smoothness=float(attrs["smoothness"]),
        )

    @property
    def bounds(self) -> np.ndarray:
        """Box of ``(x0, y0, log_amplitude, width)``, shape ``(4, 2)``."""
        lo_a, hi_a = self.amplitude_range
        return np.array(
            [
                self.center_range,
                self.center_range,
                (math.log(lo_a), math.log(hi_a)),
                self.width_range,
            ]
        )

    def sample(self, num: int, rng: np.random.Generator) -> np.ndarray:
        """``num`` draws of ``u``, shape ``(num, 4)`` (uniform in the box)."""
        bounds = self.bounds
        return rng.uniform(bounds[:, 0], bounds[:, 1], size=(num, 4))

    def covariance(self, size: int) -> np.ndarray:
        """The residual's covariance ``C`` on the ``size x size`` node grid."""
        return residual_covariance(
            size, sd=self.residual_sd, length_scale=self.length_scale, smoothness=self.smoothness
        )

    def u_prior(self) -> dict[str, Any]:
        """The box as Pyro distributions, one ``Uniform`` per name (``DeepPrior(u_prior=...)``)."""
        import pyro.distributions as dist

        return {
            name: dist.Uniform(float(lo), float(hi))
            for name, (lo, hi) in zip(NAMES, self.bounds, strict=True)
        }


def bump_field(
    u: Any, size: int, rng: np.random.Generator, prior: BumpPrior | None = None
) -> np.ndarray:
    """A field ``b(u) + r`` of the simulator, ``(size, size)``, with ``r`` drawn from ``prior``."""
    prior = BumpPrior() if prior is None else prior
    t = grid(size)
    residual = sample_matern_field(
        1,
        size,
        sd=prior.residual_sd,
        length_scale=prior.length_scale,
        smoothness=prior.smoothness,
        rng=rng,
    )[0]
    return gaussian_bump(t, t, *([v] for v in np.asarray(u, dtype=np.float64)))[0] + residual


class BumpMean(torch.nn.Module):
    """The ``sources`` bump as a generator: ``conditional_mean(s)`` is :math:`b(u)` exactly.

    With :meth:`residual` it is the "parametric mean plus Gaussian residual field" prior of the
    simulator, usable wherever a trained generator is
    (:func:`~pyro_dlatent.inverse.collapsed.infer_collapsed`; see :func:`exact_collapsed`).

    Parameters
    ----------
    size : int
        Nodes per side.
    prior : BumpPrior, optional
    """

    def __init__(self, size: int, prior: BumpPrior | None = None) -> None:
        from pyro_dlatent.latent import AuxScaler

        super().__init__()
        self.prior = BumpPrior() if prior is None else prior
        self.aux_dim, self.residual_dim, self.image_size = 4, 1, int(size)
        bounds = self.prior.bounds
        # standardized coordinates of the box's uniform law: mean 0, sd 1 per parameter
        self.scaler = AuxScaler(list(NAMES))
        self.scaler.fit(np.stack([bounds[:, 0], bounds.mean(1), bounds[:, 1]]))
        self.register_buffer("t", torch.as_tensor(grid(self.image_size)))
        self._unit = torch.nn.Parameter(torch.ones((), dtype=torch.float64), requires_grad=False)

    def conditional_mean(self, s: torch.Tensor) -> torch.Tensor:
        """:math:`b(u)` at standardized ``s`` ``(*batch, 4)``, float64 ``(*batch, size, size)``."""
        u = self.scaler.inverse_transform_tensor(s.double())
        x0, y0, log_amp, width = (u[..., j, None, None] for j in range(4))
        square = (self.t[None, :] - x0) ** 2 + (self.t[:, None] - y0) ** 2
        return torch.exp(log_amp - 0.5 * square / width**2)

    def forward(self, z_aux: torch.Tensor, z_rec: torch.Tensor) -> torch.Tensor:
        """The bump (the residual block is not used)."""
        return self.conditional_mean(z_aux)

    def residual(self) -> Any:
        """The simulator's Matérn field as a :class:`~pyro_dlatent.residual.ResidualField`."""
        from pyro_dlatent.residual import ResidualField

        box = self.scaler.transform(self.prior.bounds.T).T
        return ResidualField.from_covariance(self.prior.covariance(self.image_size), box)


def exact_collapsed(
    problem: Any, observations: Any, prior: BumpPrior | None = None, **kwargs: Any
) -> Any:
    """The exact posterior through the collapsed prior's entry point (an ``InferenceResult``).

    :func:`~pyro_dlatent.inverse.collapsed.infer_collapsed` with :class:`BumpMean` and the
    simulator's residual: the same ArviZ data, health and samplers as a deep prior's result.
    """
    from pyro_dlatent.inverse.collapsed import infer_collapsed

    mean = BumpMean(int(problem.size), prior)
    return infer_collapsed(problem, mean, observations, residual=mean.residual(), **kwargs)


def known_bump_mean(problem: Any, u: Any, observations: Any, covariance: Any) -> np.ndarray:
    r"""Posterior mean of the field when the bump is known and only the residual is not.

    With :math:`f = b(u) + r`, :math:`r \sim \mathcal N(0, C)` and :math:`d = A f + e`,
    :math:`e \sim \mathcal N(0, \sigma^2 I)`, Gaussian conditioning gives

    .. math:: E[f \mid d, u] = b(u) + C A^\top (A C A^\top + \sigma^2 I)^{-1} (d - A\, b(u)).

    The error of this mean is the floor of any prior that is sure of the bump: an oracle.

    Parameters
    ----------
    problem : SourceProblem
        Its ``sensor_operator`` ``A`` (``(m, size**2)``), ``noise_sd`` and ``size``.
    u : array-like, shape ``(n, 4)``
        The true ``x0, y0, log_amplitude, width`` of each problem.
    observations : array-like, shape ``(n, m)``
    covariance : array-like, shape ``(size**2, size**2)``
        ``C``, e.g. :meth:`BumpPrior.covariance`.

    Returns
    -------
    numpy.ndarray, shape ``(n, size, size)``
    """
    u = np.atleast_2d(np.asarray(u, dtype=np.float64))
    size = int(problem.size)
    t = grid(size)
    bumps = gaussian_bump(t, t, *(u[:, j] for j in range(4))).reshape(len(u), -1)
    operator = np.asarray(problem.sensor_operator, dtype=np.float64)
    cross = np.asarray(covariance, dtype=np.float64) @ operator.T
    gram = operator @ cross + problem.noise_sd**2 * np.eye(operator.shape[0])
    innovation = np.asarray(observations, dtype=np.float64).reshape(len(u), -1) - bumps @ operator.T
    mean = bumps + np.linalg.solve(gram, innovation.T).T @ cross.T
    return mean.reshape(-1, size, size)


def sample_problem(
    index: int, *, seed: int = 0, size: int = 32, noise_fraction: float = 0.02
) -> tuple[np.ndarray, Any, np.ndarray, np.ndarray]:
    """Inverse problem ``index`` of a study: true ``u``, the problem, observations, true field.

    ``u`` from :class:`BumpPrior`, the field :func:`bump_field`, observed by 25 sensors with noise
    of sd ``noise_fraction`` times the range of the clean data (the demo's rule); all drawn from
    ``numpy.random.default_rng((seed, index))``, so problem ``index`` is the same whatever shard
    of a study computes it.
    """
    from pyro_dlatent.inverse.fem import SourceProblem, default_sensors, simulate_observations

    rng = np.random.default_rng((seed, index))
    u = BumpPrior().sample(1, rng)[0]
    field = bump_field(u, size, rng)
    sensors = default_sensors(5)
    clean = SourceProblem(size, sensors, 1.0).forward(torch.as_tensor(field)).numpy()
    noise_sd = float(noise_fraction * (clean.max() - clean.min()))
    problem = SourceProblem(size, sensors, noise_sd)
    values = simulate_observations(problem, torch.as_tensor(field), seed=rng).numpy()
    return u, problem, values, field


class ExactBumpPosterior:
    """Posterior of ``u`` and of the field for a linear problem under a :class:`BumpPrior`.

    The posterior of ``u`` is evaluated on a grid of cell midpoints, ``points`` per axis of
    ``(x0, y0, width)`` and ``amplitudes`` log amplitudes; a second pass puts the same grid on the
    box that holds all but ``1e-9`` of the first pass's mass (one cell wider on each side), so that
    narrow posteriors of bright bumps are resolved as well as broad ones of faint bumps. Draws
    jitter uniformly inside their cell.

    Parameters
    ----------
    problem : SourceProblem
        Its ``sensor_operator`` ``A`` (``(m, size**2)``), ``noise_sd`` and ``size``.
    observations : array-like, shape ``(m,)``
    prior : BumpPrior, optional
        The simulator's prior (default :class:`BumpPrior()`).
    points, amplitudes : int
        Grid points per axis of the centre and width, and of the log amplitude.
    covariance : array, shape ``(size**2, size**2)``, optional
        ``C``, if already computed (it depends only on the prior and the size).
    """

    def __init__(
        self,
        problem: Any,
        observations: Any,
        prior: BumpPrior | None = None,
        *,
        points: int = 48,
        amplitudes: int = 96,
        covariance: np.ndarray | None = None,
    ) -> None:
        self.prior = BumpPrior() if prior is None else prior
        operator = np.asarray(problem.sensor_operator, dtype=np.float64)
        self.size = int(problem.size)
        if operator.shape[1] != self.size**2:
            raise ValueError(
                f"problem.sensor_operator has {operator.shape[1]} columns, expected size**2 = "
                f"{self.size**2}"
            )
        data = np.asarray(observations, dtype=np.float64).reshape(-1)
        if data.shape != (operator.shape[0],) or not np.isfinite(data).all():
            raise ValueError(
                f"observations must be {operator.shape[0]} finite values, got shape {data.shape}"
            )
        for name, value in (("points", points), ("amplitudes", amplitudes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 4:
                raise ValueError(f"expected {name} >= 4 (an int), got {value!r}")
        noise = np.broadcast_to(np.asarray(problem.noise_sd, dtype=np.float64), data.shape)
        cov = self.prior.covariance(self.size) if covariance is None else covariance
        self.operator, self.observations, self.covariance = operator, data, cov
        sigma = operator @ cov @ operator.T + np.diag(noise**2)
        self._chol = np.linalg.cholesky(sigma)
        self._gain = np.linalg.solve(sigma, operator @ cov).T  # K = C A^T Sigma^-1, (N, m)
        self._white_operator = np.linalg.solve(self._chol, operator)  # L^-1 A
        self._white_data = np.linalg.solve(self._chol, data)
        self._log_det = 2.0 * np.log(np.diag(self._chol)).sum()
        self.points, self.amplitudes = points, amplitudes
        bounds = self.prior.bounds
        self._evaluate(bounds)
        self._evaluate(self._support(bounds))

    # ------------------------------------------------------------------ the grid
    def _axes(self, box: np.ndarray) -> list[np.ndarray]:
        counts = (self.points, self.points, self.amplitudes, self.points)
        return [
            lo + (np.arange(n) + 0.5) * (hi - lo) / n
            for (lo, hi), n in zip(box, counts, strict=True)
        ]

    def log_likelihood(self, u: np.ndarray) -> np.ndarray:
        """``log p(d | u)`` of parameters ``u`` ``(n, 4)``: the Gaussian marginal of the data."""
        u = np.atleast_2d(np.asarray(u, dtype=np.float64))
        t = grid(self.size)
        bumps = gaussian_bump(t, t, u[:, 0], u[:, 1], u[:, 2], u[:, 3]).reshape(len(u), -1)
        residual = self._white_data[None] - bumps @ self._white_operator.T
        m = len(self.observations)
        return -0.5 * (residual**2).sum(-1) - 0.5 * self._log_det - 0.5 * m * math.log(2 * math.pi)

    def _evaluate(self, box: np.ndarray) -> None:
        """Log posterior (up to a constant) on the midpoint grid of ``box``, normalized weights."""
        x0, y0, log_amp, width = self._axes(box)
        t = grid(self.size)
        white = self._white_operator.reshape(-1, self.size, self.size)  # (m, y, x)
        amp = np.exp(log_amp)
        log_post = np.empty((len(width), len(y0), len(x0), len(amp)))
        data_norm = float(self._white_data @ self._white_data)
        for k, w in enumerate(width):
            gx = np.exp(-0.5 * ((t[None, :] - x0[:, None]) / w) ** 2)  # (nx, x)
            gy = np.exp(-0.5 * ((t[None, :] - y0[:, None]) / w) ** 2)  # (ny, y)
            mean = np.einsum("bi,sic->sbc", gy, white @ gx.T)  # (m, ny, nx): L^-1 A b at A = 1
            cross = np.einsum("s,sbc->bc", self._white_data, mean)
            square = np.einsum("sbc,sbc->bc", mean, mean)
            log_post[k] = -0.5 * (
                data_norm - 2.0 * cross[..., None] * amp + square[..., None] * amp**2
            )
        log_post -= log_post.max()
        weights = np.exp(log_post)
        self.grid = (x0, y0, log_amp, width)
        self.box = box
        self.weights = weights / weights.sum()  # (width, y0, x0, log_amplitude)

    def _marginals(self) -> list[np.ndarray]:
        w = self.weights
        return [w.sum((0, 1, 3)), w.sum((0, 2, 3)), w.sum((0, 1, 2)), w.sum((1, 2, 3))]

    def _support(self, box: np.ndarray, tail: float = 1e-9) -> np.ndarray:
        refined = box.copy()
        for j, (marginal, axis) in enumerate(zip(self._marginals(), self.grid, strict=True)):
            spacing = axis[1] - axis[0]
            cumulative = np.cumsum(marginal)
            first = int(np.searchsorted(cumulative, tail))
            last = int(np.searchsorted(cumulative, 1.0 - tail))
            lo = axis[min(first, len(axis) - 1)] - 1.5 * spacing
            hi = axis[min(last, len(axis) - 1)] + 1.5 * spacing
            refined[j] = (max(lo, box[j, 0]), min(hi, box[j, 1]))
        return refined

    # ------------------------------------------------------------------ summaries
    def sample(self, num: int, rng: np.random.Generator | int | None = None) -> np.ndarray:
        """``num`` draws of ``u`` ``(num, 4)``: a cell by its weight, uniform inside the cell."""
        rng = np.random.default_rng(rng)
        flat = rng.choice(self.weights.size, size=num, p=self.weights.ravel())
        k, b, c, a = np.unravel_index(flat, self.weights.shape)
        x0, y0, log_amp, width = self.grid
        centres = np.stack([x0[c], y0[b], log_amp[a], width[k]], -1)
        spacing = np.array([axis[1] - axis[0] for axis in self.grid])
        return centres + (rng.random((num, 4)) - 0.5) * spacing

    def mean(self) -> np.ndarray:
        """Posterior mean of ``u`` ``(4,)`` (midpoint rule)."""
        return np.array([m @ axis for m, axis in zip(self._marginals(), self.grid, strict=True)])

    def sd(self) -> np.ndarray:
        """Posterior sd of ``u`` ``(4,)`` (midpoint rule, the cell's own spread included)."""
        mean = self.mean()
        out = []
        for j, (m, axis) in enumerate(zip(self._marginals(), self.grid, strict=True)):
            spacing = axis[1] - axis[0]
            out.append(math.sqrt(max(m @ (axis - mean[j]) ** 2, 0.0) + spacing**2 / 12))
        return np.array(out)

    def interval(self, level: float = 0.9) -> np.ndarray:
        """Central ``level`` interval of each parameter, ``(4, 2)``, from the grid marginals."""
        if not 0.0 < level < 1.0:
            raise ValueError(f"expected 0 < level < 1, got {level!r}")
        out = np.empty((4, 2))
        for j, (m, axis) in enumerate(zip(self._marginals(), self.grid, strict=True)):
            spacing = axis[1] - axis[0]
            edges = np.concatenate([[axis[0] - spacing / 2], axis + spacing / 2])
            cumulative = np.concatenate([[0.0], np.cumsum(m)])
            out[j] = np.interp([(1 - level) / 2, (1 + level) / 2], cumulative, edges)
        return out

    def field_moments(
        self, num: int = 2000, rng: np.random.Generator | int | None = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and sd of the field ``(size, size)``, mixing ``num`` draws of ``u``.

        Given ``u`` the field is Gaussian with mean ``(I - K A) b(u) + K d`` and the covariance
        ``C - K A C`` of every ``u``, so the mean is exact up to the Monte Carlo error of the mix
        and the variance is that covariance's diagonal plus the spread of the conditional means.
        """
        t = grid(self.size)
        u = self.sample(num, rng)
        bumps = gaussian_bump(t, t, u[:, 0], u[:, 1], u[:, 2], u[:, 3]).reshape(num, -1)
        conditional = (
            bumps - (bumps @ self.operator.T) @ self._gain.T + self._gain @ self.observations
        )
        mean = conditional.mean(0)
        residual_var = np.diag(self.covariance) - np.einsum(
            "ns,sn->n", self._gain, self.operator @ self.covariance
        )
        variance = np.maximum(residual_var, 0.0) + conditional.var(0)
        shape = (self.size, self.size)
        return mean.reshape(shape), np.sqrt(variance).reshape(shape)


# ------------------------------------------------------------------ the image itself observed
def residual_whitener(size: int, sd: float, length_scale: float, smoothness: float) -> np.ndarray:
    """``W`` with ``W^T C W = I`` for the Matérn covariance ``C`` on the ``size x size`` grid.

    ``C`` is :func:`~pyro_dlatent.data.sources.residual_covariance` (plus ``1e-9 sd^2`` on the
    diagonal); ``W = L^{-T}`` for its Cholesky factor ``L``, shape ``(size**2, size**2)``.
    """
    cov = residual_covariance(size, sd=sd, length_scale=length_scale, smoothness=smoothness)
    chol = np.linalg.cholesky(cov + 1e-9 * sd**2 * np.eye(len(cov)))
    return np.linalg.inv(chol).T


def aux_posterior_means(
    dataset: xr.Dataset, whitener: np.ndarray, points: int = 201, joint: bool = False
) -> dict[str, np.ndarray]:
    """Exact posterior mean of each ``sources`` auxiliary given the image and the other three.

    An image of ``sources`` is :math:`f = b(u) + r` with :math:`r \\sim \\mathcal N(0, C)`,
    so with the other three parameters known the likelihood of the fourth is
    :math:`\\exp(-\\|W^\\top (f - b(u))\\|^2 / 2)`; its posterior mean under the simulator's
    uniform prior is computed on a grid of ``points`` values of the parameter's range. The
    posterior mean is the estimator of largest Pearson correlation with the truth among all
    functions of the image, and knowing the other three only helps, so the correlation of these
    means with the truth bounds what an encoder that sees the image alone can reach (up to its
    sampling error).

    Parameters
    ----------
    dataset : xarray.Dataset
        ``sources`` images ``(n, size, size)``, their auxiliaries and the simulator's ``attrs``
        (``center_range``, ``amplitude_range``, ``width_range``).
    whitener : numpy.ndarray, shape ``(size**2, size**2)``
        :func:`residual_whitener` of the residual field the images were simulated with.
    points : int, default 201
        Grid points per parameter.
    joint : bool, default False
        Also ``width_joint``: the width's posterior mean with ``log_amplitude`` unknown as well
        (a 2-d grid of ``points // 4`` widths by 61 log amplitudes).

    Returns
    -------
    dict of str to numpy.ndarray, shape ``(n,)``
        ``x0``, ``y0``, ``log_amplitude``, ``width`` (and ``width_joint``).
    """
    t = grid(dataset.sizes["x"])
    images = dataset["image"].values.reshape(dataset.sizes["sample"], -1).astype(np.float64)
    truth = {name: dataset[name].values.astype(np.float64) for name in NAMES}
    ranges = {
        "x0": dataset.attrs["center_range"],
        "y0": dataset.attrs["center_range"],
        "log_amplitude": [math.log(v) for v in dataset.attrs["amplitude_range"]],
        "width": dataset.attrs["width_range"],
    }

    def log_likelihood(residuals: np.ndarray) -> np.ndarray:
        return -0.5 * np.square(residuals @ whitener).sum(-1)

    out = {name: np.empty(len(images)) for name in NAMES}
    if joint:
        out["width_joint"] = np.empty(len(images))
        widths = np.linspace(*ranges["width"], max(points // 4, 2))
        amps = np.linspace(*ranges["log_amplitude"], 61)
        ww, aa = np.meshgrid(widths, amps, indexing="ij")
    for i, image in enumerate(images):
        for name in NAMES:
            values = np.linspace(*ranges[name], points)
            args = {k: np.full(points, truth[k][i]) for k in NAMES}
            args[name] = values
            bumps = gaussian_bump(t, t, *(args[k] for k in NAMES)).reshape(points, -1)
            ll = log_likelihood(image - bumps)
            weights = np.exp(ll - ll.max())
            out[name][i] = (weights * values).sum() / weights.sum()
        if joint:
            m = ww.size
            args = {k: np.full(m, truth[k][i]) for k in ("x0", "y0")}
            bumps = gaussian_bump(t, t, args["x0"], args["y0"], aa.ravel(), ww.ravel())
            ll = log_likelihood(image - bumps.reshape(m, -1))
            weights = np.exp(ll - ll.max())
            out["width_joint"][i] = (weights * ww.ravel()).sum() / weights.sum()
    return out
