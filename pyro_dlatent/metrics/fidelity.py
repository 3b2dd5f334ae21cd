"""Sample fidelity: how closely generated images match reference images in distribution.

Radial power spectra, pixel-value distributions and radial profiles of two image sets, and the
distances between them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import wasserstein_distance

from pyro_dlatent.metrics._arrays import _to_numpy

__all__ = [
    "pixel_histogram_distance",
    "power_spectrum_error",
    "radial_power_spectrum",
    "radial_profile",
    "radial_profile_error",
]


def _as_images(images: Any, name: str) -> np.ndarray:
    """Return ``images`` as ``(num_images, h, w)`` float64, flattening leading dimensions."""
    arr = _to_numpy(images, name)
    if arr.ndim < 2:
        raise ValueError(f"expected {name} of shape (..., h, w), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"expected non-empty {name}, got shape {arr.shape}")
    return arr.reshape(-1, *arr.shape[-2:])


def _annulus_average(
    values: np.ndarray, radius: np.ndarray, bins: np.ndarray, num_bins: int
) -> tuple[np.ndarray, np.ndarray]:
    """Mean radius ``(b,)`` and per-image mean value ``(num_images, b)`` in each non-empty bin."""
    keep = (bins >= 0) & (bins < num_bins)
    idx = bins[keep]
    counts = np.bincount(idx, minlength=num_bins)
    nonempty = counts > 0
    mean_radius = np.bincount(idx, weights=radius[keep], minlength=num_bins)[nonempty]
    mean_radius = mean_radius / counts[nonempty]
    flat = values[:, keep]
    sums = np.stack([np.bincount(idx, weights=row, minlength=num_bins) for row in flat])
    return mean_radius, sums[:, nonempty] / counts[nonempty]


def radial_power_spectrum(
    images: ArrayLike, *, average: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Azimuthally averaged power spectrum.

    For an image :math:`x` of shape ``(h, w)`` with discrete Fourier transform :math:`\\hat x`,
    the power :math:`P(\\mathbf k) = |\\hat x(\\mathbf k)|^2 / (h w)` (so white noise of variance
    :math:`\\sigma^2` has :math:`E\\,P = \\sigma^2` at every :math:`\\mathbf k \\ne 0`) is averaged
    over annuli of width :math:`\\Delta k = 1/\\min(h, w)` cycles per pixel, centred on
    multiples of :math:`\\Delta k`, up to the Nyquist frequency of the shorter side.

    Parameters
    ----------
    images : array-like, shape ``(..., h, w)``
        One image or a batch; leading dimensions are flattened.
    average : bool
        Return the mean spectrum over images (default) or one spectrum per image.

    Returns
    -------
    wavenumbers : numpy.ndarray, shape ``(b,)``
        Mean :math:`|\\mathbf k|` of the modes in each annulus, in cycles per pixel
        (the first is 0, the mean level).
    power : numpy.ndarray, shape ``(b,)`` or ``(num_images, b)``
    """
    x = _as_images(images, "images")
    _, h, w = x.shape
    power = np.abs(np.fft.fft2(x)) ** 2 / (h * w)
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij"))
    step = 1.0 / min(h, w)
    bins = np.rint(k / step).astype(np.int64)
    wavenumbers, spectra = _annulus_average(
        power.reshape(len(x), -1), k.ravel(), bins.ravel(), min(h, w) // 2 + 1
    )
    return wavenumbers, spectra.mean(axis=0) if average else spectra


def _mean_relative_error(generated: np.ndarray, reference: np.ndarray) -> float:
    """Mean of ``|g - r| / |r|`` over bins; bins where both are 0 count 0, ``r = 0 != g`` is inf."""
    diff = np.abs(generated - reference)
    ref = np.abs(reference)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(diff == 0, 0.0, diff / ref)
    return float(rel.mean())


def _check_same_image_shape(generated: np.ndarray, reference: np.ndarray) -> None:
    if generated.shape[1:] != reference.shape[1:]:
        raise ValueError(
            "expected generated and reference images of the same (h, w), got "
            f"{generated.shape[1:]} and {reference.shape[1:]}"
        )


def power_spectrum_error(generated: ArrayLike, reference: ArrayLike) -> float:
    """Mean relative error between the mean radial power spectra of two image sets.

    .. math:: \\epsilon_P = \\frac{1}{b} \\sum_{j=1}^{b}
        \\frac{|\\bar P_{gen}(k_j) - \\bar P_{ref}(k_j)|}{\\bar P_{ref}(k_j)},

    with :math:`\\bar P` the mean spectra of :func:`radial_power_spectrum`. A bin where the
    reference has zero power counts 0 if the generated power is 0 too, and makes the error
    infinite otherwise.

    Parameters
    ----------
    generated : array-like, shape ``(..., h, w)``
    reference : array-like, shape ``(..., h, w)``
        Sets of any sizes, with the same image shape.

    Returns
    -------
    float
        0 for identical spectra.
    """
    gen = _as_images(generated, "generated")
    ref = _as_images(reference, "reference")
    _check_same_image_shape(gen, ref)
    return _mean_relative_error(radial_power_spectrum(gen)[1], radial_power_spectrum(ref)[1])


