"""Calibrated uncertainty: the predictive law on known heteroscedastic data, and the checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from pyro_dlatent.calibration import (
    AuxCalibration,
    binomial_band,
    calibration_summary,
    coverage,
    encoding_features,
)

LEVELS = (0.5, 0.9)


def heteroscedastic(n: int, seed: int):
    """An 'encoder' whose mean m is biased (0.8 u + 0.1) and whose error sd is exp(0.5 m) / 4.

    Truth ``u = (m - 0.1) / 0.8 + exp(0.5 m) / 4 * eps``: the exact predictive law of ``u`` is
    ``N((m - 0.1) / 0.8, exp(m) / 16)``; the guide sd ``s`` is what the encoder says, here
    ``0.05 exp(0.5 m)`` (right shape, 5x too narrow, like a tether of tau = 0.05).
    """
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(n, 1))
    scale = np.exp(0.5 * m) / 4
    truth = (m - 0.1) / 0.8 + scale * rng.normal(size=(n, 1))
    s = 0.05 * np.exp(0.5 * m)
    features = encoding_features(
        torch.as_tensor(m), torch.as_tensor(s), torch.zeros(n, 0, dtype=torch.float64)
    )
    return features, torch.as_tensor(truth), (m - 0.1) / 0.8, scale


@pytest.fixture(scope="module")
def fitted():
    calibration = AuxCalibration(1, 0)
    train, train_u, *_ = heteroscedastic(4000, 0)
    held, held_u, *_ = heteroscedastic(1000, 1)
    assert calibration.fit(train, train_u, held, held_u) == []
    return calibration


def _intervals(calibration, features):
    probabilities = [0.25, 0.75, 0.05, 0.95]
    mu, q = calibration.predict(features, probabilities)
    return mu[:, 0].numpy(), {
        0.5: (q[:, 0, 0].numpy(), q[:, 0, 1].numpy()),
        0.9: (q[:, 0, 2].numpy(), q[:, 0, 3].numpy()),
    }


def test_intervals_cover_fresh_truths_at_their_level(fitted):
    features, truth, *_ = heteroscedastic(4000, 2)
    _, intervals = _intervals(fitted, features)
    for level in LEVELS:
        lo, hi = binomial_band(4000, level, calibration_rows=1000)
        assert lo <= coverage(truth[:, 0], *intervals[level]) <= hi


def test_intervals_match_the_exact_predictive_law(fitted):
    # Sharp as well as calibrated: the width follows the true sd image by image.
    features, _, exact_mean, exact_sd = heteroscedastic(2000, 3)
    mu, intervals = _intervals(fitted, features)
    lower, upper = intervals[0.9]
    exact_width = 2 * scipy.stats.norm.ppf(0.95) * exact_sd[:, 0]
    ratio = (upper - lower) / exact_width
    # Scale fitted on 1,000 residuals (3 coefficients): a few % error; quantiles of 1,000 draws
    # at 5%/95% have relative sd about 4%.
    assert np.median(ratio) == pytest.approx(1.0, abs=0.08)
    assert np.quantile(ratio, 0.9) / np.quantile(ratio, 0.1) < 1.15
    np.testing.assert_allclose(mu, exact_mean[:, 0], atol=0.02 + 0.05 * exact_sd[:, 0].max())


def test_a_mis_scaled_sd_is_caught(fitted):
    features, truth, *_ = heteroscedastic(4000, 4)
    mu, intervals = _intervals(fitted, features)
    for factor in (0.7, 1.4):
        lower, upper = intervals[0.9]
        scaled = (mu + factor * (lower - mu), mu + factor * (upper - mu))
        lo, hi = binomial_band(4000, 0.9, calibration_rows=1000)
        assert not lo <= coverage(truth[:, 0], *scaled) <= hi


def test_the_guide_sd_alone_is_not_calibrated():
    # The encoder's own sd (5x too narrow) fails the check: what predict_aux used to report.
    _, truth, exact_mean, _ = heteroscedastic(4000, 5)
    sd = 0.05 * np.exp(0.5 * (0.8 * exact_mean[:, 0] + 0.1))
    z = scipy.stats.norm.ppf(0.95)
    lower, upper = exact_mean[:, 0] - z * sd, exact_mean[:, 0] + z * sd
    lo, _ = binomial_band(4000, 0.9)
    assert coverage(truth[:, 0], lower, upper) < lo


def test_missing_values_are_left_out_and_too_few_leave_an_auxiliary_uncalibrated():
    calibration = AuxCalibration(2, 0)
    rng = np.random.default_rng(0)
    m = torch.as_tensor(rng.normal(size=(600, 2)))
    s = torch.full((600, 2), 0.1, dtype=torch.float64)
    features = encoding_features(m, s, torch.zeros(600, 0, dtype=torch.float64))
    truth = m + 0.3 * torch.as_tensor(rng.normal(size=(600, 2)))
    held = truth[400:].clone()
    held[:190, 0] = math.nan  # 10 observed values left for the first auxiliary
    held[:100, 1] = math.nan
    assert calibration.fit(features[:400], truth[:400], features[400:], held) == [0]
    assert calibration.fitted.tolist() == [False, True]
    assert int(calibration.num_calibration[1]) == 100
    mu, q = calibration.predict(features[:5], [0.5])
    assert torch.isnan(mu[:, 0]).all() and torch.isnan(q[:, 0]).all()
    assert torch.isfinite(q[:, 1]).all()


def test_calibration_summary_reports_coverage_and_sharpness():
    rng = np.random.default_rng(0)
    sd = rng.uniform(0.5, 2.0, 20_000)
    truth = sd * rng.normal(size=sd.size)
    z90 = scipy.stats.norm.ppf(0.95)
    summary = calibration_summary(truth, np.zeros_like(sd), sd, {0.9: (-z90 * sd, z90 * sd)})
    lo, hi = binomial_band(20_000, 0.9)
    assert lo <= summary["coverage"][0.9] <= hi
    assert summary["gaussian_coverage"][0.9] == summary["coverage"][0.9]
    assert summary["rms_z_score"] == pytest.approx(1.0, abs=0.02)
    # E|sd eps| = 0.80 sd: a rank correlation of about 0.3 for this spread of sds
    assert summary["spearman_sd_error"] > 0.2
    constant = calibration_summary(truth, np.zeros_like(sd), np.ones_like(sd), {})
    assert constant["spearman_sd_error"] == 0.0
    assert constant["sd_over_rmse"] == pytest.approx(1.0 / np.sqrt(np.mean(truth**2)))


def test_binomial_band_widens_with_a_small_calibration_set():
    plain = binomial_band(1000, 0.9)
    assert plain[0] < 0.9 < plain[1]
    wide = binomial_band(1000, 0.9, calibration_rows=100)
    assert wide[1] - wide[0] > plain[1] - plain[0]
    with pytest.raises(ValueError, match="level"):
        binomial_band(10, 1.5)
