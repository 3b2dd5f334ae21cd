"""Tests of residual-tail latents and the Mahalanobis anomaly detector."""

from __future__ import annotations

import json
import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from scipy import stats

from pyro_dlatent.anomaly import (
    AnomalyDetector,
    encode_views,
    fit_anomaly_detector,
    image_views,
    rank_anomalies,
    tail_latents,
)
from pyro_dlatent.plots import anomaly_gallery

ALPHAS = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9)


def _assert_uniform_quantiles(p: np.ndarray, num_reference: int) -> None:
    # For a conformal p-value, P(p <= a) = floor(a (n+1)) / (n+1) exactly (continuous scores).
    # Given the reference set, the fraction of m new p-values below a is Binomial(m, pi)/m with
    # pi ~ Beta(k, n + 1 - k), Var(pi) ~ a(1-a)/n, so sd(fraction) <= sqrt(a(1-a)(1/m + 1/n)).
    # A 4.5 sd band fails with probability < 7e-6 per level, < 5e-5 over the 7 levels.
    m = p.size
    for a in ALPHAS:
        expected = math.floor(a * (num_reference + 1)) / (num_reference + 1)
        sd = math.sqrt(a * (1 - a) * (1 / m + 1 / num_reference))
        assert abs(np.mean(p <= a) - expected) < 4.5 * sd, (a, np.mean(p <= a))


def _student_t(rng: np.random.Generator, n: int, r: int, dof: float = 3.0) -> np.ndarray:
    """Heavy-tailed multivariate t with a non-diagonal scale."""
    scale = np.linalg.cholesky(np.eye(r) + 0.5 * np.ones((r, r)))
    g = rng.standard_normal((n, r)) @ scale.T
    return 2.0 + g / np.sqrt(rng.chisquare(dof, (n, 1)) / dof)


# ---------------------------------------------------------------------------------- tails
@pytest.mark.parametrize(("residual_dim", "quantile"), [(1, 0.9), (4, 0.99), (16, 0.5)])
def test_tail_latents_radii_lie_in_the_chi_square_tail(residual_dim, quantile):
    n = 4000
    z = tail_latents(n, residual_dim, quantile, seed=3).double().numpy()
    assert z.shape == (n, residual_dim)
    radius2 = (z**2).sum(axis=1)
    threshold = stats.chi2.ppf(quantile, df=residual_dim)
    assert radius2.min() >= threshold * (1 - 1e-9)
    # The truncated chi-square CDF maps the radii to U[0, 1): exact one-sample KS test (seeded,
    # so deterministic; the threshold 1e-3 is the false-rejection rate of a correct sampler).
    levels = (stats.chi2.cdf(radius2, df=residual_dim) - quantile) / (1 - quantile)
    assert stats.kstest(levels, "uniform").pvalue > 1e-3


@pytest.mark.parametrize("residual_dim", [2, 5])
def test_tail_latents_directions_are_uniform_and_independent_of_radius(residual_dim):
    n = 20000
    z = tail_latents(n, residual_dim, 0.95, seed=11).double().numpy()
    radius = np.linalg.norm(z, axis=1)
    d = z / radius[:, None]
    r = residual_dim
    # uniform on the sphere: E d = 0 with sd 1/sqrt(r) per coordinate; E d d^T = I / r with
    # Var(d_i^2) = 3 / (r (r + 2)) - 1 / r^2 and Var(d_i d_j) = 1 / (r (r + 2)); 4.5 sd bands.
    assert np.abs(d.mean(axis=0)).max() < 4.5 / math.sqrt(n * r)
    second = d.T @ d / n
    sd_diag = math.sqrt(3 / (r * (r + 2)) - 1 / r**2) / math.sqrt(n)
    sd_off = math.sqrt(1 / (r * (r + 2))) / math.sqrt(n)
    assert np.abs(np.diag(second) - 1 / r).max() < 4.5 * sd_diag
    assert np.abs(second[~np.eye(r, dtype=bool)]).max() < 4.5 * sd_off
    # radius independent of direction: correlation of radius with d_0^2 has sd 1/sqrt(n)
    assert abs(np.corrcoef(radius, d[:, 0] ** 2)[0, 1]) < 4.5 / math.sqrt(n)


