"""Measurements on ``halos`` maps: aperture Compton-Y, its scaling with mass, nuisance parameters.

What the DL-CFM studies read generated and simulated maps against: the integrated Compton-Y in
an aperture about the field centre (:func:`aperture_y`), the slope of its logarithm against log
mass over equal-count bins (:func:`binned_power_law_slope`; self-similar halos give
:math:`Y_{500} \\propto M^{5/3 + \\alpha_P}`), and the true nuisance parameters of each map, the
centroid offset and ellipticity that set a halo apart from a relaxed one
(:func:`nuisance_features`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["aperture_y", "binned_power_law_slope", "nuisance_features"]


def aperture_y(images: Any, radius_pixels: Any) -> np.ndarray:
    """Sum of each map's pixels whose centres lie within ``radius_pixels`` of the field centre.

    Parameters
    ----------
    images : array-like, shape ``(n, h, w)``
        Maps (Compton-y per pixel: the sum is the aperture's integrated Y in pixel units).
    radius_pixels : array-like, shape ``(n,)``
        Aperture radius of each map, in pixels (e.g. ``r500_arcmin / pixel_arcmin``).

    Returns
    -------
    numpy.ndarray, shape ``(n,)``
    """
    images = np.asarray(images)
    h, w = images.shape[1:]
    yy, xx = np.mgrid[0:h, 0:w]
    r2 = (yy + 0.5 - 0.5 * h) ** 2 + (xx + 0.5 - 0.5 * w) ** 2
    inside = r2[None] <= np.asarray(radius_pixels, dtype=np.float64)[:, None, None] ** 2
    return (images * inside).sum(axis=(1, 2))


def binned_power_law_slope(x: Any, y: Any, num_bins: int = 8) -> float:
    """Slope of ``log10 <y>`` against ``<x>`` over equal-count bins of ``x`` (``x`` already a log).

    Averaging ``y`` within bins before the log keeps noisy, possibly negative, per-map values
    usable; bins whose mean is not positive are dropped.

    Parameters
    ----------
    x : array-like, shape ``(n,)``
        The logarithm of the scaling variable (e.g. ``log10_M500``).
    y : array-like, shape ``(n,)``
        The scaled quantity (e.g. :func:`aperture_y`).
    num_bins : int, default 8

    Returns
    -------
    float
        The least-squares slope through the bins' points; NaN with fewer than two bins left.
    """
    x, y = np.asarray(x), np.asarray(y)
    order = np.argsort(x)
    centres, means = [], []
    for part in np.array_split(order, num_bins):
        mean = float(np.mean(y[part]))
        if mean > 0:
            centres.append(float(np.mean(x[part])))
            means.append(math.log10(mean))
    if len(centres) < 2:
        return float("nan")
    return float(np.polyfit(centres, means, 1)[0])


def nuisance_features(dataset: Any, unit: str) -> dict[str, np.ndarray]:
    """The true centroid offsets and ellipticity of each map of a ``halos`` dataset.

    Parameters
    ----------
    dataset : xarray.Dataset
        A ``halos`` dataset with its extra variables ``offset_x``, ``offset_y`` (arcmin),
        ``r500_arcmin``, ``axis_ratio`` ``q`` and ``orientation`` ``phi``.
    unit : {"arcmin", "r500"}
        Unit of the offsets.

    Returns
    -------
    dict
        ``offsets`` ``(n, 2)`` and ``ellipticity`` ``(n, 2)``,
        :math:`(1 - q)(\\cos 2\\phi, \\sin 2\\phi)`.
    """
    if unit not in ("arcmin", "r500"):
        raise ValueError(f"expected unit 'arcmin' or 'r500', got {unit!r}")
    scale = dataset["r500_arcmin"].values if unit == "r500" else 1.0
    offsets = np.stack(
        [dataset["offset_x"].values / scale, dataset["offset_y"].values / scale], axis=1
    )
    q, phi = dataset["axis_ratio"].values, dataset["orientation"].values
    ellipticity = np.stack([(1 - q) * np.cos(2 * phi), (1 - q) * np.sin(2 * phi)], axis=1)
    return {"offsets": offsets, "ellipticity": ellipticity}
