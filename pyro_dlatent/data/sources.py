"""PDE source fields on the unit square: a Gaussian bump plus a Matérn random-field residual."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import xarray as xr
from scipy import fft, special

from pyro_dlatent.data._simulation import Simulation

__all__ = [
    "gaussian_bump",
    "grid",
    "matern_covariance",
    "residual_covariance",
    "sample_matern_field",
    "simulate",
]

_CHUNK_ELEMENTS = 2**20
"""Complex FFT elements held at once by :func:`sample_matern_field` (16 MiB)."""


def grid(size: int) -> np.ndarray:
    """Node coordinates of the ``size x size`` grid on the unit square.

    The grid is the node set of a structured P1 finite-element mesh: ``size`` nodes per axis at
    ``np.linspace(0, 1, size)``; ``image[..., i, j]`` is the field at ``(x, y) = (t[j], t[i])``.

    Returns
    -------
    numpy.ndarray, shape ``(size,)``
        The coordinates ``t``, shared by both axes.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 2:
        raise ValueError(f"expected size >= 2 (an int), got {size!r}")
    return np.linspace(0.0, 1.0, size)


def gaussian_bump(
    x: np.ndarray,
    y: np.ndarray,
    x0: np.ndarray,
    y0: np.ndarray,
    log_amplitude: np.ndarray,
    width: np.ndarray,
) -> np.ndarray:
    r"""Isotropic Gaussian bump on a grid.

    .. math:: f(x, y) = e^{a} \exp\!\left(-\frac{(x - x_0)^2 + (y - y_0)^2}{2 w^2}\right)

    Parameters
    ----------
    x, y : numpy.ndarray, shape ``(width_nodes,)`` and ``(height_nodes,)``
        Grid coordinates along each axis.
    x0, y0, log_amplitude, width : numpy.ndarray, shape ``(n,)``
        Centre, natural log of the amplitude ``a = log A`` and width ``w`` of each bump.

    Returns
    -------
    numpy.ndarray, shape ``(n, height_nodes, width_nodes)``
    """
    x0, y0, log_amplitude, width = (
        np.asarray(v, dtype=np.float64)[:, None] for v in (x0, y0, log_amplitude, width)
    )
    gx = np.exp(-0.5 * ((np.asarray(x)[None, :] - x0) / width) ** 2)
    gy = np.exp(-0.5 * ((np.asarray(y)[None, :] - y0) / width) ** 2)
    return np.exp(log_amplitude)[:, :, None] * gy[:, :, None] * gx[:, None, :]


def matern_covariance(
    distance: np.ndarray, *, sd: float, length_scale: float, smoothness: float
) -> np.ndarray:
    r"""Matérn covariance as a function of distance.

    .. math::
        C(r) = \sigma^2 \frac{2^{1-\nu}}{\Gamma(\nu)}
               \left(\frac{\sqrt{2\nu}\, r}{\ell}\right)^{\nu}
               K_\nu\!\left(\frac{\sqrt{2\nu}\, r}{\ell}\right),
        \qquad C(0) = \sigma^2,

    with standard deviation ``sd`` (:math:`\sigma`), ``length_scale`` (:math:`\ell`) and
    ``smoothness`` (:math:`\nu`); :math:`K_\nu` is the modified Bessel function of the second
    kind. In the SPDE form :math:`(\kappa^2 - \Delta)^{(\nu + 1)/2} u = \mathcal{W}` on the plane
    this is :math:`\kappa = \sqrt{2\nu} / \ell`; ``smoothness=1`` is the bi-Laplacian prior.

    Parameters
    ----------
    distance : numpy.ndarray, any shape
        Non-negative distances.

    Returns
    -------
    numpy.ndarray, same shape as ``distance``
    """
    _check_matern(sd=sd, length_scale=length_scale, smoothness=smoothness)
    scaled = math.sqrt(2.0 * smoothness) * np.asarray(distance, dtype=np.float64) / length_scale
    norm = sd**2 * 2.0 ** (1.0 - smoothness) / special.gamma(smoothness)
    with np.errstate(invalid="ignore", over="ignore"):
        cov = norm * scaled**smoothness * special.kv(smoothness, scaled)
    return np.where(scaled == 0.0, sd**2, np.nan_to_num(cov, nan=0.0))


def residual_covariance(
    size: int, *, sd: float = 0.25, length_scale: float = 0.15, smoothness: float = 1.0
) -> np.ndarray:
    """Exact covariance of the ``sources`` residual on the ``size x size`` node grid.

    Node ``(i, j)`` of an image (row-major, flat index ``i * size + j``) sits at
    ``(x_j, y_i)`` of :func:`grid`; entry ``[a, b]`` is :func:`matern_covariance` of the
    distance between nodes ``a`` and ``b``: the law :func:`sample_matern_field` samples exactly.
    The defaults are :func:`simulate`'s.

    Returns
    -------
    numpy.ndarray, shape ``(size**2, size**2)``
    """
    t = grid(size)
    xx, yy = np.meshgrid(t, t, indexing="xy")
    points = np.stack([xx.ravel(), yy.ravel()], axis=-1)
    distance = np.linalg.norm(points[:, None, :] - points[None, :, :], axis=-1)
    return matern_covariance(distance, sd=sd, length_scale=length_scale, smoothness=smoothness)