def test_tail_latents_seed_dtype_and_validation():
    a = tail_latents(5, 3, 0.9, seed=1)
    assert a.dtype == torch.get_default_dtype()
    assert torch.equal(a, tail_latents(5, 3, 0.9, seed=1))
    assert not torch.equal(a, tail_latents(5, 3, 0.9, seed=2))
    assert tail_latents(5, 3, 0.9, seed=np.random.default_rng(0), dtype=torch.float64).dtype == (
        torch.float64
    )
    with pytest.raises(ValueError, match="quantile"):
        tail_latents(5, 3, 1.0)
    with pytest.raises(ValueError, match="num"):
        tail_latents(0, 3, 0.5)
    with pytest.raises(ValueError, match="residual_dim"):
        tail_latents(5, 0, 0.5)
    with pytest.raises(ValueError, match="seed"):
        tail_latents(5, 3, 0.5, seed=-1)


# ---------------------------------------------------------------------------------- detector
def test_scores_are_mahalanobis_radii_with_exact_in_sample_mean():
    rng = np.random.default_rng(0)
    z = _student_t(rng, 500, 3)
    detector = fit_anomaly_detector(z)
    centered = z - z.mean(axis=0)
    expected = np.einsum("ij,jk,ik->i", centered, np.linalg.inv(np.cov(z, rowvar=False)), centered)
    np.testing.assert_allclose(detector.score(z), expected, rtol=1e-10)
    # with the unbiased covariance, sum_i s_i = trace(S^-1 (n-1) S) = (n-1) r exactly
    assert detector.score(z).mean() == pytest.approx(3 * 499 / 500, rel=1e-10)


def test_scores_are_affine_invariant():
    rng = np.random.default_rng(1)
    z, new = rng.standard_normal((300, 3)), rng.standard_normal((20, 3))
    a, b = np.array([[2.0, 0.3, 0.0], [0.0, 1.0, -0.5], [0.1, 0.0, 0.2]]), np.array([1.0, -3, 5])
    plain = fit_anomaly_detector(z).score(new)
    mapped = fit_anomaly_detector(z @ a.T + b).score(new @ a.T + b)
    np.testing.assert_allclose(mapped, plain, rtol=1e-8)


@pytest.mark.parametrize("family", ["gaussian", "student_t"])
def test_empirical_p_values_are_uniform_on_reference_data(family):
    rng = np.random.default_rng(2)
    r, n_fit, n_cal, m = 4, 2000, 2000, 4000

    def draw(n):
        return rng.standard_normal((n, r)) if family == "gaussian" else _student_t(rng, n, r)

    detector = fit_anomaly_detector(draw(n_fit), calibration_latents=draw(n_cal))
    p = detector.p_value(draw(m))
    assert p.min() >= 1 / (n_cal + 1) and p.max() <= 1
    _assert_uniform_quantiles(p, n_cal)


def test_chi2_p_values_are_uniform_for_gaussian_latents_only():
    rng = np.random.default_rng(4)
    r, n, m = 4, 4000, 4000
    gaussian = fit_anomaly_detector(rng.standard_normal((n, r)), calibration="chi2")
    p = gaussian.p_value(rng.standard_normal((m, r)))
    # Estimating mean and covariance inflates new scores by a factor ~ 1 + (r + 2)/n = 1.0015,
    # which moves P(p <= a) by < 0.01 a; the band is the binomial 4.5 sd plus that bias.
    for a in ALPHAS:
        assert abs(np.mean(p <= a) - a) < 4.5 * math.sqrt(a * (1 - a) / m) + 0.01 * a
    heavy = fit_anomaly_detector(_student_t(rng, n, r), calibration="chi2")
    p_heavy = heavy.p_value(_student_t(rng, m, r))
    # heavy tails: the chi-square p-values flag far more than 1% at the 1% level (about 4.7%
    # over 100 seeds, never below 3.4%); 2% is 6 binomial sd above the nominal 1% (sd 0.0016)
    assert np.mean(p_heavy <= 0.01) > 0.02


def test_in_sample_calibration_is_close_to_uniform():
    # Default calibration on the fitting set: in-sample scores are smaller by O(r/n) (0.3% for
    # r = 4, n = 3000), well inside the 4.5 sd binomial band used above.
    rng = np.random.default_rng(5)
    detector = fit_anomaly_detector(rng.standard_normal((3000, 4)))
    _assert_uniform_quantiles(detector.p_value(rng.standard_normal((3000, 4))), 3000)


