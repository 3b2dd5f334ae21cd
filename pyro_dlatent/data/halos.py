"""Thermal Sunyaev-Zel'dovich Compton-y maps of dark-matter halos (projected generalized NFW)."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import xarray as xr
from scipy import constants, integrate, ndimage, special

from pyro_dlatent.data._simulation import Simulation

__all__ = [
    "ARNAUD2010",
    "PLANCK18",
    "angular_diameter_distance",
    "compton_y_profile",
    "critical_density",
    "dimensionless_hubble",
    "gnfw_shape",
    "gnfw_volume_integral",
    "median_concentration",
    "p500",
    "pressure_profile",
    "projected_gnfw_shape",
    "r500",
    "simulate",
]

ARNAUD2010 = {"p0": 8.403, "c500": 1.177, "gamma": 0.3081, "alpha": 1.0510, "beta": 5.4905}
"""Universal pressure profile of Arnaud et al. (2010, A&A 517, A92), eq. 12; ``p0`` in units
of ``h70^-3/2``."""

PLANCK18 = {"h": 0.6766, "omega_m": 0.3111}
"""Flat ΛCDM parameters of Planck 2018 (TT,TE,EE+lowE+lensing+BAO), as colossus' ``planck18``."""

_MPC_CM = 1e8 * constants.parsec
"""One megaparsec in centimetres."""
_GM_SUN = 1.3271244e20
"""Nominal solar mass parameter (IAU 2015 B3), m^3 s^-2."""
_SIGMA_T_CM2 = 1e4 * constants.physical_constants["Thomson cross section"][0]
_ME_C2_KEV = 1e3 * constants.physical_constants["electron mass energy equivalent in MeV"][0]
_Y_PER_KEV_CM3_MPC = _SIGMA_T_CM2 / _ME_C2_KEV * _MPC_CM
"""Compton-y of a pressure of 1 keV cm^-3 integrated over 1 Mpc: sigma_T / (m_e c^2) * Mpc."""
_ARCMIN = math.pi / (180.0 * 60.0)
_IMAGE_SCALE = 1e6
"""Maps are stored as Compton-y times this factor."""
_CHUNK_ELEMENTS = 2**21
"""Sub-pixels rendered at once (each float64 temporary is 16 MiB)."""


def _positive(name: str, value: Any) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(array) & (array > 0.0)):
        raise ValueError(f"expected {name} > 0 and finite, got {value!r}")
    return array


def _redshift(z: Any) -> np.ndarray:
    array = np.asarray(z, dtype=np.float64)
    if not np.all(np.isfinite(array) & (array >= 0.0)):
        raise ValueError(f"expected z >= 0 and finite, got {z!r}")
    return array


def dimensionless_hubble(z: Any, *, omega_m: float = PLANCK18["omega_m"]) -> np.ndarray:
    r"""Dimensionless Hubble rate :math:`E(z) = H(z) / H_0` of a flat ΛCDM universe.

    .. math:: E(z)^2 = \Omega_m (1 + z)^3 + \Omega_\Lambda, \qquad \Omega_\Lambda = 1 - \Omega_m

    (radiation neglected: a relative error below :math:`10^{-4}` at :math:`z < 1`).

    Parameters
    ----------
    z : array-like
        Redshift, ``>= 0``.
    omega_m : float
        Matter density parameter today.
    """
    z = _redshift(z)
    if not 0.0 < omega_m <= 1.0:
        raise ValueError(f"expected 0 < omega_m <= 1, got {omega_m!r}")
    return np.sqrt(omega_m * (1.0 + z) ** 3 + 1.0 - omega_m)


def critical_density(
    z: Any, *, h: float = PLANCK18["h"], omega_m: float = PLANCK18["omega_m"]
) -> np.ndarray:
    r"""Critical density :math:`\rho_c(z) = 3 H(z)^2 / (8 \pi G)` in Msun Mpc^-3.

    Parameters
    ----------
    z : array-like
        Redshift.
    h : float
        :math:`H_0 / (100\ \mathrm{km\,s^{-1}\,Mpc^{-1}})`.
    omega_m : float
        Matter density parameter today.
    """
    if not h > 0.0:
        raise ValueError(f"expected h > 0, got {h!r}")
    hubble = 1e7 * h / _MPC_CM * dimensionless_hubble(z, omega_m=omega_m)  # s^-1
    return 3.0 * hubble**2 / (8.0 * math.pi * _GM_SUN) * (_MPC_CM / 100.0) ** 3


