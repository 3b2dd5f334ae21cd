"""Tests of the built-in simulators: layout, seeding and the physics each one claims."""

from __future__ import annotations

import math

import numpy as np
import pytest
import xarray as xr
from scipy import constants, integrate, optimize, stats

from pyro_dlatent.data import (
    check_dataset,
    galaxies,
    halos,
    load,
    make_scaler,
    save,
    simulate,
    sources,
)

AUX = {
    "sources": ["x0", "y0", "log_amplitude", "width"],
    "halos": ["log10_M500", "concentration"],
    "galaxies": ["flux", "scale_radius", "g1", "g2", "psf_fwhm"],
}
QUIET_HALOS = {
    "concentration_scatter": 0.0,
    "axis_ratio_range": (1.0, 1.0),
    "offset_sd": 0.0,
    "disturbed_fraction": 0.0,
    "beam_fwhm_arcmin": 0.0,
    "noise_arcmin": 0.0,
}
"""Halo options that switch every residual off: the maps are the spherical median profile."""


def _aperture_sum(ds: xr.Dataset, radius: np.ndarray) -> np.ndarray:
    """Sum of each map over the pixels whose centres lie within ``radius[s]`` of the centre."""
    distance = np.hypot(ds["x"].values[None, :], ds["y"].values[:, None])
    inside = distance[None] < np.asarray(radius)[:, None, None]
    return (ds["image"].values.astype(np.float64) * inside).sum(axis=(1, 2))


# --- every simulator -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(AUX))
def test_layout_units_and_finiteness(name, tmp_path):
    ds = simulate(name, 12, size=16, seed=3)
    check_dataset(ds)
    assert ds["image"].dims == ("sample", "y", "x")
    assert ds["image"].shape == (12, 16, 16)
    assert ds.attrs["aux_names"] == AUX[name]
    assert ds["x"].shape == (16,) and ds["y"].shape == (16,)
    assert np.all(np.diff(ds["x"].values) > 0)
    for aux in AUX[name]:
        assert ds[aux].dims == ("sample",)
        assert "units" in ds[aux].attrs
        assert np.isfinite(ds[aux].values).all()
    assert np.isfinite(ds["image"].values).all()
    assert ds["image"].values.std() > 0
    scaler = make_scaler(ds)
    assert list(scaler.names) == AUX[name]
    path = save(ds, tmp_path / f"{name}.nc")
    back = load(path)
    xr.testing.assert_allclose(back, ds)


