"""Known-answer and property tests of pyro_dlatent.metrics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.ndimage import gaussian_filter
from scipy.stats import norm

from pyro_dlatent import metrics
from tests.conftest import assert_close

# 4x4 Hadamard matrix / 2: orthogonal, every latent mixes every factor with weight 1/2.
HADAMARD = np.array([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]) / 2.0
# A centred normal deviate beyond 4.5 standard errors has probability 6.8e-6; with at most a few
# dozen such quantities per test the chance of a spurious failure is below 1e-3 (and the seeds
# are fixed, so each test is deterministic).
Z_TAIL = 4.5


def uniform_factors(n: int, k: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.0, 1.0, size=(n, k))


# --------------------------------------------------------------------------- polynomial_lift
def test_polynomial_lift_layout_and_standardization():
    x = np.random.default_rng(0).normal(size=(500, 3))
    lifted = metrics.polynomial_lift(x, degree=3)
    assert lifted.shape == (500, 9)
    assert_close(lifted.mean(axis=0), np.zeros(9), atol=1e-12)
    assert_close(lifted.std(axis=0), np.ones(9), atol=1e-12)
    # variable-major: column 3 i + p - 1 is the standardized p-th power of standardized column i
    s = (x - x.mean(0)) / x.std(0)
    sq = s[:, 1] ** 2
    assert_close(lifted[:, 3 * 1 + 1], (sq - sq.mean()) / sq.std(), atol=1e-12)
    assert_close(lifted[:, 3 * 2], s[:, 2], atol=1e-12)


def test_polynomial_lift_constant_and_two_valued_columns_are_zero():
    x = np.column_stack([np.full(10, 3.0), np.tile([-2.0, 2.0], 5)])
    lifted = metrics.polynomial_lift(x, degree=2)
    assert np.all(lifted[:, :2] == 0)  # constant column
    assert np.all(lifted[:, 3] == 0)  # (±2)^2 is constant
    assert np.all(np.abs(lifted[:, 2]) == 1)


def test_polynomial_lift_rejects_bad_input():
    with pytest.raises(ValueError, match="degree"):
        metrics.polynomial_lift(np.ones((4, 2)), degree=0)
    with pytest.raises(ValueError, match="finite"):
        metrics.polynomial_lift([1.0, np.nan, 2.0])


# --------------------------------------------------------------------------- alignment
def test_alignment_matches_gaussian_analytic_values():
    n, s = 4000, 0.5
    rng = np.random.default_rng(1)
    aux = rng.normal(size=(n, 2))
    latents = aux + s * rng.normal(size=(n, 2))
    rho = 1.0 / math.sqrt(1.0 + s**2)
    result = metrics.alignment(latents, aux, degree=2)
    # Standard errors (normal theory): Var r ≈ (1 - rho^2)^2 / n and Var r^2 ≈ 4 rho^2 Var r.
    se_r = (1 - rho**2) / math.sqrt(n)
    se_r2 = 2 * rho * se_r
    # r2_poly and poly_corr are maxima over K=2 dimensional families: their in-sample upward bias
    # is O(K / n) on top of the sampling error.
    bias = 2.0 / n
    assert np.all(np.abs(result.pearson_r - rho) <= Z_TAIL * se_r)
    assert_close(result.r2_linear, result.pearson_r**2, atol=1e-12)
    # E[u | z] is linear for jointly Gaussian (z, u): the polynomial fit explains rho^2 too.
    assert np.all(np.abs(result.r2_poly - rho**2) <= Z_TAIL * se_r2 + bias)
    # Hermite polynomials: corr(He_p(z), He_p(u)) = rho^p, so the first canonical correlation
    # is rho.
    assert np.all(np.abs(result.poly_corr - rho) <= Z_TAIL * se_r + bias)
    assert result.max_off_diagonal <= Z_TAIL / math.sqrt(n)


def test_alignment_polynomial_fit_sees_a_nonlinear_code():
    aux = np.random.default_rng(2).normal(size=(2000, 1))
    result = metrics.alignment(np.cbrt(aux), aux, degree=3)
    # aux = z^3 exactly, so a cubic read-out of z explains all of aux; a line does not.
    assert result.r2_poly[0] > 1 - 1e-10
    assert result.poly_corr[0] > 1 - 1e-10
    assert result.r2_linear[0] < 0.9


def test_alignment_cross_correlation_analytic():
    n = 5000
    rng = np.random.default_rng(3)
    aux = rng.normal(size=(n, 2))
    latents = np.column_stack([aux[:, 0] + 0.5 * aux[:, 1], aux[:, 1]])
    result = metrics.alignment(latents, aux)
    expected = 0.5 / math.sqrt(1.25)  # corr(u0 + u1/2, u1)
    se = (1 - expected**2) / math.sqrt(n)
    assert abs(result.cross_correlation[0, 1] - expected) <= Z_TAIL * se
    assert abs(result.max_off_diagonal - expected) <= Z_TAIL * se
    assert abs(result.pearson_r[1] - 1.0) < 1e-12


def test_alignment_to_dict_is_json_with_named_variables():
    rng = np.random.default_rng(4)
    aux = rng.normal(size=(200, 2))
    result = metrics.alignment(aux + 0.1 * rng.normal(size=aux.shape), aux, names=["mass", "c"])
    summary = json.loads(json.dumps(result.to_dict()))
    assert set(summary["variables"]) == {"mass", "c"}
    assert set(summary["variables"]["mass"]) == {"pearson_r", "r2_linear", "r2_poly", "poly_corr"}
    assert summary["variables"]["c"]["pearson_r"] == pytest.approx(result.pearson_r[1])
    assert summary["degree"] == 2
    assert np.asarray(summary["cross_correlation"]).shape == (2, 2)


def test_alignment_constant_latent_scores_zero_without_nan():
    aux = np.random.default_rng(5).normal(size=(100, 2))
    summary = metrics.alignment(np.zeros((100, 2)), aux).to_dict()
    values = [v for entry in summary["variables"].values() for v in entry.values()]
    assert values == [0.0] * 8
    assert summary["max_off_diagonal"] == 0.0


def test_alignment_accepts_torch_tensors():
    rng = np.random.default_rng(6)
    aux = rng.normal(size=(50, 2))
    latents = aux + rng.normal(size=aux.shape)
    from_numpy = metrics.alignment(latents, aux).to_dict()
    from_torch = metrics.alignment(torch.tensor(latents), torch.tensor(aux)).to_dict()
    assert from_numpy == from_torch


def test_alignment_rejects_bad_input():
    aux = np.zeros((10, 2))
    with pytest.raises(ValueError, match="columns"):
        metrics.alignment(np.zeros((10, 3)), aux)
    with pytest.raises(ValueError, match="rows"):
        metrics.alignment(np.zeros((9, 2)), aux)
    with pytest.raises(ValueError, match="names"):
        metrics.alignment(aux, aux, names=["a"])
    with pytest.raises(ValueError, match="degree"):
        metrics.alignment(aux, aux, degree=1.5)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    scale=st.lists(st.floats(1e-3, 1e3), min_size=3, max_size=3),
    shift=st.lists(st.floats(-1e3, 1e3), min_size=3, max_size=3),
)
def test_alignment_is_invariant_to_positive_affine_maps(seed, scale, shift):
    rng = np.random.default_rng(seed)
    aux = rng.normal(size=(100, 3))
    latents = aux + rng.normal(size=(100, 3))
    base = metrics.alignment(latents, aux)
    moved = metrics.alignment(np.asarray(scale) * latents + np.asarray(shift), aux)
    assert_close(moved.to_dict(), base.to_dict(), atol=1e-7, rtol=0)


# --------------------------------------------------------------------------- leakage
def test_leakage_of_independent_noise_is_order_inverse_sqrt_n():
    n = 4000
    rng = np.random.default_rng(7)
    result = metrics.leakage(rng.normal(size=(n, 3)), rng.normal(size=(n, 2)), degree=2)
    assert result.matrix.shape == (6, 4)
    # For independent variables every sample correlation is ≈ N(0, 1/n), whatever the marginals.
    # Upper: a union bound over 24 entries at Z_TAIL. Lower: all 24 |N(0,1)| below 0.5 has
    # probability 0.383^24 ≈ 1e-10.
    assert 0.5 / math.sqrt(n) <= result.max_abs_corr <= Z_TAIL / math.sqrt(n)


def test_leakage_of_a_square_needs_degree_two():
    n = 4000
    rng = np.random.default_rng(8)
    aux = rng.normal(size=(n, 2))
    residual = np.column_stack([rng.normal(size=n), aux[:, 1] ** 2 + 0.1 * rng.normal(size=n)])
    linear = metrics.leakage(residual, aux, degree=1)
    quadratic = metrics.leakage(residual, aux, degree=2, names=["a", "b"])
    # corr(u, u^2) = 0 for symmetric u; its sample s.e. is sqrt(E[u^2 (u^2 - 1)^2] / (2 n))
    # = sqrt(5 / n) for a standard normal (larger than the 1/sqrt(n) of independent pairs).
    assert linear.max_abs_corr <= Z_TAIL * math.sqrt(5 / n)
    # corr(u^2 + 0.1 e, u^2) = 1 / sqrt(1 + 0.01 / Var(u^2)) = 1 / sqrt(1.005)
    assert quadratic.max_abs_corr >= 1 / math.sqrt(1.005) - Z_TAIL * math.sqrt(5 / n)
    pair = np.unravel_index(np.argmax(quadratic.by_pair), quadratic.by_pair.shape)
    assert pair == (1, 1)
    row, col = np.unravel_index(np.argmax(quadratic.matrix), quadratic.matrix.shape)
    assert quadratic.row_labels[row] == "z_rec[1]^1"
    assert quadratic.column_labels[col] == "b^2"
    summary = json.loads(json.dumps(quadratic.to_dict()))
    assert summary["max_abs_corr"] == pytest.approx(quadratic.max_abs_corr)
    assert set(summary["by_pair"]) == {"a", "b"}


finite_matrices = hnp.arrays(
    np.float64,
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=2, max_side=12),
    elements=st.floats(allow_nan=False, allow_infinity=False),
)


@settings(max_examples=60, deadline=None)
@given(latents=finite_matrices, data=st.data())
def test_mcc_and_leakage_lie_in_unit_interval(latents, data):
    n = latents.shape[0]
    factors = data.draw(
        hnp.arrays(
            np.float64,
            (n, data.draw(st.integers(1, 4))),
            elements=st.floats(allow_nan=False, allow_infinity=False),
        )
    )
    for method in ("pearson", "spearman"):
        score = metrics.mcc(latents, factors, method=method)
        assert 0.0 <= score <= 1.0
    leak = metrics.leakage(latents, factors, degree=2)
    assert np.all((leak.matrix >= 0) & (leak.matrix <= 1))
    assert 0.0 <= leak.max_abs_corr <= 1.0


@settings(max_examples=30, deadline=None)
@given(latents=finite_matrices, data=st.data())
def test_mig_sap_dci_are_finite_scores(latents, data):
    n = latents.shape[0]
    factors = data.draw(
        hnp.arrays(np.float64, (n, 2), elements=st.floats(allow_nan=False, allow_infinity=False))
    )
    scores = [metrics.mig(latents, factors, num_bins=5), metrics.sap(latents, factors)]
    if n >= 4:
        scores += list(metrics.dci(latents, factors, seed=0).to_dict().values())[:3]
    for score in scores:
        assert 0.0 <= score <= 1.0


# --------------------------------------------------------------------------- mcc
def test_mcc_known_answers():
    factors = uniform_factors(10000, 4, seed=9)
    assert metrics.mcc(factors, factors) == pytest.approx(1.0, abs=1e-12)
    assert metrics.mcc(np.zeros_like(factors), factors) == 0.0
    # A permutation with sign flips and rescaling does not change the matching score.
    rng = np.random.default_rng(10)
    perm = rng.permutation(4)
    transformed = factors[:, perm] * np.array([-2.0, 1.0, -0.5, 3.0]) + 7.0
    for method in ("pearson", "spearman"):
        assert metrics.mcc(transformed, factors, method=method) == pytest.approx(1.0, abs=1e-12)


def test_mcc_of_a_mixed_representation_is_one_half():
    n = 10000
    factors = uniform_factors(n, 4, seed=11)
    # Every |corr(z_i, v_k)| is 1/2; its s.e. is (1 - 1/4) / sqrt(n). The MCC is a mean of four
    # of these entries, so it lies within Z_TAIL s.e. of 1/2 when all 16 entries do.
    bound = Z_TAIL * 0.75 / math.sqrt(n)
    assert abs(metrics.mcc(factors @ HADAMARD, factors) - 0.5) <= bound


def test_mcc_spearman_sees_monotone_codes_and_counts_missing_factors():
    factors = np.random.default_rng(12).normal(size=(2000, 3))
    code = np.exp(factors)
    assert metrics.mcc(code, factors, method="spearman") == pytest.approx(1.0, abs=1e-12)
    assert metrics.mcc(code, factors, method="pearson") < 0.9
    # Two latents for three factors: the third factor is unmatched and counts 0.
    assert metrics.mcc(factors[:, :2], factors) == pytest.approx(2 / 3, abs=1e-12)
    # A constant factor has nothing to recover and is left out.
    with_constant = np.column_stack([factors, np.ones(2000)])
    assert metrics.mcc(factors, with_constant) == pytest.approx(1.0, abs=1e-12)


def test_mcc_rejects_unknown_method():
    with pytest.raises(ValueError, match="method"):
        metrics.mcc(np.zeros((5, 2)), np.zeros((5, 2)), method="kendall")


# --------------------------------------------------------------------------- mig
def test_mig_of_identity_is_one_minus_discretization_bias():
    n, k, bins = 10000, 5, 20
    factors = uniform_factors(n, k, seed=13)
    score = metrics.mig(factors, factors, num_bins=bins)
    # The matched latent is discretized exactly like its factor: I = H(v) = log(20) for uniform
    # factors with equal-occupancy bins. For an independent latent, 2 n I_plugin ~ chi^2 with
    # (B-1)^2 = 361 degrees of freedom (mean 361, sd 26.9), so the second-best information of
    # k - 1 = 4 independent latents lies in [(361 - 5 sd), (361 + 5 sd)] / (2 n) and
    # MIG = 1 - I_2 / H lies in the corresponding interval.
    dof = (bins - 1) ** 2
    sd = math.sqrt(2 * dof)
    entropy = math.log(bins)
    low = 1 - (dof + 5 * sd) / (2 * n * entropy)
    high = 1 - (dof - 5 * sd) / (2 * n * entropy)
    assert low <= score <= high
    # Equal-width bins over the range make the score invariant to affine maps of the latents.
    assert metrics.mig(-3.0 * factors + 1.0, factors, num_bins=bins) == pytest.approx(score)


def test_mig_zeros_duplicates_and_mixtures_score_low():
    factors = uniform_factors(5000, 4, seed=14)
    assert metrics.mig(np.zeros_like(factors), factors) == 0.0
    # Duplicated coordinates carry the same information: the gap is exactly 0.
    assert metrics.mig(np.hstack([factors, factors]), factors) == pytest.approx(0.0, abs=1e-12)
    # In the Hadamard mixture every latent carries the same information about every factor, so
    # the population gap is 0 and only plug-in noise remains: over 20 seeds at this n the score
    # never exceeded 0.0042 (mean 0.0018); 0.05 is more than ten times that.
    assert metrics.mig(factors @ HADAMARD, factors) <= 0.05


def test_mig_discrete_factors():
    rng = np.random.default_rng(15)
    factors = rng.integers(0, 5, size=(3000, 3)).astype(float)
    score = metrics.mig(factors, factors, num_bins=20)
    # Each discrete factor has 5 equiprobable values: H = log 5; latents occupy 5 bins, so the
    # independent-pair bias is chi^2_16 / (2n) (mean 16, sd 5.7); bound it at 16 + 6 sd.
    assert 1 - (16 + 6 * math.sqrt(32)) / (2 * 3000 * math.log(5)) <= score <= 1.0
    as_continuous = metrics.mig(factors, factors, num_bins=20, discrete_factors=False)
    assert as_continuous == pytest.approx(score)


def test_mig_rejects_bad_input():
    with pytest.raises(ValueError, match="num_bins"):
        metrics.mig(np.zeros((5, 2)), np.zeros((5, 2)), num_bins=1)
    with pytest.raises(ValueError, match="discrete_factors"):
        metrics.mig(np.zeros((5, 2)), np.zeros((5, 2)), discrete_factors=[True])


# --------------------------------------------------------------------------- sap
def test_sap_known_answers():
    n = 5000
    factors = uniform_factors(n, 4, seed=16)
    # Identity: the best R² is 1, the second is corr^2 of independent columns, n corr^2 ~ chi^2_1,
    # below Z_TAIL^2 / n for all 12 pairs.
    assert 1 - Z_TAIL**2 / n <= metrics.sap(factors, factors) <= 1.0
    assert metrics.sap(np.zeros_like(factors), factors) == 0.0
    assert metrics.sap(np.hstack([factors, factors]), factors) == pytest.approx(0.0, abs=1e-12)
    # Hadamard mixture: every R² is 1/4 with s.e. 2 rho (1 - rho^2) / sqrt(n) = 0.75 / sqrt(n);
    # the gap of two such estimates is below 2 Z_TAIL s.e.
    assert metrics.sap(factors @ HADAMARD, factors) <= 2 * Z_TAIL * 0.75 / math.sqrt(n)


# --------------------------------------------------------------------------- dci
def test_dci_of_identity_is_one():
    factors = uniform_factors(4000, 5, seed=17)
    result = metrics.dci(factors, factors, seed=0)
    # The ridge fit of v_k on v is exact up to the penalty: off-diagonal coefficients are
    # O(alpha / sqrt(n)), so all three scores are within 1e-2 of 1.
    assert result.disentanglement >= 0.99
    assert result.completeness >= 0.99
    assert result.informativeness >= 0.99
    assert result.importance.shape == (5, 5)
    assert np.argmax(result.importance, axis=0).tolist() == list(range(5))
    json.dumps(result.to_dict())


def test_dci_zeros_duplicates_and_mixtures():
    n = 4000
    factors = uniform_factors(n, 4, seed=18)
    zeros = metrics.dci(np.zeros_like(factors), factors, seed=0)
    assert (zeros.disentanglement, zeros.completeness, zeros.informativeness) == (0.0, 0.0, 0.0)
    # Duplicated latents: ridge splits each factor's importance equally between the two copies,
    # so each copy still explains one factor (D ≈ 1) but each factor is spread over 2 of the 8
    # latents: C = 1 - log 2 / log 8 = 2/3.
    dup = metrics.dci(np.hstack([factors, factors]), factors, seed=0)
    assert dup.disentanglement >= 0.99
    assert dup.completeness == pytest.approx(2 / 3, abs=0.01)
    # Hadamard mixture: every |coefficient| is 1/2, so both entropies are maximal: D = C = 0,
    # while the code is still fully informative.
    mixed = metrics.dci(factors @ HADAMARD, factors, seed=0)
    assert mixed.disentanglement <= 0.01
    assert mixed.completeness <= 0.01
    assert mixed.informativeness >= 0.99


def test_dci_informativeness_is_held_out_r2():
    n, s = 8000, 1.0
    rng = np.random.default_rng(19)
    factors = rng.normal(size=(n, 2))
    latents = factors + s * rng.normal(size=(n, 2))
    result = metrics.dci(latents, factors, seed=1)
    # Best linear predictor of v from z = v + s e explains 1 / (1 + s^2) of Var v. On a test
    # split of 2000 the R² has s.e. ≈ 2 rho (1 - rho^2) / sqrt(2000) (rho^2 = 1/2).
    rho = math.sqrt(1 / (1 + s**2))
    se = 2 * rho * (1 - rho**2) / math.sqrt(2000)
    assert np.all(np.abs(result.informativeness_per_factor - rho**2) <= Z_TAIL * se)
    # Same seed, same split, same result.
    assert metrics.dci(latents, factors, seed=1).to_dict() == result.to_dict()


def test_dci_polynomial_features_capture_a_cubic_code():
    factors = uniform_factors(3000, 2, seed=20)
    latents = np.cbrt(factors)
    linear = metrics.dci(latents, factors, seed=0)
    cubic = metrics.dci(latents, factors, degree=3, seed=0)
    assert linear.informativeness < 0.95
    assert cubic.informativeness > 0.999
    # ridge shrinkage leaves off-diagonal importances of ~6e-4 here: D ≈ 0.993
    assert cubic.disentanglement > 0.98


def test_dci_rejects_bad_input():
    x = np.zeros((10, 2))
    with pytest.raises(ValueError, match="alpha"):
        metrics.dci(x, x, alpha=0.0)
    with pytest.raises(ValueError, match="test_fraction"):
        metrics.dci(x, x, test_fraction=1.0)


# --------------------------------------------------------------------------- fidelity
def mode_counts(size: int) -> np.ndarray:
    """Number of Fourier modes in each annulus of radial_power_spectrum for a square image."""
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij"))
    return np.bincount(np.rint(k * size).astype(int).ravel())[: size // 2 + 1]


def test_radial_power_spectrum_of_white_noise_is_flat():
    num, size, sigma = 300, 32, 2.0
    images = sigma * np.random.default_rng(21).normal(size=(num, size, size))
    wavenumbers, power = metrics.radial_power_spectrum(images)
    assert wavenumbers[0] == 0.0
    assert wavenumbers[-1] == pytest.approx(0.5, abs=0.01)
    assert np.all(np.diff(wavenumbers) > 0)
    # With P = |FFT|^2 / (h w), white noise has E P = sigma^2 at every mode. Modes k and -k of a
    # real image coincide, so the bin mean over c modes of one image has relative variance 2 / c.
    rel_se = np.sqrt(2 / (num * mode_counts(size)))
    assert np.all(np.abs(power / sigma**2 - 1) <= Z_TAIL * rel_se)
    per_image = metrics.radial_power_spectrum(images, average=False)[1]
    assert per_image.shape == (num, power.size)
    assert_close(per_image.mean(axis=0), power, atol=1e-12)


def test_radial_power_spectrum_of_a_plane_wave_is_one_bin():
    size, cycles = 32, 4
    x = np.arange(size)
    image = np.cos(2 * np.pi * cycles * x / size)[None, :].repeat(size, axis=0)
    _, power = metrics.radial_power_spectrum(image)
    assert np.argmax(power) == cycles
    # Two modes (+-4, 0), each |FFT|^2 / N^2 = (N^2 / 2)^2 / N^2, averaged over the annulus.
    assert power[cycles] == pytest.approx(2 * size**2 / 4 / mode_counts(size)[cycles])
    assert np.all(np.delete(power, cycles) < 1e-20)


def test_power_spectrum_error_known_answers():
    num, size, width = 400, 32, 1.5
    rng = np.random.default_rng(22)
    reference = rng.normal(size=(num, size, size))
    other = rng.normal(size=(num, size, size))
    assert metrics.power_spectrum_error(reference, reference) == 0.0
    # Per-bin ratio of two independent mean spectra: relative s.e. sqrt(2 * 2 / (num * c)).
    rel_se = np.sqrt(4 / (num * mode_counts(size)))
    fresh = metrics.power_spectrum_error(other, reference)
    assert fresh <= Z_TAIL * rel_se.mean()
    # A periodic Gaussian blur multiplies the spectrum by |H(k)|^2, the spectrum of the blurred
    # unit impulse times h w: the expected error is mean_bins |<|H|^2> - 1|.
    impulse = np.zeros((size, size))
    impulse[0, 0] = 1.0
    _, transfer = metrics.radial_power_spectrum(gaussian_filter(impulse, width, mode="wrap"))
    expected = np.mean(np.abs(size * size * transfer - 1))
    blurred = gaussian_filter(other, (0, width, width), mode="wrap")
    error = metrics.power_spectrum_error(blurred, reference)
    assert abs(error - expected) <= Z_TAIL * rel_se.mean()
    assert error > 10 * fresh


def test_pixel_histogram_distance_known_answers():
    images = np.random.default_rng(23).normal(size=(50, 16, 16))
    assert metrics.pixel_histogram_distance(images, images) == 0.0
    assert metrics.pixel_histogram_distance(images + 0.3, images) == pytest.approx(0.3, abs=1e-12)
    # Quantile coupling of x and 1.5 x moves each value by 0.5 |x|.
    expected = 0.5 * np.abs(images).mean()
    assert metrics.pixel_histogram_distance(1.5 * images, images) == pytest.approx(expected)


def test_radial_profile_of_a_radial_function_is_exact():
    size = 33
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    center = (12.0, 17.0)
    radius = np.hypot(yy - center[0], xx - center[1])
    radii, profile = metrics.radial_profile(3.0 * radius - 1.0, center=center, max_radius=10)
    # The profile of a x r + b is a x (mean radius of each annulus) + b, exactly.
    assert_close(profile, 3.0 * radii - 1.0, atol=1e-12)
    assert radii.size == 10
    assert np.all(np.floor(radii) == np.arange(10))
    batch = np.stack([radius, 2 * radius])
    _, per_image = metrics.radial_profile(batch, center=center, average=False)
    assert_close(per_image[1], 2 * per_image[0], atol=1e-12)


def test_radial_profile_error_known_answers():
    size = 32
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    blob = np.exp(-((yy - 15.5) ** 2 + (xx - 15.5) ** 2) / (2 * 4.0**2))
    reference = np.stack([blob, 2 * blob])
    assert metrics.radial_profile_error(reference, reference) == 0.0
    assert metrics.radial_profile_error(1.1 * reference, reference) == pytest.approx(0.1)


def test_fidelity_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="same"):
        metrics.power_spectrum_error(np.ones((2, 8, 8)), np.ones((2, 8, 9)))
    with pytest.raises(ValueError, match="max_radius"):
        metrics.radial_profile(np.ones((8, 8)), max_radius=-1.0)
    with pytest.raises(ValueError, match="shape"):
        metrics.radial_power_spectrum(np.ones(8))


# --------------------------------------------------------------------------- inverse problems
def test_relative_l2_error():
    rng = np.random.default_rng(24)
    truth = rng.normal(size=(5, 3, 4))
    scale = np.array([0.0, 0.1, -0.2, 0.5, 1.0])
    estimate = truth * (1 + scale[:, None, None])
    assert_close(metrics.relative_l2_error(estimate, truth), np.abs(scale), atol=1e-12)
    assert_close(
        metrics.relative_l2_error(torch.tensor(estimate), torch.tensor(truth)),
        np.abs(scale),
        atol=1e-12,
    )
    single = truth[0]
    assert_close(
        metrics.relative_l2_error(single * (1 + scale[:, None, None]), single),
        np.abs(scale),
        atol=1e-12,
    )
    with pytest.raises(ValueError, match="nonzero"):
        metrics.relative_l2_error(estimate, np.zeros_like(truth))
    with pytest.raises(ValueError, match="shape"):
        metrics.relative_l2_error(estimate, truth[:, :2])


def test_interval_coverage_of_calibrated_and_overconfident_posteriors():
    cases, draws, level = 2000, 1000, 0.9
    rng = np.random.default_rng(25)
    truth = rng.normal(size=(cases, 2))
    # Parameter 0: calibrated posterior N(0, 1); parameter 1: overconfident N(0, 0.5^2).
    samples = rng.normal(size=(draws, cases, 2)) * np.array([1.0, 0.5])
    coverage = metrics.interval_coverage(samples, truth, level=level)
    assert coverage.shape == (2,)
    # Binomial s.e. sqrt(p (1 - p) / cases); the empirical quantiles of 1000 draws shift the
    # expected coverage by O(1 / draws), added to the tolerance.
    se = math.sqrt(level * (1 - level) / cases)
    assert abs(coverage[0] - level) <= Z_TAIL * se + 2 / draws
    narrow = 2 * norm.cdf(0.5 * norm.ppf(0.95)) - 1  # P(|Z| < 0.5 z_0.95) = 0.589
    se_narrow = math.sqrt(narrow * (1 - narrow) / cases)
    assert abs(coverage[1] - narrow) <= Z_TAIL * se_narrow + 2 / draws


def test_interval_coverage_rejects_bad_input():
    with pytest.raises(ValueError, match="level"):
        metrics.interval_coverage(np.zeros((10, 3)), np.zeros(3), level=1.0)
    with pytest.raises(ValueError, match="shape"):
        metrics.interval_coverage(np.zeros((10, 3)), np.zeros(4))


def test_auroc_known_answers():
    from pyro_dlatent.metrics import auroc

    labels = np.array([0, 0, 1, 1], dtype=bool)
    assert auroc([0.1, 0.2, 0.8, 0.9], labels) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], labels) == 0.0
    assert auroc([0.5, 0.5, 0.5, 0.5], labels) == 0.5
    # independent scores: AUROC ~ 0.5 with sd sqrt((n+ + n- + 1) / (12 n+ n-))
    rng = np.random.default_rng(0)
    flags = rng.random(4000) < 0.1
    sd = np.sqrt((flags.sum() + (~flags).sum() + 1) / (12 * flags.sum() * (~flags).sum()))
    assert abs(auroc(rng.normal(size=4000), flags) - 0.5) < 4 * sd
    with pytest.raises(ValueError, match="labels"):
        auroc([0.1, 0.2], [True, True])