def angular_diameter_distance(
    z: float, *, h: float = PLANCK18["h"], omega_m: float = PLANCK18["omega_m"]
) -> float:
    r"""Angular-diameter distance in Mpc of a flat ΛCDM universe.

    .. math:: D_A(z) = \frac{c}{H_0 (1 + z)} \int_0^z \frac{dz'}{E(z')}
    """
    z = float(_redshift(z))
    if not h > 0.0:
        raise ValueError(f"expected h > 0, got {h!r}")
    hubble_distance = constants.c / 1e3 / (100.0 * h)
    comoving, _ = integrate.quad(
        lambda zz: 1.0 / dimensionless_hubble(zz, omega_m=omega_m), 0.0, z, epsabs=0.0
    )
    return hubble_distance * comoving / (1.0 + z)


def r500(
    m500: Any, z: Any, *, h: float = PLANCK18["h"], omega_m: float = PLANCK18["omega_m"]
) -> np.ndarray:
    r"""Radius :math:`R_{500}` in Mpc enclosing 500 times the critical density.

    .. math:: R_{500} = \left(\frac{3 M_{500}}{4 \pi \cdot 500\, \rho_c(z)}\right)^{1/3}

    Parameters
    ----------
    m500 : array-like
        :math:`M_{500}` in :math:`M_\odot`.
    z : array-like
        Redshift (broadcast against ``m500``).
    """
    m500 = _positive("m500", m500)
    rho = critical_density(z, h=h, omega_m=omega_m)
    return np.cbrt(3.0 * m500 / (4.0 * math.pi * 500.0 * rho))


def p500(
    m500: Any,
    z: Any,
    *,
    alpha_p: float = 0.12,
    h: float = PLANCK18["h"],
    omega_m: float = PLANCK18["omega_m"],
) -> np.ndarray:
    r"""Characteristic pressure :math:`P_{500}` in keV cm^-3 (Arnaud et al. 2010, eq. 5 and 7).

    .. math::
        P_{500} = 1.65 \times 10^{-3}\, E(z)^{8/3}
                  \left(\frac{M_{500}}{3 \times 10^{14}\, h_{70}^{-1} M_\odot}
                  \right)^{2/3 + \alpha_P} h_{70}^2\ \mathrm{keV\,cm^{-3}}

    with :math:`h_{70} = h / 0.7`. ``alpha_p=0.12`` is Arnaud's mass-dependent correction;
    ``alpha_p=0`` is strict self-similarity.

    Parameters
    ----------
    m500 : array-like
        :math:`M_{500}` in :math:`M_\odot`.
    z : array-like
        Redshift.
    """
    m500 = _positive("m500", m500)
    if not math.isfinite(alpha_p):
        raise ValueError(f"expected a finite alpha_p, got {alpha_p!r}")
    h70 = h / 0.7
    ez = dimensionless_hubble(z, omega_m=omega_m)
    return 1.65e-3 * ez ** (8.0 / 3.0) * (m500 * h70 / 3e14) ** (2.0 / 3.0 + alpha_p) * h70**2


def gnfw_shape(
    u: Any,
    *,
    gamma: float = ARNAUD2010["gamma"],
    alpha: float = ARNAUD2010["alpha"],
    beta: float = ARNAUD2010["beta"],
) -> np.ndarray:
    r"""Shape of the generalized NFW pressure profile.

    .. math:: g(u) = u^{-\gamma} (1 + u^\alpha)^{-(\beta - \gamma)/\alpha}

    with ``u = c500 r / r500`` the radius in units of the scale radius.
    """
    u = np.asarray(u, dtype=np.float64)
    return u ** (-gamma) * (1.0 + u**alpha) ** (-(beta - gamma) / alpha)