def test_detector_state_round_trip_and_validation():
    rng = np.random.default_rng(6)
    detector = fit_anomaly_detector(rng.standard_normal((100, 2)))
    state = json.loads(json.dumps(detector.state_dict()))
    again = AnomalyDetector.from_state_dict(state)
    z = rng.standard_normal((7, 2))
    np.testing.assert_array_equal(again.p_value(z), detector.p_value(z))
    np.testing.assert_array_equal(again.score(z), detector.score(z))
    with pytest.raises(ValueError, match="lacks field"):
        AnomalyDetector.from_state_dict({"mean": [0.0]})
    with pytest.raises(ValueError, match="more reference samples"):
        fit_anomaly_detector(rng.standard_normal((2, 2)))
    with pytest.raises(ValueError, match="positive-definite"):
        fit_anomaly_detector(np.repeat(rng.standard_normal((50, 1)), 2, axis=1))
    with pytest.raises(ValueError, match="calibration"):
        fit_anomaly_detector(rng.standard_normal((50, 2)), calibration="bootstrap")
    with pytest.raises(ValueError, match="2 columns"):
        detector.score(np.zeros((3, 3)))


# ---------------------------------------------------------------------------------- table, gallery
def _planted(rng, n=200, r=3, num_outliers=5):
    z = rng.standard_normal((n, r))
    outliers = rng.choice(n, num_outliers, replace=False)
    z[outliers] *= 6.0
    return z, outliers


def test_rank_anomalies_puts_planted_outliers_first():
    rng = np.random.default_rng(7)
    detector = fit_anomaly_detector(rng.standard_normal((500, 3)))
    z, outliers = _planted(rng)
    flag = np.zeros(len(z), dtype=bool)
    flag[outliers] = True
    table = rank_anomalies(detector, z, extra={"flag": flag})
    assert table.sizes["rank"] == len(z)
    assert np.all(np.diff(table["score"].values) <= 0)
    assert set(table["sample"].values[:5]) == set(outliers)
    assert table["flag"].values[:5].all() and not table["flag"].values[5:].any()
    assert np.all(np.diff(table["p_value"].values) >= 0)
    top = rank_anomalies(detector, z, top=3, sample=[f"s{i}" for i in range(len(z))])
    assert top.sizes["rank"] == 3
    assert str(top["sample"].values[0]).startswith("s")
    with pytest.raises(ValueError, match="top"):
        rank_anomalies(detector, z, top=0)


def test_anomaly_gallery_shows_top_k_with_scores():
    rng = np.random.default_rng(8)
    detector = fit_anomaly_detector(rng.standard_normal((500, 3)))
    z, _ = _planted(rng, n=30)
    images = rng.standard_normal((30, 8, 8))
    table = rank_anomalies(detector, z, extra={"flag": np.arange(30) % 2 == 0})
    fig = anomaly_gallery(images, table, top_k=6, ncols=4, annotate=["flag"])
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 6
    first = shown[0]
    np.testing.assert_array_equal(first.images[0].get_array(), images[table["sample"].values[0]])
    assert f"{float(table['score'].values[0]):.1f}" in first.get_title()
    assert f"flag={table['flag'].values[0]}" in first.get_title()
    plt.close(fig)
    with pytest.raises(ValueError, match="lacks the variable"):
        anomaly_gallery(images, table, annotate=["missing"])
    with pytest.raises(ValueError, match="out of range"):
        anomaly_gallery(images[:2], table, top_k=6)


# ---------------------------------------------------------------------------- conditional scores
def _heteroscedastic(n, rng, inflate=1.0):
    """2-d latents with sd 1 for condition < 0.5 and sd 4 above, times ``inflate``."""
    c = rng.uniform(0.0, 1.0, n)
    sd = np.where(c < 0.5, 1.0, 4.0) * inflate
    return rng.standard_normal((n, 2)) * sd[:, None], c


def test_conditional_detector_scores_each_sample_against_its_own_bin():
    from pyro_dlatent.anomaly import ConditionalAnomalyDetector
    from pyro_dlatent.metrics import auroc

    rng = np.random.default_rng(0)
    z, c = _heteroscedastic(20000, rng)
    detector = fit_anomaly_detector(z, condition=c, num_bins=2)
    assert isinstance(detector, ConditionalAnomalyDetector)
    assert detector.edges == pytest.approx([0.5], abs=0.02)
    null, c_null = _heteroscedastic(4000, rng)
    odd, c_odd = _heteroscedastic(4000, rng, inflate=2.5)
    # in its bin a null score is chi2_2 (mean 2, sd 2) and an anomaly's is 6.25 times one, so
    # AUROC = 6.25 / 7.25 = 0.862; its Monte Carlo sd at 4000 + 4000 is about 0.004
    scores = np.concatenate([detector.score(null, c_null), detector.score(odd, c_odd)])
    flags = np.r_[np.zeros(4000, bool), np.ones(4000, bool)]
    assert auroc(scores, flags) == pytest.approx(6.25 / 7.25, abs=0.02)
    assert detector.score(null, c_null).mean() == pytest.approx(2.0, abs=4 * 2.0 / np.sqrt(4000))
    # the unconditional radius mixes the two scales and ranks far worse
    pooled = fit_anomaly_detector(z)
    plain = np.concatenate([pooled.score(null), pooled.score(odd)])
    assert auroc(plain, flags) < auroc(scores, flags) - 0.05
    # empirical p-values of fresh null data are uniform: P(p <= 0.1) = 0.1 +- 4 sd
    p = detector.p_value(null, c_null)
    assert np.mean(p <= 0.1) == pytest.approx(0.1, abs=4 * np.sqrt(0.09 / 4000))
    again = ConditionalAnomalyDetector.from_state_dict(detector.state_dict())
    assert np.array_equal(again.score(odd, c_odd), detector.score(odd, c_odd))