@pytest.mark.parametrize("name", sorted(AUX))
def test_same_seed_same_dataset_other_seed_differs(name):
    first = simulate(name, 6, size=16, seed=11)
    again = simulate(name, 6, size=16, seed=11)
    other = simulate(name, 6, size=16, seed=12)
    xr.testing.assert_identical(first, again)
    assert not np.array_equal(first["image"].values, other["image"].values)
    for aux in AUX[name]:
        assert not np.array_equal(first[aux].values, other[aux].values)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("sources", {"residual_sd": -1.0}, "residual_sd"),
        ("sources", {"length_scale": 0.0}, "length_scale"),
        ("sources", {"smoothness": 0.0}, "smoothness"),
        ("sources", {"center_range": (0.5, 1.5)}, "center_range"),
        ("sources", {"width_range": (0.0, 0.1)}, "width_range"),
        ("halos", {"z": -0.1}, "z"),
        ("halos", {"fov_arcmin": 0.0}, "fov_arcmin"),
        ("halos", {"log10_mass_range": (15.0, 14.0)}, "log10_mass_range"),
        ("halos", {"disturbed_fraction": 1.5}, "disturbed_fraction"),
        ("halos", {"noise_arcmin": -1.0}, "noise_arcmin"),
        ("halos", {"oversample": 0}, "oversample"),
        ("galaxies", {"pixel_scale": 0.0}, "pixel_scale"),
        ("galaxies", {"shear_range": (-0.8, 0.8)}, "shear_range"),
        ("galaxies", {"flux_range": (0.0, 1.0)}, "flux_range"),
        ("galaxies", {"noise_sd": -1.0}, "noise_sd"),
    ],
)
def test_bad_options_raise_naming_the_argument(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        simulate(name, 2, size=16, seed=0, **kwargs)


# --- sources ---------------------------------------------------------------------------------


def test_sources_grid_matches_fem_nodes():
    ds = simulate("sources", 4, size=17, seed=0, residual_sd=0.0)
    np.testing.assert_array_equal(ds["x"].values, np.linspace(0.0, 1.0, 17))
    bump = sources.gaussian_bump(
        np.linspace(0.0, 1.0, 17),
        np.linspace(0.0, 1.0, 17),
        *(ds[k].values for k in AUX["sources"]),
    )
    # image[s, i, j] is the field at (x_j, y_i): the bump is not symmetric in (i, j).
    np.testing.assert_allclose(ds["image"].values, bump, rtol=1e-6, atol=1e-6)
    assert not np.allclose(bump, bump.transpose(0, 2, 1))


def test_sources_bump_location_exact_without_residual():
    # ln f is quadratic along each axis for a Gaussian bump, so a parabola through the log of
    # the three nodes around the maximum recovers the centre exactly (up to float32 rounding).
    ds = simulate("sources", 50, size=32, seed=1, residual_sd=0.0)
    image = ds["image"].values.astype(np.float64)
    t, h = ds["x"].values, 1.0 / 31
    for s in range(50):
        i, j = np.unravel_index(np.argmax(image[s]), image[s].shape)
        estimates = []
        for line, k in ((image[s, i, :], j), (image[s, :, j], i)):
            left, mid, right = np.log(line[k - 1 : k + 2])
            estimates.append(t[k] + 0.5 * h * (left - right) / (left - 2.0 * mid + right))
        np.testing.assert_allclose(estimates, [ds["x0"][s], ds["y0"][s]], atol=1e-4)


def test_sources_bump_location_recovered_within_residual_error():
    # Least squares of the bump model started from the image's argmax. Linearizing the fit
    # around the truth, theta_hat - theta = (J^T J)^-1 J^T r with r ~ N(0, C) the Matérn
    # residual, so the error of each parameter has sd sqrt(diag(A C A^T)), A = (J^T J)^-1 J^T.
    # Over 2 x 60 standardized errors: max |z| < 5 (each exceeds with p = 6e-7) and the mean
    # z^2 is 1 within 4.5 sd of a chi^2_1 mean over 120 draws (sd sqrt(2 / 120)).
    size, residual_sd, length_scale, smoothness = 32, 0.1, 0.15, 1.0
    num = 60
    ds = simulate(
        "sources",
        num,
        size=size,
        seed=2,
        residual_sd=residual_sd,
        length_scale=length_scale,
        smoothness=smoothness,
    )
    t = ds["x"].values
    cov = sources.residual_covariance(
        t.size, sd=residual_sd, length_scale=length_scale, smoothness=smoothness
    )

    def model(theta):
        return sources.gaussian_bump(t, t, *(np.array([v]) for v in theta))[0].ravel()

    z = []
    for s in range(num):
        image = ds["image"].values[s].astype(np.float64)
        i, j = np.unravel_index(np.argmax(image), image.shape)
        start = [t[j], t[i], math.log(max(image[i, j], 0.5)), 0.1]
        fit = optimize.least_squares(lambda theta, im=image: model(theta) - im.ravel(), start)
        truth = np.array([ds[k].values[s] for k in AUX["sources"]])
        jac = optimize.approx_fprime(truth, model, 1e-7)
        lin = np.linalg.solve(jac.T @ jac, jac.T)
        sd = np.sqrt(np.diag(lin @ cov @ lin.T))
        z.append((fit.x[:2] - truth[:2]) / sd[:2])
    z = np.array(z)
    assert np.abs(z).max() < 5.0
    assert abs((z**2).mean() - 1.0) < 4.5 * math.sqrt(2.0 / z.size)


def test_residual_covariance_pairs_nodes_in_image_order():
    # Entry [a, b] is C(|p_a - p_b|) with node (i, j) of the image at (x_j, y_i), flat i * size + j.
    size = 5
    cov = sources.residual_covariance(size, sd=0.3, length_scale=0.2, smoothness=1.5)
    h = 1.0 / (size - 1)
    assert cov.shape == (size * size, size * size)
    np.testing.assert_allclose(cov, cov.T)
    for (i, j), (k, m) in [((0, 0), (0, 1)), ((0, 0), (1, 0)), ((1, 2), (4, 0)), ((3, 3), (3, 3))]:
        expected = sources.matern_covariance(
            np.array(math.hypot(i - k, j - m) * h), sd=0.3, length_scale=0.2, smoothness=1.5
        )
        assert cov[i * size + j, k * size + m] == pytest.approx(float(expected), rel=1e-12)
    assert np.linalg.eigvalsh(cov).min() > 0


def test_sources_residual_has_matern_covariance():
    # The residual image - bump(aux) must have covariance C(lag) at every pair of nodes. For each
    # lag, the per-sample mean of r_a r_b over node pairs is i.i.d. across samples, so its sample
    # mean has Monte Carlo error sd / sqrt(n); 4.5 of those bound each check (p < 7e-6 each).
    size, num = 16, 3000
    residual_sd, length_scale, smoothness = 0.3, 0.2, 1.5
    ds = simulate(
        "sources",
        num,
        size=size,
        seed=4,
        residual_sd=residual_sd,
        length_scale=length_scale,
        smoothness=smoothness,
    )
    t = ds["x"].values
    bump = sources.gaussian_bump(t, t, *(ds[k].values for k in AUX["sources"]))
    residual = ds["image"].values.astype(np.float64) - bump
    assert abs(residual.mean()) < 4.5 * residual_sd / math.sqrt(num)
    h = 1.0 / (size - 1)
    for dy, dx in [(0, 0), (0, 1), (1, 0), (1, 1), (0, 3), (2, -2), (5, 0), (0, 10)]:
        a = residual[:, : size - dy, max(0, -dx) : size - max(0, dx)]
        b = residual[:, dy:, max(0, dx) : size - max(0, -dx)]
        per_sample = (a * b).mean(axis=(1, 2))
        expected = sources.matern_covariance(
            np.array(math.hypot(dx, dy) * h),
            sd=residual_sd,
            length_scale=length_scale,
            smoothness=smoothness,
        )
        error = per_sample.std(ddof=1) / math.sqrt(num)
        assert abs(per_sample.mean() - expected) < 4.5 * error, (dy, dx)


def test_matern_sampler_shapes_and_exponential_special_case():
    rng = np.random.default_rng(0)
    fields = sources.sample_matern_field(5, 9, sd=1.0, length_scale=0.3, smoothness=0.5, rng=rng)
    assert fields.shape == (5, 9, 9)
    assert np.isfinite(fields).all()
    assert (
        sources.sample_matern_field(3, 9, sd=0.0, length_scale=0.3, smoothness=0.5, rng=rng) == 0
    ).all()
    np.testing.assert_allclose(
        sources.matern_covariance(np.array([0.0, 0.2]), sd=2.0, length_scale=0.2, smoothness=0.5),
        [4.0, 4.0 * math.exp(-1.0)],
        rtol=1e-12,
    )


# --- halos -----------------------------------------------------------------------------------


def test_halo_cosmology_matches_colossus():
    from colossus.cosmology import cosmology

    previous = cosmology.current_cosmo
    try:
        cosmo = cosmology.setCosmology("planck18", persistence="")
        for z in (0.0, 0.1, 0.5):
            # colossus: rho_c in Msun h^2 / kpc^3, distances in Mpc / h; it also counts
            # radiation (relative effect on E(z) ~ 1e-4 at these z), hence 1e-3.
            np.testing.assert_allclose(
                halos.critical_density(z), cosmo.rho_c(z) * 1e9 * cosmo.h**2, rtol=1e-3
            )
            np.testing.assert_allclose(halos.dimensionless_hubble(z), cosmo.Ez(z), rtol=1e-3)
            if z > 0:
                np.testing.assert_allclose(
                    halos.angular_diameter_distance(z),
                    cosmo.angularDiameterDistance(z) / cosmo.h,
                    rtol=1e-3,
                )
    finally:
        cosmology.current_cosmo = previous
    assert cosmology.current_cosmo is previous


def test_halo_p500_and_r500_definitions():
    h70 = halos.PLANCK18["h"] / 0.7
    pivot = 3e14 / h70
    for alpha_p in (0.0, 0.12):
        np.testing.assert_allclose(halos.p500(pivot, 0.0, alpha_p=alpha_p), 1.65e-3 * h70**2)
        ratio = halos.p500(10 * pivot, 0.3, alpha_p=alpha_p) / halos.p500(
            pivot, 0.3, alpha_p=alpha_p
        )
        np.testing.assert_allclose(ratio, 10 ** (2 / 3 + alpha_p))
    m, z = 2e14, 0.2
    radius = halos.r500(m, z)
    mean_density = m / (4.0 / 3.0 * math.pi * radius**3)
    np.testing.assert_allclose(mean_density, 500.0 * halos.critical_density(z), rtol=1e-12)


@pytest.mark.parametrize("c500", [1.177, 2.5])
def test_halo_projected_profile_matches_direct_line_of_sight_integral(c500):
    m500, z = 4e14, 0.1
    r500 = float(halos.r500(m500, z))
    # sigma_T / (m_e c^2) in cm^2 / keV, times one Mpc in cm (the line of sight is in Mpc).
    sigma_t = constants.physical_constants["Thomson cross section"][0] * 1e4
    me_c2 = constants.physical_constants["electron mass energy equivalent in MeV"][0] * 1e3
    factor = sigma_t / me_c2 * constants.parsec * 1e8
    for x in (0.01, 0.1, 0.5, 1.0, 2.0, 4.0):
        radius = x * r500

        def pressure(los, radius=radius):
            return float(halos.pressure_profile(math.hypot(radius, los), m500, z, c500=c500))

        direct, _ = integrate.quad(pressure, 0.0, np.inf, limit=400, epsrel=1e-9)
        direct *= 2.0 * factor
        projected = float(halos.compton_y_profile(radius, m500, z, c500=c500))
        assert abs(projected / direct - 1.0) < 1e-3, x


def test_halo_volume_integral_matches_quadrature():
    for c500 in (0.5, 1.177, 3.0):
        for x in (0.3, 1.0, 5.0):
            direct, _ = integrate.quad(
                lambda t, c500=c500: float(halos.gnfw_shape(c500 * t)) * t**2, 0.0, x, epsrel=1e-10
            )
            np.testing.assert_allclose(halos.gnfw_volume_integral(c500, x), direct, rtol=1e-8)


def test_halo_concentration_reshapes_but_keeps_spherical_y500():
    # The simulator rescales P0 with the concentration so that the thermal energy inside R500,
    # Y_sph(< R500) = int_0^R500 P(r) 4 pi r^2 dr, is Arnaud's at every concentration.
    ds = simulate("halos", 6, size=8, seed=14, oversample=1)
    z = ds.attrs["z"]
    for s in range(6):
        m500 = 10.0 ** ds["log10_M500"].values[s]
        radius = float(halos.r500(m500, z))

        def y_sphere(c500, p0, m500=m500, radius=radius):
            def shell(r):
                return float(halos.pressure_profile(r, m500, z, c500=c500, p0=p0)) * r**2

            return integrate.quad(shell, 0.0, radius, epsrel=1e-10, limit=200)[0]

        nominal = y_sphere(halos.ARNAUD2010["c500"], halos.ARNAUD2010["p0"])
        actual = y_sphere(ds["c500"].values[s], ds["p0"].values[s])
        np.testing.assert_allclose(actual, nominal, rtol=1e-6)
    assert ds["c500"].values.std() > 0


def test_halo_map_is_the_profile_at_pixel_centres():
    ds = simulate("halos", 8, size=32, seed=5, oversample=1, **QUIET_HALOS)
    distance_arcmin = np.hypot(ds["x"].values[None, :], ds["y"].values[:, None])
    to_mpc = ds.attrs["angular_diameter_distance_mpc"] * math.pi / (180.0 * 60.0)
    for s in range(8):
        expected = 1e6 * halos.compton_y_profile(
            distance_arcmin * to_mpc, 10.0 ** ds["log10_M500"].values[s], ds.attrs["z"]
        )
        np.testing.assert_allclose(ds["image"].values[s], expected, rtol=1e-4)


@pytest.mark.parametrize("alpha_p", [0.12, 0.0])
def test_halo_integrated_y_scales_as_m_to_5_3_plus_alpha_p(alpha_p):
    # In a cylinder of radius k R500 (same k for all masses) Y = P500 R500^3 / D_A^2 times a
    # mass-independent integral, so d log Y / d log M = 5/3 + alpha_P exactly; k = 2 keeps the
    # largest halo (R500 = 13.2 arcmin) inside the 60 arcmin field.
    ds = simulate("halos", 40, size=32, seed=6, alpha_p=alpha_p, **QUIET_HALOS)
    y_aperture = _aperture_sum(ds, 2.0 * ds["r500_arcmin"].values) * ds.attrs["pixel_arcmin"] ** 2
    slope = np.polyfit(ds["log10_M500"].values, np.log10(y_aperture), 1)[0]
    assert abs(slope - (5.0 / 3.0 + alpha_p)) < 0.05


def test_halo_higher_concentration_is_more_centrally_concentrated():
    quiet = {**QUIET_HALOS, "concentration_scatter": 0.2}
    ds = simulate("halos", 60, size=32, seed=7, **quiet)
    r500 = ds["r500_arcmin"].values
    inner = _aperture_sum(ds, 0.5 * r500) / _aperture_sum(ds, 2.0 * r500)
    relative_c = ds["concentration"].values / halos.median_concentration(
        10.0 ** ds["log10_M500"].values, ds.attrs["z"]
    )
    np.testing.assert_allclose(relative_c, ds["c500"].values / 1.177, rtol=1e-3)
    rho = stats.spearmanr(relative_c, inner).statistic
    assert rho > 0.9


def test_halo_concentration_scatter_and_disturbed_fraction():
    # log10(c / <c>(M)) ~ N(0, 0.16^2): mean within 4.5 sd / sqrt(n), sd within 4.5 sd / sqrt(2n);
    # disturbed ~ Bernoulli(0.07): the fraction within 4.5 binomial standard errors.
    num, scatter, fraction = 3000, 0.16, 0.07
    ds = simulate("halos", num, size=8, seed=8, oversample=1, disturbed_fraction=fraction)
    log_ratio = np.log10(ds["c500"].values / 1.177)
    assert abs(log_ratio.mean()) < 4.5 * scatter / math.sqrt(num)
    assert abs(log_ratio.std(ddof=1) - scatter) < 4.5 * scatter / math.sqrt(2 * num)
    disturbed = ds["disturbed"].values
    assert disturbed.dtype == bool
    assert abs(disturbed.mean() - fraction) < 4.5 * math.sqrt(fraction * (1 - fraction) / num)
    assert ((ds["n_clumps"].values > 0) == disturbed).all()
    assert "disturbed" not in ds.attrs["aux_names"]


def test_halo_noise_level_and_beam_conserve_the_signal():
    base = {**QUIET_HALOS, "disturbed_fraction": 0.2, "offset_sd": 0.1}
    clean = simulate("halos", 20, size=32, seed=9, **base)
    beamed = simulate("halos", 20, size=32, seed=9, **{**base, "beam_fwhm_arcmin": 3.0})
    noisy = simulate("halos", 20, size=32, seed=9, **{**base, "noise_arcmin": 2.0})
    # The beam blurs (the peak drops) but reflecting edges keep each map's sum.
    assert (beamed["image"].max(("x", "y")) < clean["image"].max(("x", "y"))).all()
    np.testing.assert_allclose(
        beamed["image"].sum(("x", "y")), clean["image"].sum(("x", "y")), rtol=1e-4
    )
    # Noise is drawn last: the difference is the noise, of sd noise_arcmin / pixel_arcmin,
    # whose sample sd over N pixels has relative error 1 / sqrt(2N).
    diff = (noisy["image"] - clean["image"]).values.astype(np.float64)
    expected = 2.0 / noisy.attrs["pixel_arcmin"]
    assert abs(diff.std() / expected - 1.0) < 4.5 / math.sqrt(2 * diff.size)


# --- galaxies --------------------------------------------------------------------------------


def test_galaxy_design_is_a_latin_hypercube():
    num = 50
    ds = simulate("galaxies", num, size=16, seed=10)
    attrs = ds.attrs
    lo_f, hi_f = attrs["flux_range"]
    unit = {
        "flux": np.log10(ds["flux"].values / lo_f) / math.log10(hi_f / lo_f),
        "scale_radius": (ds["scale_radius"].values - attrs["scale_radius_range"][0])
        / np.diff(attrs["scale_radius_range"])[0],
        "g1": (ds["g1"].values - attrs["shear_range"][0]) / np.diff(attrs["shear_range"])[0],
        "g2": (ds["g2"].values - attrs["shear_range"][0]) / np.diff(attrs["shear_range"])[0],
        "psf_fwhm": (ds["psf_fwhm"].values - attrs["psf_fwhm_range"][0])
        / np.diff(attrs["psf_fwhm_range"])[0],
    }
    for name, u in unit.items():
        # Exactly one design point in each of the num equal strata of every coordinate.
        assert sorted(np.floor(u * num).astype(int)) == list(range(num)), name


def test_galaxy_flux_conserved_up_to_what_falls_outside_the_stamp():
    # The fraction of light inside the stamp is estimated independently by shooting photons:
    # radius ~ Gamma(2, r_s) (exponential profile), the reduced-shear matrix
    # [[1 + g1, g2], [g2, 1 - g1]] / sqrt(1 - |g|^2), a Gaussian PSF offset and a uniform pixel
    # offset. Its binomial standard error bounds the Monte Carlo part (4.5 of them); 1e-4 covers
    # GalSim's Fourier-space rendering accuracy (kvalue_accuracy 1e-5).
    num, size, photons = 30, 32, 200_000
    ds = simulate("galaxies", num, size=size, seed=11)
    pixel = ds.attrs["pixel_scale_arcsec"]
    half = 0.5 * size * pixel
    rng = np.random.default_rng(0)
    sums = ds["image"].sum(("x", "y")).values.astype(np.float64) / ds["flux"].values
    outside = []
    for s in range(num):
        rs, g1, g2, fwhm = (ds[k].values[s] for k in ("scale_radius", "g1", "g2", "psf_fwhm"))
        radius = rng.gamma(2.0, rs, photons)
        angle = rng.uniform(0.0, 2.0 * math.pi, photons)
        points = np.stack([radius * np.cos(angle), radius * np.sin(angle)])
        shear = np.array([[1 + g1, g2], [g2, 1 - g1]]) / math.sqrt(1 - g1**2 - g2**2)
        sigma = fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))
        points = shear @ points + rng.normal(0.0, sigma, (2, photons))
        points += rng.uniform(-0.5 * pixel, 0.5 * pixel, (2, photons))
        inside = np.mean(np.all(np.abs(points) < half, axis=0))
        error = math.sqrt(inside * (1 - inside) / photons)
        assert abs(sums[s] - inside) < 4.5 * error + 1e-4, s
        outside.append(1 - inside)
    # The default ranges keep galaxies well inside a 32-pixel stamp.
    assert max(outside) < 0.03
    assert sums.max() <= 1.0 + 1e-4