def gnfw_volume_integral(
    c500: Any,
    x: Any = 1.0,
    *,
    gamma: float = ARNAUD2010["gamma"],
    alpha: float = ARNAUD2010["alpha"],
    beta: float = ARNAUD2010["beta"],
) -> np.ndarray:
    r"""Volume integral of the gNFW shape inside ``x`` R500, in units of R500^3 / (4 pi).

    .. math::
        I(c, x) = \int_0^{x} g(c t)\, t^2\, dt
                = \frac{B\bigl(w;\, (3 - \gamma)/\alpha,\, (\beta - 3)/\alpha\bigr)}{\alpha\, c^3},
        \qquad w = \frac{(c x)^\alpha}{1 + (c x)^\alpha},

    with :math:`B(w; a, b)` the incomplete beta function (substitute :math:`s = (c t)^\alpha`).
    The spherical :math:`Y(< x R_{500}) \propto P_{500} P_0 R_{500}^3\, I(c_{500}, x)`.

    Parameters
    ----------
    c500 : array-like
        Profile concentration(s), ``> 0``.
    x : array-like
        Radius in units of R500 (broadcast against ``c500``), ``> 0``.
    """
    c500 = _positive("c500", c500)
    x = _positive("x", x)
    if not (0.0 <= gamma < 3.0 < beta and alpha > 0.0):
        raise ValueError(
            f"expected 0 <= gamma < 3 < beta and alpha > 0, got {gamma}, {beta}, {alpha}"
        )
    a, b = (3.0 - gamma) / alpha, (beta - 3.0) / alpha
    t = (c500 * x) ** alpha
    w = t / (1.0 + t)
    return special.betainc(a, b, w) * special.beta(a, b) / (alpha * c500**3)


def projected_gnfw_shape(
    u: Any,
    *,
    gamma: float = ARNAUD2010["gamma"],
    alpha: float = ARNAUD2010["alpha"],
    beta: float = ARNAUD2010["beta"],
    order: int = 16,
    panels: int = 48,
) -> np.ndarray:
    r"""Line-of-sight integral of :func:`gnfw_shape` through projected radius ``u``.

    .. math::
        G(u) = \int_{-\infty}^{\infty} g\bigl(\sqrt{u^2 + t^2}\bigr)\, dt
             = 2 \int_0^{\infty} g(u \cosh s)\, u \cosh s\, ds,

    with :math:`t = u \sinh s`, which turns the power-law tail into an exponential one; the
    integral runs to :math:`u \cosh s = \max(10^6, 10^3 u)` (for ``beta = 5.49`` the tail beyond
    is below :math:`10^{-13}` of the total) with composite Gauss–Legendre quadrature (``panels``
    panels of ``order`` nodes), vectorized over ``u``. Finite at ``u -> 0`` for ``gamma < 1``.

    Parameters
    ----------
    u : array-like, any shape
        Projected radius in units of the scale radius, ``> 0``.

    Returns
    -------
    numpy.ndarray, same shape as ``u``
    """
    u = _positive("u", u)
    nodes, weights = np.polynomial.legendre.leggauss(order)
    s_max = np.arccosh(np.maximum(1e6 / u, 1e3))[..., None]
    edges = np.linspace(0.0, 1.0, panels + 1)
    left, width = edges[:-1, None], np.diff(edges)[:, None]
    fraction = (left + 0.5 * width * (nodes + 1.0)).ravel()
    weight = (0.5 * width * weights).ravel()
    radius = u[..., None] * np.cosh(s_max * fraction)
    integrand = gnfw_shape(radius, gamma=gamma, alpha=alpha, beta=beta) * radius
    return 2.0 * s_max[..., 0] * (integrand @ weight)