def test_conditional_ranking_and_bad_arguments():
    rng = np.random.default_rng(1)
    z, c = _heteroscedastic(400, rng)
    detector = fit_anomaly_detector(z, condition=c, num_bins=4)
    table = rank_anomalies(detector, z[:50], condition=c[:50], top=5)
    assert table.sizes["rank"] == 5
    assert np.all(np.diff(table["score"].values) <= 0)
    assert table["score"].values[0] == detector.score(z[:50], c[:50]).max()
    with pytest.raises(ValueError, match="condition"):
        detector.score(z[:5])
    with pytest.raises(ValueError, match="condition"):
        rank_anomalies(detector, z[:5], condition=c[:4])
    with pytest.raises(ValueError, match="num_bins"):
        fit_anomaly_detector(z, condition=c, num_bins=200)
    with pytest.raises(ValueError, match="condition"):
        fit_anomaly_detector(z, condition=c[:10])
    with pytest.raises(ValueError, match="calibration_condition"):
        fit_anomaly_detector(z, condition=c, calibration_latents=z)


# ---------------------------------------------------------------------------------- views
def test_dihedral_views_are_the_eight_symmetries_of_the_square():
    rng = np.random.default_rng(0)
    images = rng.standard_normal((3, 5, 5))
    views = image_views(images)
    assert views.shape == (3, 8, 5, 5)
    np.testing.assert_array_equal(views[:, 0], images)
    # eight distinct images for a generic image ...
    flat = views[0].reshape(8, -1)
    assert len({row.tobytes() for row in flat}) == 8
    # ... and the same set for any orientation of it (a group acting on itself)
    for turned in (np.rot90(images, 1, axes=(1, 2)), images[:, ::-1, :], images.transpose(0, 2, 1)):
        again = image_views(turned)[0].reshape(8, -1)
        assert {row.tobytes() for row in again} == {row.tobytes() for row in flat}
    identity = image_views(images, "identity")
    assert identity.shape == (3, 1, 5, 5)
    np.testing.assert_array_equal(identity[:, 0], images)
    with pytest.raises(ValueError, match="views"):
        image_views(images, "rotations")
    with pytest.raises(ValueError, match="images of shape"):
        image_views(rng.standard_normal((2, 4, 6)))


def test_view_scores_average_the_radii_of_the_pooled_fit():
    rng = np.random.default_rng(1)
    z = _student_t(rng, 400, 3).reshape(100, 4, 3)
    detector = fit_anomaly_detector(z)
    assert detector.num_views == 4
    pooled = fit_anomaly_detector(z.reshape(400, 3))
    np.testing.assert_allclose(detector.mean, pooled.mean, rtol=1e-12)
    np.testing.assert_allclose(detector.covariance, pooled.covariance, rtol=1e-12)
    new = rng.standard_normal((7, 4, 3))
    expected = pooled.score(new.reshape(28, 3)).reshape(7, 4).mean(axis=1)
    np.testing.assert_allclose(detector.score(new), expected, rtol=1e-12)
    table = rank_anomalies(detector, new)
    np.testing.assert_allclose(np.sort(table["score"].values), np.sort(expected), rtol=1e-12)