def test_galaxy_shear_sign_in_second_moments():
    # An intrinsically round profile convolved with a round PSF: the unweighted ellipticity
    # (Qxx - Qyy, 2 Qxy) / (Qxx + Qyy) has the sign of (g1, g2); the stamp and the pixel grid
    # are symmetric under the reflections that flip each sign.
    ds = simulate("galaxies", 80, size=48, seed=12)
    x, y = ds["x"].values[None, None, :], ds["y"].values[None, :, None]
    image = ds["image"].values.astype(np.float64)
    total = image.sum(axis=(1, 2))
    xc = (image * x).sum(axis=(1, 2)) / total
    yc = (image * y).sum(axis=(1, 2)) / total
    dx, dy = x - xc[:, None, None], y - yc[:, None, None]
    qxx = (image * dx**2).sum(axis=(1, 2))
    qyy = (image * dy**2).sum(axis=(1, 2))
    qxy = (image * dx * dy).sum(axis=(1, 2))
    e1, e2 = (qxx - qyy) / (qxx + qyy), 2 * qxy / (qxx + qyy)
    g1, g2 = ds["g1"].values, ds["g2"].values
    big1, big2 = np.abs(g1) > 0.01, np.abs(g2) > 0.01
    assert (np.sign(e1[big1]) == np.sign(g1[big1])).all()
    assert (np.sign(e2[big2]) == np.sign(g2[big2])).all()
    assert stats.pearsonr(e1, g1).statistic > 0.9
    assert stats.pearsonr(e2, g2).statistic > 0.9