@functools.lru_cache(maxsize=4)
def _log_projected_table(gamma: float, alpha: float, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """``(log u, log G(u))`` on 2,401 points over ``u`` in ``[1e-6, 1e6]``."""
    log_u = np.linspace(math.log(1e-6), math.log(1e6), 2401)
    shape = projected_gnfw_shape(np.exp(log_u), gamma=gamma, alpha=alpha, beta=beta)
    return log_u, np.log(shape)


def _projected_shape_interp(u: np.ndarray, gamma: float, alpha: float, beta: float) -> np.ndarray:
    """:func:`projected_gnfw_shape` by log-log interpolation of a cached table (error < 1e-5)."""
    log_u, log_g = _log_projected_table(gamma, alpha, beta)
    with np.errstate(divide="ignore"):
        x = np.log(u)
    return np.exp(np.interp(x, log_u, log_g, right=-np.inf))


def pressure_profile(
    r: Any,
    m500: Any,
    z: Any,
    *,
    c500: Any = ARNAUD2010["c500"],
    alpha_p: float = 0.12,
    p0: float = ARNAUD2010["p0"],
    gamma: float = ARNAUD2010["gamma"],
    alpha: float = ARNAUD2010["alpha"],
    beta: float = ARNAUD2010["beta"],
    h: float = PLANCK18["h"],
    omega_m: float = PLANCK18["omega_m"],
) -> np.ndarray:
    r"""Electron pressure of the generalized NFW model in keV cm^-3 (Arnaud et al. 2010).

    .. math::
        P(r) = P_{500}\, \frac{P_0\, h_{70}^{-3/2}}{(c_{500} x)^{\gamma}
               \left(1 + (c_{500} x)^{\alpha}\right)^{(\beta - \gamma)/\alpha}},
        \qquad x = r / R_{500}

    Parameters
    ----------
    r : array-like
        3-D radius in Mpc (broadcast against ``m500``, ``z`` and ``c500``).
    m500 : array-like
        :math:`M_{500}` in :math:`M_\odot`.
    z : array-like
        Redshift.
    c500 : array-like
        Concentration of the pressure profile.
    alpha_p : float
        Mass-dependence correction of :func:`p500`.
    """
    r = _positive("r", r)
    c500 = _positive("c500", c500)
    scale = r500(m500, z, h=h, omega_m=omega_m) / c500
    amplitude = p500(m500, z, alpha_p=alpha_p, h=h, omega_m=omega_m) * p0 * (h / 0.7) ** -1.5
    return amplitude * gnfw_shape(r / scale, gamma=gamma, alpha=alpha, beta=beta)


def compton_y_profile(
    radius: Any,
    m500: Any,
    z: Any,
    *,
    c500: Any = ARNAUD2010["c500"],
    alpha_p: float = 0.12,
    p0: float = ARNAUD2010["p0"],
    gamma: float = ARNAUD2010["gamma"],
    alpha: float = ARNAUD2010["alpha"],
    beta: float = ARNAUD2010["beta"],
    h: float = PLANCK18["h"],
    omega_m: float = PLANCK18["omega_m"],
) -> np.ndarray:
    r"""Compton-y of the generalized NFW pressure at projected radius ``radius`` (dimensionless).

    .. math::
        y(R) = \frac{\sigma_T}{m_e c^2} \int_{-\infty}^{\infty} P\bigl(\sqrt{R^2 + l^2}\bigr)\, dl
             = \frac{\sigma_T}{m_e c^2}\, P_{500} P_0 h_{70}^{-3/2}\, \frac{R_{500}}{c_{500}}\,
               G\!\left(\frac{c_{500} R}{R_{500}}\right)

    with :math:`G` from :func:`projected_gnfw_shape` (line of sight to infinity). A cylinder of
    radius :math:`k R_{500}` then holds :math:`Y \propto P_{500} R_{500}^3
    \propto E(z)^{2/3} M_{500}^{5/3 + \alpha_P}` for any fixed ``k`` and ``c500``.

    Parameters
    ----------
    radius : array-like
        Projected radius in Mpc (broadcast against ``m500``, ``z`` and ``c500``).
    m500, z, c500, alpha_p, ...
        As in :func:`pressure_profile`.
    """
    radius = _positive("radius", radius)
    c500 = _positive("c500", c500)
    scale = r500(m500, z, h=h, omega_m=omega_m) / c500
    amplitude = p500(m500, z, alpha_p=alpha_p, h=h, omega_m=omega_m) * p0 * (h / 0.7) ** -1.5
    shape = projected_gnfw_shape(radius / scale, gamma=gamma, alpha=alpha, beta=beta)
    return _Y_PER_KEV_CM3_MPC * amplitude * scale * shape


def median_concentration(
    m500: Any, z: float, *, model: str = "diemer19", cosmology: str = "planck18"
) -> np.ndarray:
    r"""Median :math:`c_{500c}(M_{500})` of a published concentration–mass relation (colossus).

    Evaluates ``colossus.halo.concentration.concentration(M, "500c", z, model=model)`` in the
    named colossus cosmology, without persisting the cosmology, and restores colossus' previous
    current cosmology afterwards. Colossus itself caches the tables of some models (Diemer &
    Joyce 2019's among them) in its cache directory; that directory is created here first, so
    that processes starting together do not trip over colossus' own check-then-create.

    Parameters
    ----------
    m500 : array-like
        :math:`M_{500}` in :math:`M_\odot` (colossus wants :math:`M_\odot / h`; converted here).
    z : float
        Redshift.
    model : str
        A colossus concentration model that supports ``500c`` (default Diemer & Joyce 2019).
    """
    from colossus.cosmology import cosmology as colossus_cosmology
    from colossus.halo import concentration as colossus_concentration

    m500 = _positive("m500", m500)
    _colossus_cache_dir("halo.concentration")
    previous = colossus_cosmology.current_cosmo
    try:
        cosmo = colossus_cosmology.setCosmology(cosmology, persistence="")
        values = colossus_concentration.concentration(m500 * cosmo.h, "500c", float(z), model=model)
    finally:
        colossus_cosmology.current_cosmo = previous
    values = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(values) & (values > 0.0)):
        raise ValueError(
            f"concentration model {model!r} is not valid for log10 M500 in "
            f"[{np.log10(m500.min()):.2f}, {np.log10(m500.max()):.2f}] at z={z}"
        )
    return values