def test_averaging_noisy_views_ranks_anomalies_better():
    """Each view is the sample's latent plus independent encoder noise (sd 1). Normal latents
    have sd 1, anomalous 1.5 (r = 2): one view ranks them with AUROC 3.25 / 5.25 = 0.619 (the
    ratio of two exponential scales), the noise-free radius with 2.25 / 3.25 = 0.692, and the
    mean over 8 views lies close to the latter. With 4000 + 4000 samples the AUROCs have Monte
    Carlo sd about 0.006, their paired difference less."""
    from pyro_dlatent.metrics import auroc

    rng = np.random.default_rng(2)

    def draw(n, sd):
        u = rng.standard_normal((n, 1, 2)) * sd
        return u + rng.standard_normal((n, 8, 2))

    reference = draw(4000, 1.0)
    null, odd = draw(4000, 1.0), draw(4000, 1.5)
    flags = np.r_[np.zeros(4000, bool), np.ones(4000, bool)]
    single = fit_anomaly_detector(reference[:, 0])
    one = auroc(np.r_[single.score(null[:, 0]), single.score(odd[:, 0])], flags)
    views = fit_anomaly_detector(reference)
    eight = auroc(np.r_[views.score(null), views.score(odd)], flags)
    assert one == pytest.approx(3.25 / 5.25, abs=0.025)
    assert eight > one + 0.03
    assert eight < 2.25 / 3.25 + 0.025
    # the averaged scores are calibrated like single ones: fresh null p-values are uniform
    calibrated = fit_anomaly_detector(reference, calibration_latents=draw(2000, 1.0))
    _assert_uniform_quantiles(calibrated.p_value(null), 2000)


def test_views_must_match_the_detector_and_survive_a_round_trip():
    rng = np.random.default_rng(3)
    z = rng.standard_normal((200, 8, 2))
    detector = fit_anomaly_detector(z)
    with pytest.raises(ValueError, match="8 view"):
        detector.score(z[:, 0])
    with pytest.raises(ValueError, match="8 view"):
        rank_anomalies(detector, z[:5, :3])
    with pytest.raises(ValueError, match="chi2"):
        fit_anomaly_detector(z, calibration="chi2")
    with pytest.raises(ValueError, match="num_views"):
        AnomalyDetector(np.zeros(2), np.eye(2), np.zeros(1), num_views=0)
    again = AnomalyDetector.from_state_dict(json.loads(json.dumps(detector.state_dict())))
    assert again.num_views == 8
    np.testing.assert_array_equal(again.score(z[:9]), detector.score(z[:9]))
    old = {k: v for k, v in fit_anomaly_detector(z[:, 0]).state_dict().items() if k != "num_views"}
    assert AnomalyDetector.from_state_dict(old).num_views == 1
    c = rng.uniform(size=200)
    conditional = fit_anomaly_detector(z, condition=c, num_bins=2)
    assert conditional.num_views == 8
    from pyro_dlatent.anomaly import ConditionalAnomalyDetector

    rebuilt = ConditionalAnomalyDetector.from_state_dict(conditional.state_dict())
    np.testing.assert_array_equal(rebuilt.score(z[:9], c[:9]), conditional.score(z[:9], c[:9]))
    with pytest.raises(ValueError, match="8 view"):
        conditional.score(z[:9, :1], c[:9])


def test_encode_views_makes_the_score_invariant_to_the_orientation_of_the_input():
    from pyro_dlatent.data import simulate
    from pyro_dlatent.models.auxvae import AuxVAE

    data = simulate("halos", 40, size=16, seed=0)
    model = AuxVAE.from_dataset(data, residual_dim=2, seed=0)
    encoded = encode_views(model, data)
    assert encoded.z_rec_loc.shape == (40, 8, 2) and encoded.z_aux_loc.shape == (40, 8, 2)
    plain = model.encode(data)
    torch.testing.assert_close(encoded.z_rec_loc[:, 0], plain.z_rec_loc)
    torch.testing.assert_close(encoded.z_aux_scale[:, 0], plain.z_aux_scale)
    detector = fit_anomaly_detector(encoded.z_rec_loc)
    turned = np.rot90(data["image"].values, 1, axes=(1, 2))
    np.testing.assert_allclose(
        detector.score(encode_views(model, turned).z_rec_loc),
        detector.score(encoded.z_rec_loc),
        rtol=1e-4,
    )
    assert encode_views(model, data, "identity").z_rec_loc.shape == (40, 1, 2)
    # chunks of images give the same encodings as one pass
    chunked = encode_views(model, data, batch_size=7)
    torch.testing.assert_close(chunked.z_rec_loc, encoded.z_rec_loc)
    table = rank_anomalies(detector, encoded.z_rec_loc)
    assert "mean over 8 views" in table["score"].attrs["long_name"]
    with pytest.raises(ValueError, match="views"):
        encode_views(model, data, "rotations")
    with pytest.raises(ValueError, match="batch_size"):
        encode_views(model, data, batch_size=0)


def test_the_gallery_under_its_old_name_warns_and_is_the_figure_function():
    from pyro_dlatent import anomaly, plots

    with pytest.warns(FutureWarning, match="moved to pyro_dlatent.plots"):
        assert anomaly.anomaly_gallery is plots.anomaly_gallery