def _check_matern(*, sd: float, length_scale: float, smoothness: float) -> None:
    if not (math.isfinite(sd) and sd >= 0.0):
        raise ValueError(f"expected residual_sd >= 0, got {sd!r}")
    if not (math.isfinite(length_scale) and length_scale > 0.0):
        raise ValueError(f"expected length_scale > 0, got {length_scale!r}")
    if not (math.isfinite(smoothness) and smoothness > 0.0):
        raise ValueError(f"expected smoothness > 0, got {smoothness!r}")


@functools.lru_cache(maxsize=8)
def _embedding_spectrum(size: int, sd: float, length_scale: float, smoothness: float) -> np.ndarray:
    """Spectrum of the smallest non-negative-definite circulant embedding of the grid covariance."""
    spacing = 1.0 / (size - 1)
    for factor in (1, 2, 4, 8, 16):
        period = fft.next_fast_len(2 * (size - 1) * factor)
        k = np.arange(period)
        wrapped = np.minimum(k, period - k) * spacing
        cov = matern_covariance(
            np.hypot(wrapped[:, None], wrapped[None, :]),
            sd=sd,
            length_scale=length_scale,
            smoothness=smoothness,
        )
        spectrum = fft.fft2(cov, workers=1).real
        if spectrum.min() >= -1e-12 * spectrum.max():
            return np.clip(spectrum, 0.0, None)
    raise ValueError(
        f"length_scale={length_scale} is too large for an exact circulant embedding of a "
        f"{size}x{size} grid (tried a period of {period} nodes); use length_scale <= 1"
    )


def sample_matern_field(
    num: int,
    size: int,
    *,
    sd: float,
    length_scale: float,
    smoothness: float,
    rng: np.random.Generator,
) -> np.ndarray:
    r"""Zero-mean stationary Matérn Gaussian random field on the unit-square grid.

    Exact in distribution on the grid nodes (:func:`grid`): circulant embedding
    (Dietrich & Newsam 1997). The grid covariance :math:`C(\|p_a - p_b\|)`
    (:func:`matern_covariance`) is embedded in a periodic grid of period :math:`M \geq 2(n - 1)`
    nodes per axis, doubled until the embedding's spectrum :math:`\lambda` is non-negative; then
    :math:`\mathrm{FFT}_2(\sqrt{\lambda / M^2}\, \varepsilon)` with complex white noise
    :math:`\varepsilon` has real and imaginary parts that are two independent fields with that
    covariance, restricted to the first ``n x n`` nodes.

    Parameters
    ----------
    num : int
        Number of fields.
    size : int
        Nodes per axis, ``n``.
    sd, length_scale, smoothness : float
        Matérn parameters :math:`\sigma, \ell, \nu` (see :func:`matern_covariance`).
    rng : numpy.random.Generator
        Source of randomness.

    Returns
    -------
    numpy.ndarray, shape ``(num, size, size)``, float64
    """
    if isinstance(num, bool) or not isinstance(num, int) or num < 0:
        raise ValueError(f"expected num >= 0 (an int), got {num!r}")
    grid(size)
    _check_matern(sd=sd, length_scale=length_scale, smoothness=smoothness)
    if sd == 0.0:
        return np.zeros((num, size, size))
    out = np.empty((num, size, size))
    spectrum = _embedding_spectrum(size, sd, length_scale, smoothness)
    period = spectrum.shape[0]
    amplitude = np.sqrt(spectrum) / period
    pairs = (num + 1) // 2
    chunk = max(1, _CHUNK_ELEMENTS // period**2)
    for start in range(0, pairs, chunk):
        count = min(chunk, pairs - start)
        noise = rng.standard_normal((count, period, period)) + 1j * rng.standard_normal(
            (count, period, period)
        )
        fields = fft.fft2(amplitude * noise, workers=1)[:, :size, :size]
        both = np.concatenate([fields.real, fields.imag], axis=0)
        lo = 2 * start
        hi = min(num, lo + 2 * count)
        out[lo:hi] = both[: hi - lo]
    return out


def _uniform_range(name: str, value: Any, *, unit: bool) -> tuple[float, float]:
    """Validate ``(low, high)``: inside ``[0, 1]`` if ``unit``, else positive and finite."""
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"expected {name} = (low, high), got {value!r}") from err
    ok = (0.0 <= a <= b <= 1.0) if unit else (0.0 < a <= b < math.inf)
    if not ok:
        bounds = "0 <= low <= high <= 1" if unit else "0 < low <= high < inf"
        raise ValueError(f"expected {name} = (low, high) with {bounds}, got {value!r}")
    return a, b