def _colossus_cache_dir(module: str) -> str:
    """Colossus' cache directory for ``module``, created if absent.

    ``colossus.utils.storage.getCacheDir`` checks for the directory and then creates it; a second
    process creating it in between raises ``FileExistsError`` there, which colossus' concentration
    models turn into NaN. The directory exists once that error is raised, so one retry suffices.
    """
    from colossus.utils import storage

    try:
        return storage.getCacheDir(module=module)
    except FileExistsError:
        return storage.getCacheDir(module=module)


def _check_range(name: str, value: Any, low: float, high: float) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"expected {name} = (low, high), got {value!r}") from err
    if not (low <= a <= b <= high):
        raise ValueError(f"expected {low} <= {name}[0] <= {name}[1] <= {high}, got {value!r}")
    return a, b


def _check_nonnegative(name: str, value: Any) -> float:
    value = float(value)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"expected {name} >= 0, got {value!r}")
    return value


def _render(
    centers: np.ndarray,
    axis_ratio: np.ndarray,
    orientation: np.ndarray,
    scale_arcmin: np.ndarray,
    amplitude: np.ndarray,
    subpixels: np.ndarray,
) -> np.ndarray:
    r"""Elliptical projected-gNFW maps on a sub-pixel grid.

    Each component ``k`` is :math:`A_k\, G(R_k / s_k)` with the area-preserving elliptical radius
    :math:`R^2 = q\, x'^2 + y'^2 / q` (major axis along :math:`x'`, rotated by the orientation).

    Parameters
    ----------
    centers : shape ``(k, 2)``, arcmin ``(x, y)``
    axis_ratio, orientation, scale_arcmin, amplitude : shape ``(k,)``
    subpixels : shape ``(m,)``, sub-pixel centres along each axis, arcmin

    Returns
    -------
    numpy.ndarray, shape ``(k, m, m)``
    """
    dx = subpixels[None, None, :] - centers[:, 0, None, None]
    dy = subpixels[None, :, None] - centers[:, 1, None, None]
    cos, sin = np.cos(orientation)[:, None, None], np.sin(orientation)[:, None, None]
    along = dx * cos + dy * sin
    across = dy * cos - dx * sin
    q = axis_ratio[:, None, None]
    radius = np.sqrt(q * along**2 + across**2 / q)
    radius /= scale_arcmin[:, None, None]
    shape = _projected_shape_interp(
        radius, ARNAUD2010["gamma"], ARNAUD2010["alpha"], ARNAUD2010["beta"]
    )
    return amplitude[:, None, None] * shape


def _bin(maps: np.ndarray, oversample: int) -> np.ndarray:
    """Average ``oversample x oversample`` blocks: ``(k, m, m) -> (k, m / o, m / o)``."""
    k, m, _ = maps.shape
    size = m // oversample
    return maps.reshape(k, size, oversample, size, oversample).mean(axis=(2, 4))


