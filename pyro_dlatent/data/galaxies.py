"""GalSim images of sheared exponential galaxies through a Gaussian PSF, on a Latin hypercube."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import xarray as xr
from scipy.stats import qmc

from pyro_dlatent.data._simulation import Simulation

__all__ = ["PARAMETERS", "render", "simulate"]

PARAMETERS = ("flux", "scale_radius", "g1", "g2", "psf_fwhm")
"""Auxiliary names, in latent order."""

_CHUNK_ELEMENTS = 2**20
"""Pixels rendered per block of stamps (4 MiB of float32)."""


def _check_range(name: str, value: Any, *, positive: bool) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"expected {name} = (low, high), got {value!r}") from err
    ok = math.isfinite(a) and math.isfinite(b) and a <= b and (a > 0.0 if positive else True)
    if not ok:
        bound = "0 < low <= high" if positive else "low <= high"
        raise ValueError(f"expected {name} = (low, high) with {bound}, got {value!r}")
    return a, b


def render(
    flux: np.ndarray,
    scale_radius: np.ndarray,
    g1: np.ndarray,
    g2: np.ndarray,
    psf_fwhm: np.ndarray,
    *,
    size: int,
    pixel_scale: float,
) -> np.ndarray:
    r"""Draw noiseless galaxies with GalSim, one stamp per row of parameters.

    Each image is the pixel-integrated surface brightness of

    .. math:: \bigl(S_{g_1, g_2}\, I_{\mathrm{exp}}\bigr) \ast \mathrm{PSF}, \qquad
              I_{\mathrm{exp}}(r) = \frac{F}{2 \pi r_s^2} e^{-r / r_s},

    where :math:`S_{g_1, g_2}` is GalSim's area-preserving reduced shear and the PSF a circular
    Gaussian of the given FWHM, centred on the stamp centre (``galsim.Convolve(...).drawImage``
    with its default pixel response).

    Parameters
    ----------
    flux : numpy.ndarray, shape ``(n,)``
        Total flux in counts.
    scale_radius : numpy.ndarray, shape ``(n,)``
        Exponential scale radius :math:`r_s`, arcsec.
    g1, g2 : numpy.ndarray, shape ``(n,)``
        Reduced shear components, :math:`|g| < 1`.
    psf_fwhm : numpy.ndarray, shape ``(n,)``
        PSF full width at half maximum, arcsec.
    size : int
        Stamp side in pixels.
    pixel_scale : float
        Arcsec per pixel.

    Returns
    -------
    numpy.ndarray, shape ``(n, size, size)``, float32
        ``image[s, i, j]``: row ``i`` is GalSim's ``y``, column ``j`` its ``x``.
    """
    import galsim

    params = np.broadcast_arrays(
        *(np.asarray(p, dtype=np.float64) for p in (flux, scale_radius, g1, g2, psf_fwhm))
    )
    images = np.zeros((params[0].shape[0], size, size), dtype=np.float32)
    for s, (f, rs, e1, e2, fwhm) in enumerate(zip(*params, strict=True)):
        galaxy = galsim.Exponential(flux=f, scale_radius=rs).shear(g1=e1, g2=e2)
        psf = galsim.Gaussian(fwhm=fwhm)
        stamp = galsim.Image(images[s], scale=pixel_scale)
        galsim.Convolve(galaxy, psf).drawImage(image=stamp)
    return images


def simulate(
    num: int,
    size: int = 32,
    seed: int = 0,
    *,
    pixel_scale: float = 0.2,
    flux_range: tuple[float, float] = (1e3, 1e5),
    scale_radius_range: tuple[float, float] = (0.2, 0.5),
    shear_range: tuple[float, float] = (-0.2, 0.2),
    psf_fwhm_range: tuple[float, float] = (0.5, 1.0),
    noise_sd: float = 0.0,
) -> xr.Dataset:
    r"""Simulate galaxy images on a Latin-hypercube design of their five generative factors.

    The design is a scrambled Latin hypercube in five dimensions
    (``scipy.stats.qmc.LatinHypercube``) mapped to

    - ``flux`` :math:`F` in counts, log-uniform over ``flux_range`` (default ``[1e3, 1e5]``);
    - ``scale_radius`` :math:`r_s` in arcsec, uniform over ``scale_radius_range`` (default
      ``[0.2, 0.5]``: half-light radii 0.34 to 0.84 arcsec, resolved against the PSF);
    - ``g1``, ``g2`` uniform over ``shear_range`` (default ``[-0.2, 0.2]``);
    - ``psf_fwhm`` in arcsec, uniform over ``psf_fwhm_range`` (default ``[0.5, 1.0]``),

    and rendered by :func:`render` at ``pixel_scale`` arcsec per pixel (default 0.2, so a
    32-pixel stamp is 6.4 arcsec wide and holds more than 98% of the flux of the largest,
    most sheared galaxy). Optional white Gaussian noise of ``noise_sd`` counts per pixel
    (default 0: noiseless) is added with numpy.

    Parameters
    ----------
    num : int
        Number of images (the size of the Latin hypercube).
    size : int
        Stamp side in pixels.
    seed : int
        Seed of ``numpy.random.default_rng`` (design and noise).

    Returns
    -------
    xarray.Dataset
        ``image`` ``(sample, y, x)`` in counts per pixel, coordinates ``x``, ``y`` in arcsec
        from the stamp centre, and the five auxiliaries of :data:`PARAMETERS`.
    """
    return _simulation(
        num,
        size,
        seed,
        pixel_scale=pixel_scale,
        flux_range=flux_range,
        scale_radius_range=scale_radius_range,
        shear_range=shear_range,
        psf_fwhm_range=psf_fwhm_range,
        noise_sd=noise_sd,
    ).dataset()


def _simulation(
    num: int,
    size: int,
    seed: int,
    *,
    pixel_scale: float = 0.2,
    flux_range: tuple[float, float] = (1e3, 1e5),
    scale_radius_range: tuple[float, float] = (0.2, 0.5),
    shear_range: tuple[float, float] = (-0.2, 0.2),
    psf_fwhm_range: tuple[float, float] = (0.5, 1.0),
    noise_sd: float = 0.0,
) -> Simulation:
    """:func:`simulate` before the images: the design, then the stamps block by block."""
    if not (math.isfinite(pixel_scale) and pixel_scale > 0.0):
        raise ValueError(f"expected pixel_scale > 0, got {pixel_scale!r}")
    if not (math.isfinite(noise_sd) and noise_sd >= 0.0):
        raise ValueError(f"expected noise_sd >= 0, got {noise_sd!r}")
    lo_f, hi_f = _check_range("flux_range", flux_range, positive=True)
    lo_r, hi_r = _check_range("scale_radius_range", scale_radius_range, positive=True)
    lo_g, hi_g = _check_range("shear_range", shear_range, positive=False)
    lo_p, hi_p = _check_range("psf_fwhm_range", psf_fwhm_range, positive=True)
    if math.hypot(max(abs(lo_g), abs(hi_g)), max(abs(lo_g), abs(hi_g))) >= 1.0:
        raise ValueError(
            f"expected shear_range such that |g| < 1 at its corners, got {shear_range!r}"
        )
    rng = np.random.default_rng(seed)
    unit = qmc.LatinHypercube(d=len(PARAMETERS), rng=rng).random(num)
    aux = {
        "flux": 10.0 ** (math.log10(lo_f) + unit[:, 0] * (math.log10(hi_f) - math.log10(lo_f))),
        "scale_radius": lo_r + unit[:, 1] * (hi_r - lo_r),
        "g1": lo_g + unit[:, 2] * (hi_g - lo_g),
        "g2": lo_g + unit[:, 3] * (hi_g - lo_g),
        "psf_fwhm": lo_p + unit[:, 4] * (hi_p - lo_p),
    }

    def blocks() -> Iterator[np.ndarray]:
        chunk = max(1, _CHUNK_ELEMENTS // size**2)
        for start in range(0, num, chunk):
            part = slice(start, start + chunk)
            images = render(
                **{k: v[part] for k, v in aux.items()}, size=size, pixel_scale=pixel_scale
            )
            if noise_sd > 0.0:  # one stream in sample order: the same noise in any blocks
                images += noise_sd * rng.standard_normal(images.shape, dtype=np.float32)
            yield images

    def decorate(ds: xr.Dataset) -> xr.Dataset:
        ds["image"].attrs.update(long_name="surface brightness per pixel", units="counts")
        coords = (np.arange(size) + 0.5 - 0.5 * size) * pixel_scale
        ds = ds.assign_coords(x=("x", coords), y=("y", coords))
        for axis in ("x", "y"):
            ds[axis].attrs.update(units="arcsec", long_name=f"{axis} offset from the stamp centre")
        return ds

    return Simulation(
        num,
        blocks(),
        aux,
        units={
            "flux": "counts",
            "scale_radius": "arcsec",
            "g1": "",
            "g2": "",
            "psf_fwhm": "arcsec",
        },
        transforms={"flux": "log10"},
        attrs={
            "simulator": "galaxies",
            "seed": seed,
            "profile": "exponential, sheared, convolved with a Gaussian PSF and the pixel (GalSim)",
            "design": "scrambled Latin hypercube (scipy.stats.qmc.LatinHypercube)",
            "pixel_scale_arcsec": float(pixel_scale),
            "flux_range": [lo_f, hi_f],
            "scale_radius_range": [lo_r, hi_r],
            "shear_range": [lo_g, hi_g],
            "psf_fwhm_range": [lo_p, hi_p],
            "noise_sd": float(noise_sd),
        },
        decorate=decorate,
    )