def simulate(
    num: int,
    size: int = 32,
    seed: int = 0,
    *,
    center_range: tuple[float, float] = (0.2, 0.8),
    amplitude_range: tuple[float, float] = (1.0, 10.0),
    width_range: tuple[float, float] = (0.05, 0.15),
    residual_sd: float = 0.25,
    length_scale: float = 0.15,
    smoothness: float = 1.0,
) -> xr.Dataset:
    r"""Simulate source fields ``f = bump + residual`` on the nodes of the unit-square FEM mesh.

    Each field is

    .. math::
        f(x, y) = A \exp\!\left(-\frac{(x - x_0)^2 + (y - y_0)^2}{2 w^2}\right) + r(x, y),
        \qquad r \sim \mathrm{GP}(0, C_{\sigma, \ell, \nu}),

    on the grid of :func:`grid` (``image[s, i, j]`` at ``x = j / (size - 1)``,
    ``y = i / (size - 1)``), with the guided auxiliaries drawn independently:

    - ``x0``, ``y0`` ~ Uniform(``center_range``) (default ``[0.2, 0.8]``, units of the domain);
    - ``log_amplitude`` = :math:`\log A` ~ Uniform(:math:`\log` ``amplitude_range``) (default
      ``A`` in ``[1, 10]``; natural log, so the scaler's transform is the identity);
    - ``width`` :math:`w` ~ Uniform(``width_range``) (default ``[0.05, 0.15]``).

    The residual :math:`r` is a zero-mean stationary Matérn field (:func:`matern_covariance`)
    with standard deviation ``residual_sd`` (default 0.25, i.e. a quarter of the smallest
    amplitude), ``length_scale`` :math:`\ell` (default 0.15) and ``smoothness`` :math:`\nu`
    (default 1, the bi-Laplacian prior in two dimensions), sampled exactly on the grid by
    :func:`sample_matern_field`. It is not an auxiliary: it is what the residual latent block
    must carry.

    Parameters
    ----------
    num : int
        Number of fields.
    size : int
        Nodes per axis.
    seed : int
        Seed of ``numpy.random.default_rng``.

    Returns
    -------
    xarray.Dataset
        ``image`` ``(sample, y, x)`` with coordinates ``x``, ``y`` in ``[0, 1]``; auxiliaries
        ``x0``, ``y0``, ``log_amplitude``, ``width``; the residual's parameters in ``attrs``.
    """
    return _simulation(
        num,
        size,
        seed,
        center_range=center_range,
        amplitude_range=amplitude_range,
        width_range=width_range,
        residual_sd=residual_sd,
        length_scale=length_scale,
        smoothness=smoothness,
    ).dataset()


def _simulation(
    num: int,
    size: int,
    seed: int,
    *,
    center_range: tuple[float, float] = (0.2, 0.8),
    amplitude_range: tuple[float, float] = (1.0, 10.0),
    width_range: tuple[float, float] = (0.05, 0.15),
    residual_sd: float = 0.25,
    length_scale: float = 0.15,
    smoothness: float = 1.0,
) -> Simulation:
    """:func:`simulate` before the images: the auxiliaries, then the fields block by block."""
    lo_c, hi_c = _uniform_range("center_range", center_range, unit=True)
    lo_a, hi_a = _uniform_range("amplitude_range", amplitude_range, unit=False)
    lo_w, hi_w = _uniform_range("width_range", width_range, unit=False)
    _check_matern(sd=residual_sd, length_scale=length_scale, smoothness=smoothness)
    rng = np.random.default_rng(seed)
    aux = {
        "x0": rng.uniform(lo_c, hi_c, num),
        "y0": rng.uniform(lo_c, hi_c, num),
        "log_amplitude": rng.uniform(math.log(lo_a), math.log(hi_a), num),
        "width": rng.uniform(lo_w, hi_w, num),
    }
    coords = grid(size)

    def blocks() -> Iterator[np.ndarray]:
        chunk = max(1, _CHUNK_ELEMENTS // size**2)
        for start in range(0, num, chunk):
            part = slice(start, start + chunk)
            count = min(chunk, num - start)
            residual = sample_matern_field(
                count,
                size,
                sd=residual_sd,
                length_scale=length_scale,
                smoothness=smoothness,
                rng=rng,
            )
            bump = gaussian_bump(coords, coords, *(aux[k][part] for k in aux))
            yield (bump + residual).astype(np.float32)

    def decorate(ds: xr.Dataset) -> xr.Dataset:
        ds["image"].attrs.update(long_name="source field f", units="")
        ds = ds.assign_coords(x=("x", coords), y=("y", coords))
        ds["x"].attrs.update(units="", long_name="x coordinate on the unit square")
        ds["y"].attrs.update(units="", long_name="y coordinate on the unit square")
        return ds

    return Simulation(
        num,
        blocks(),
        aux,
        units=dict.fromkeys(aux, ""),
        attrs={
            "simulator": "sources",
            "seed": seed,
            "grid": "size nodes per axis at linspace(0, 1, size); image[s, i, j] at (x_j, y_i)",
            "residual": "zero-mean stationary Matern Gaussian random field",
            "residual_sd": float(residual_sd),
            "length_scale": float(length_scale),
            "smoothness": float(smoothness),
            "center_range": [lo_c, hi_c],
            "amplitude_range": [lo_a, hi_a],
            "width_range": [lo_w, hi_w],
        },
        decorate=decorate,
    )