def simulate(
    num: int,
    size: int = 32,
    seed: int = 0,
    *,
    z: float = 0.1,
    fov_arcmin: float = 60.0,
    log10_mass_range: tuple[float, float] = (13.5, 15.0),
    concentration_model: str = "diemer19",
    concentration_scatter: float = 0.16,
    alpha_p: float = 0.12,
    axis_ratio_range: tuple[float, float] = (0.6, 1.0),
    offset_sd: float = 0.05,
    disturbed_fraction: float = 0.07,
    beam_fwhm_arcmin: float = 1.5,
    noise_arcmin: float = 0.5,
    oversample: int = 2,
) -> xr.Dataset:
    r"""Simulate thermal SZ Compton-y maps of halos at a fixed redshift in a fixed field of view.

    Guided auxiliaries (the physics the latent space must align with):

    - ``log10_M500`` ~ Uniform(``log10_mass_range``) (units ``Msun``; already a log);
    - ``concentration`` :math:`c_{500c}`: the median of the colossus ``concentration_model``
      at that mass and ``z`` (:func:`median_concentration`) times a log-normal scatter of
      ``concentration_scatter`` dex (default 0.16, the scatter of Diemer & Joyce 2019).

    Each halo's pressure follows Arnaud et al. (2010) (:func:`pressure_profile`) with the
    profile concentration scaled by the halo's, :math:`c_{500}^{\mathrm{gNFW}} = 1.177\, c /
    \langle c \rangle(M)`, and the normalization rescaled so that the spherical
    :math:`Y(< R_{500})` (the thermal energy inside :math:`R_{500}`) is that of Arnaud's profile,
    :math:`P_0 \to P_0\, I(1.177) / I(c_{500})` (:func:`gnfw_volume_integral`): at fixed mass
    a more concentrated halo has a brighter, steeper core and fainter outskirts, and the
    :math:`Y`–:math:`M` relation keeps its slope :math:`5/3 + \alpha_P`. The map is the
    projected Compton-y (:func:`compton_y_profile`) on a ``fov_arcmin`` square seen at
    angular-diameter distance :math:`D_A(z)`: a more massive halo is both larger
    (:math:`R_{500} \propto M^{1/3}`) and brighter (:math:`y \propto M^{1 + \alpha_P}`).
    Pixel values are averages over ``oversample x oversample`` sub-pixels.

    Residual variability (not auxiliaries; the truths are kept as plain variables):

    - ``axis_ratio`` :math:`q` ~ Uniform(``axis_ratio_range``) of area-preserving elliptical
      isobars (the major semi-axis is :math:`R / \sqrt{q}`), ``orientation`` ~ Uniform[0, π);
    - centroid offsets ``offset_x``, ``offset_y`` ~ N(0, ``offset_sd`` :math:`R_{500}`) (arcmin);
    - a rare ``disturbed`` population (probability ``disturbed_fraction``): three times the
      centroid offset, and 1 + Poisson(1) substructure clumps, each a spherical gNFW halo of
      mass fraction LogUniform[0.05, 0.3] of the host at a distance Uniform[0.3, 1.2]
      :math:`R_{500}` in a uniform direction (``n_clumps``);
    - a Gaussian beam of FWHM ``beam_fwhm_arcmin`` (``0`` disables; reflecting edges);
    - white Gaussian noise of level ``noise_arcmin`` (Compton-y times :math:`10^6` times arcmin:
      the standard deviation of the map averaged over one arcmin²), i.e. a pixel standard
      deviation ``noise_arcmin / pixel_arcmin`` (default 0.5, about 0.27 per pixel at
      ``size=32``; ``0`` disables).

    Parameters
    ----------
    num : int
        Number of maps.
    size : int
        Pixels per side; must be such that the maps are well sampled (``fov_arcmin / size``
        is the pixel size in arcmin).
    seed : int
        Seed of ``numpy.random.default_rng``.
    z : float
        Redshift of every halo.
    fov_arcmin : float
        Side of the square field of view, arcmin (default 60, about 6.9 Mpc at ``z=0.1``;
        :math:`R_{500}` spans 4.2 to 13.2 arcmin for the default masses).
    alpha_p : float
        Mass-dependence correction of :func:`p500` (0 for strict self-similarity).

    Returns
    -------
    xarray.Dataset
        ``image`` ``(sample, y, x)``: Compton-y times :math:`10^6`; coordinates ``x``, ``y``:
        pixel centres in arcmin from the field centre; auxiliaries ``log10_M500`` and
        ``concentration``; non-auxiliary variables ``disturbed`` (bool), ``n_clumps``,
        ``axis_ratio``, ``orientation`` (rad), ``offset_x``, ``offset_y`` (arcmin),
        ``r500_arcmin``, and ``c500`` and ``p0`` (the gNFW concentration and normalization
        used: pass them to :func:`compton_y_profile` to reproduce a map's profile).
    """
    return _simulation(
        num,
        size,
        seed,
        z=z,
        fov_arcmin=fov_arcmin,
        log10_mass_range=log10_mass_range,
        concentration_model=concentration_model,
        concentration_scatter=concentration_scatter,
        alpha_p=alpha_p,
        axis_ratio_range=axis_ratio_range,
        offset_sd=offset_sd,
        disturbed_fraction=disturbed_fraction,
        beam_fwhm_arcmin=beam_fwhm_arcmin,
        noise_arcmin=noise_arcmin,
        oversample=oversample,
    ).dataset()