def test_galaxy_noise_is_added_with_the_requested_sd():
    clean = simulate("galaxies", 10, size=16, seed=13)
    noisy = simulate("galaxies", 10, size=16, seed=13, noise_sd=5.0)
    diff = (noisy["image"] - clean["image"]).values.astype(np.float64)
    assert abs(diff.std() / 5.0 - 1.0) < 4.5 / math.sqrt(2 * diff.size)
    for name in AUX["galaxies"]:
        np.testing.assert_array_equal(noisy[name].values, clean[name].values)


def test_galaxy_render_is_centred():
    image = galaxies.render([1e4], [0.3], [0.0], [0.0], [0.6], size=32, pixel_scale=0.2)[0]
    np.testing.assert_allclose(image, image[::-1, :], rtol=1e-4, atol=1e-6 * image.max())
    np.testing.assert_allclose(image, image[:, ::-1], rtol=1e-4, atol=1e-6 * image.max())


def test_median_concentration_survives_a_concurrent_cache_creation(monkeypatch):
    # Another process creates colossus' cache directory between colossus' existence check and
    # its makedirs (two simulations started together on a fresh machine): colossus then raises
    # FileExistsError inside its concentration model, which it reports as NaN.
    from colossus.utils import storage

    mass = np.array([1e14, 5e14])
    expected = halos.median_concentration(mass, 0.1)  # the cache directory exists from here on
    exists = storage.os.path.exists
    lied = []

    def racing_exists(path):
        if str(path).rstrip("/").endswith("halo.concentration") and not lied:
            lied.append(path)
            return False
        return exists(path)

    monkeypatch.setattr(storage.os.path, "exists", racing_exists)
    np.testing.assert_array_equal(halos.median_concentration(mass, 0.1), expected)
    assert lied  # the race was played