def pixel_histogram_distance(generated: ArrayLike, reference: ArrayLike) -> float:
    """1-Wasserstein distance between the pixel-value distributions of two image sets.

    .. math:: W_1 = \\int |F_{gen}(t) - F_{ref}(t)|\\, dt,

    with :math:`F` the empirical distribution functions of all pixel values of each set
    (:func:`scipy.stats.wasserstein_distance`). In the units of the pixel values; shifting every
    pixel by :math:`c` gives :math:`|c|`.

    Parameters
    ----------
    generated : array-like, any shape
    reference : array-like, any shape

    Returns
    -------
    float
    """
    gen = _to_numpy(generated, "generated").ravel()
    ref = _to_numpy(reference, "reference").ravel()
    if gen.size == 0 or ref.size == 0:
        raise ValueError("expected non-empty generated and reference arrays")
    return float(wasserstein_distance(gen, ref))


def radial_profile(
    images: ArrayLike,
    center: tuple[float, float] | None = None,
    *,
    max_radius: float | None = None,
    average: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Azimuthally averaged pixel values in annuli of unit width around a center.

    Pixel :math:`(i, j)` lies at radius :math:`r_{ij} = \\sqrt{(i - c_y)^2 + (j - c_x)^2}` (pixel
    units) and belongs to annulus :math:`\\lfloor r_{ij} \\rfloor`; the profile is the mean value
    in each non-empty annulus with :math:`r < r_{max}`.

    Parameters
    ----------
    images : array-like, shape ``(..., h, w)``
        One image or a batch; leading dimensions are flattened.
    center : (float, float), optional
        ``(c_y, c_x)`` in pixel coordinates; default the image center ``((h-1)/2, (w-1)/2)``.
    max_radius : float, optional
        Outer radius :math:`r_{max}` (pixels); default ``min(h, w) / 2``, the largest circle
        inside the image.
    average : bool
        Return the mean profile over images (default) or one profile per image.

    Returns
    -------
    radii : numpy.ndarray, shape ``(b,)``
        Mean pixel radius in each annulus.
    profile : numpy.ndarray, shape ``(b,)`` or ``(num_images, b)``
    """
    x = _as_images(images, "images")
    _, h, w = x.shape
    cy, cx = ((h - 1) / 2, (w - 1) / 2) if center is None else map(float, center)
    if not (math.isfinite(cy) and math.isfinite(cx)):
        raise ValueError(f"expected a finite center, got {center}")
    r_max = min(h, w) / 2 if max_radius is None else float(max_radius)
    if not (math.isfinite(r_max) and r_max > 0):
        raise ValueError(f"expected max_radius > 0, got {max_radius}")
    yy, xx = np.meshgrid(np.arange(h) - cy, np.arange(w) - cx, indexing="ij")
    radius = np.hypot(yy, xx).ravel()
    bins = np.where(radius < r_max, np.floor(radius), -1).astype(np.int64)
    radii, profiles = _annulus_average(x.reshape(len(x), -1), radius, bins, math.ceil(r_max) + 1)
    if radii.size == 0:
        raise ValueError(f"no pixel lies within max_radius={r_max} of center {(cy, cx)}")
    return radii, profiles.mean(axis=0) if average else profiles


def radial_profile_error(
    generated: ArrayLike,
    reference: ArrayLike,
    center: tuple[float, float] | None = None,
    *,
    max_radius: float | None = None,
) -> float:
    """Mean relative error between the mean radial profiles of two image sets.

    .. math:: \\epsilon_r = \\frac{1}{b} \\sum_{j=1}^{b}
        \\frac{|\\bar p_{gen}(r_j) - \\bar p_{ref}(r_j)|}{|\\bar p_{ref}(r_j)|},

    with :math:`\\bar p` the mean profiles of :func:`radial_profile` (same center and radius);
    zero reference bins are handled as in :func:`power_spectrum_error`. Meant for positive
    maps (e.g. Compton-y).

    Parameters
    ----------
    generated, reference : array-like, shape ``(..., h, w)``
    center : (float, float), optional
        See :func:`radial_profile`.
    max_radius : float, optional
        See :func:`radial_profile`.

    Returns
    -------
    float
    """
    gen = _as_images(generated, "generated")
    ref = _as_images(reference, "reference")
    _check_same_image_shape(gen, ref)
    _, p_gen = radial_profile(gen, center, max_radius=max_radius)
    _, p_ref = radial_profile(ref, center, max_radius=max_radius)
    return _mean_relative_error(p_gen, p_ref)