def _simulation(
    num: int,
    size: int,
    seed: int,
    *,
    z: float = 0.1,
    fov_arcmin: float = 60.0,
    log10_mass_range: tuple[float, float] = (13.5, 15.0),
    concentration_model: str = "diemer19",
    concentration_scatter: float = 0.16,
    alpha_p: float = 0.12,
    axis_ratio_range: tuple[float, float] = (0.6, 1.0),
    offset_sd: float = 0.05,
    disturbed_fraction: float = 0.07,
    beam_fwhm_arcmin: float = 1.5,
    noise_arcmin: float = 0.5,
    oversample: int = 2,
) -> Simulation:
    """:func:`simulate` before the images: every halo's parameters, then the maps block by block."""
    z = float(_redshift(z))
    fov_arcmin = float(_positive("fov_arcmin", fov_arcmin))
    lo_m, hi_m = _check_range("log10_mass_range", log10_mass_range, 10.0, 16.5)
    lo_q, hi_q = _check_range("axis_ratio_range", axis_ratio_range, 1e-3, 1.0)
    scatter = _check_nonnegative("concentration_scatter", concentration_scatter)
    offset_sd = _check_nonnegative("offset_sd", offset_sd)
    beam = _check_nonnegative("beam_fwhm_arcmin", beam_fwhm_arcmin)
    noise_arcmin = _check_nonnegative("noise_arcmin", noise_arcmin)
    if not 0.0 <= disturbed_fraction <= 1.0:
        raise ValueError(f"expected 0 <= disturbed_fraction <= 1, got {disturbed_fraction!r}")
    if isinstance(oversample, bool) or not isinstance(oversample, int) or oversample < 1:
        raise ValueError(f"expected oversample >= 1 (an int), got {oversample!r}")
    if not math.isfinite(alpha_p):
        raise ValueError(f"expected a finite alpha_p, got {alpha_p!r}")

    rng = np.random.default_rng(seed)
    log10_m = rng.uniform(lo_m, hi_m, num)
    mass = 10.0**log10_m
    grid_m = np.linspace(lo_m, hi_m, 65) if hi_m > lo_m else np.array([lo_m])
    median_c = median_concentration(10.0**grid_m, z, model=concentration_model)
    c_median = np.exp(np.interp(log10_m, grid_m, np.log(median_c)))
    concentration = c_median * 10.0 ** (scatter * rng.standard_normal(num))
    c500 = ARNAUD2010["c500"] * concentration / c_median
    axis_ratio = rng.uniform(lo_q, hi_q, num)
    orientation = rng.uniform(0.0, math.pi, num)
    disturbed = rng.random(num) < disturbed_fraction
    arcmin_mpc = angular_diameter_distance(z) * _ARCMIN
    r500_arcmin = r500(mass, z) / arcmin_mpc
    offsets = (
        rng.standard_normal((num, 2)) * (offset_sd * r500_arcmin * (1.0 + 2.0 * disturbed))[:, None]
    )
    n_clumps = np.where(disturbed, 1 + rng.poisson(1.0, num), 0)
    host = np.repeat(np.arange(num), n_clumps)
    clump_mass = mass[host] * np.exp(rng.uniform(math.log(0.05), math.log(0.3), host.size))
    clump_distance = rng.uniform(0.3, 1.2, host.size) * r500_arcmin[host]
    clump_angle = rng.uniform(0.0, 2.0 * math.pi, host.size)
    clump_centers = offsets[host] + clump_distance[:, None] * np.stack(
        [np.cos(clump_angle), np.sin(clump_angle)], axis=1
    )

    p0 = ARNAUD2010["p0"] * gnfw_volume_integral(ARNAUD2010["c500"]) / gnfw_volume_integral(c500)

    def amplitude(m: np.ndarray, c: np.ndarray, p0: np.ndarray) -> np.ndarray:
        scale_mpc = r500(m, z) / c
        p = p500(m, z, alpha_p=alpha_p) * p0 * (PLANCK18["h"] / 0.7) ** -1.5
        return _IMAGE_SCALE * _Y_PER_KEV_CM3_MPC * p * scale_mpc

    pixel = fov_arcmin / size
    coords = (np.arange(size) + 0.5 - 0.5 * size) * pixel
    subpixels = (np.arange(size * oversample) + 0.5 - 0.5 * size * oversample) * (
        pixel / oversample
    )
    chunk = max(1, _CHUNK_ELEMENTS // subpixels.size**2)
    main_amplitude = amplitude(mass, c500, p0)
    clump_c500 = np.full(host.size, ARNAUD2010["c500"])
    clump_amplitude = amplitude(clump_mass, clump_c500, ARNAUD2010["p0"])
    clump_scale = r500(clump_mass, z) / arcmin_mpc / clump_c500

    def blocks() -> Iterator[np.ndarray]:
        for start in range(0, num, chunk):
            part = slice(start, start + chunk)
            maps = _render(
                offsets[part],
                axis_ratio[part],
                orientation[part],
                r500_arcmin[part] / c500[part],
                main_amplitude[part],
                subpixels,
            )
            images = _bin(maps, oversample).astype(np.float32)
            clumps = slice(*np.searchsorted(host, [start, start + len(images)]))
            if clumps.stop > clumps.start:
                count = clumps.stop - clumps.start
                maps = _render(
                    clump_centers[clumps],
                    np.ones(count),
                    np.zeros(count),
                    clump_scale[clumps],
                    clump_amplitude[clumps],
                    subpixels,
                )
                np.add.at(images, host[clumps] - start, _bin(maps, oversample).astype(np.float32))
            if beam > 0.0:
                sigma = beam / (2.0 * math.sqrt(2.0 * math.log(2.0))) / pixel
                images = ndimage.gaussian_filter(images, sigma=(0.0, sigma, sigma), mode="reflect")
            if noise_arcmin > 0.0:  # one stream in sample order: the same noise in any blocks
                noise_sd = noise_arcmin / pixel
                images += noise_sd * rng.standard_normal(images.shape, dtype=np.float32)
            yield images

    def decorate(ds: xr.Dataset) -> xr.Dataset:
        ds["image"].attrs.update(long_name="Compton-y parameter times 1e6", units="1e-6")
        ds = ds.assign_coords(x=("x", coords), y=("y", coords))
        for axis in ("x", "y"):
            ds[axis].attrs.update(units="arcmin", long_name=f"{axis} offset from the field centre")
        for name, units in (
            ("axis_ratio", ""),
            ("orientation", "rad"),
            ("offset_x", "arcmin"),
            ("offset_y", "arcmin"),
            ("r500_arcmin", "arcmin"),
            ("c500", ""),
            ("p0", "h70^-3/2"),
            ("n_clumps", ""),
        ):
            ds[name].attrs["units"] = units
        ds["disturbed"].attrs["long_name"] = "has substructure clumps (rare tail; not an auxiliary)"
        return ds

    return Simulation(
        num,
        blocks(),
        {"log10_M500": log10_m, "concentration": concentration},
        units={"log10_M500": "Msun", "concentration": ""},
        transforms={"concentration": "log"},
        extra={
            "disturbed": disturbed,
            "n_clumps": n_clumps,
            "axis_ratio": axis_ratio,
            "orientation": orientation,
            "offset_x": offsets[:, 0],
            "offset_y": offsets[:, 1],
            "r500_arcmin": r500_arcmin,
            "c500": c500,
            "p0": p0,
        },
        attrs={
            "simulator": "halos",
            "seed": seed,
            "z": z,
            "fov_arcmin": fov_arcmin,
            "pixel_arcmin": pixel,
            "angular_diameter_distance_mpc": arcmin_mpc / _ARCMIN,
            "cosmology": "flat LCDM, Planck 2018 (h=0.6766, Omega_m=0.3111)",
            "pressure_profile": "generalized NFW, Arnaud et al. 2010 (A&A 517, A92)",
            "alpha_p": float(alpha_p),
            "concentration_model": concentration_model,
            "concentration_scatter_dex": scatter,
            "log10_mass_range": [lo_m, hi_m],
            "axis_ratio_range": [lo_q, hi_q],
            "offset_sd_r500": offset_sd,
            "disturbed_fraction": float(disturbed_fraction),
            "beam_fwhm_arcmin": beam,
            "noise_arcmin": noise_arcmin,
            "oversample": oversample,
        },
        decorate=decorate,
    )
