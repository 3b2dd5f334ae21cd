"""The exact posterior of the sources problem: marginal likelihood, a 1-d slice, SBC, the fields."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from pyro_dlatent import data
from pyro_dlatent.calibration import rank_uniformity_pvalue, sbc_ranks
from pyro_dlatent.data.sources import gaussian_bump, grid
from pyro_dlatent.inverse import SourceProblem, default_sensors, simulate_observations
from pyro_dlatent.inverse.exact import NAMES, BumpPrior, ExactBumpPosterior, bump_field

SIZE = 16


def problem_and_data(u, *, prior=BumpPrior(), noise_sd=0.01, seed=0, size=SIZE):
    """A sources field with parameters ``u`` observed by 25 sensors."""
    rng = np.random.default_rng(seed)
    field = bump_field(u, size, rng, prior)
    problem = SourceProblem(size, default_sensors(5), noise_sd)
    values = simulate_observations(problem, torch.as_tensor(field), seed=rng).numpy()
    return problem, values, field


def test_marginal_likelihood_is_the_gaussian_of_the_data_through_the_fem_solver():
    u = np.array([0.4, 0.6, 1.2, 0.09])
    problem, values, _ = problem_and_data(u)
    post = ExactBumpPosterior(problem, values, points=8, amplitudes=8)
    prior = BumpPrior()
    t = grid(SIZE)
    covariance = prior.covariance(SIZE)
    sensors = problem.forward(torch.eye(SIZE * SIZE, dtype=torch.float64).reshape(-1, SIZE, SIZE))
    operator = sensors.numpy().T  # the solver's own data map, column by column
    others = np.array([[0.45, 0.55, 1.0, 0.12], [0.3, 0.7, 2.0, 0.06], u])
    for row in others:
        bump = gaussian_bump(t, t, *([v] for v in row))[0].ravel()
        expected = scipy.stats.multivariate_normal.logpdf(
            values,
            operator @ bump,
            operator @ covariance @ operator.T + problem.noise_sd**2 * np.eye(25),
        )
        assert post.log_likelihood(row)[0] == pytest.approx(expected, rel=1e-8)


def test_a_one_dimensional_slice_agrees_with_brute_force_quadrature():
    # A prior box that pins x0, y0 and the width to +-1e-4 leaves the log amplitude's posterior,
    # which brute-force quadrature computes from the marginal likelihood on 4,001 points.
    # (x0 and y0 share the pinned centre 0.45; the field's own y0 is 0.5), and a faint bump.
    u = np.array([0.45, 0.5, 0.3, 0.08])
    pinned = BumpPrior(
        center_range=(0.45 - 1e-4, 0.45 + 1e-4), width_range=(0.08 - 1e-4, 0.08 + 1e-4)
    )
    problem, values, _ = problem_and_data(u, noise_sd=0.02, seed=3)
    post = ExactBumpPosterior(problem, values, prior=pinned, points=8, amplitudes=96)
    lo, hi = pinned.bounds[2]
    axis = np.linspace(lo, hi, 4001)
    rows = np.column_stack(
        [np.full_like(axis, 0.45), np.full_like(axis, 0.45), axis, 0.08 + 0 * axis]
    )
    log_density = post.log_likelihood(rows)
    weights = np.exp(log_density - log_density.max())
    weights /= np.trapezoid(weights, axis)
    mean = np.trapezoid(weights * axis, axis)
    sd = np.sqrt(np.trapezoid(weights * (axis - mean) ** 2, axis))
    cdf = np.concatenate([[0.0], np.cumsum((weights[1:] + weights[:-1]) / 2 * np.diff(axis))])
    interval = np.interp([0.05, 0.95], cdf, axis)
    assert post.mean()[2] == pytest.approx(mean, abs=0.01 * sd)
    assert post.sd()[2] == pytest.approx(sd, rel=0.01)
    np.testing.assert_allclose(post.interval(0.9)[2], interval, atol=0.02 * sd)


@pytest.fixture(scope="module")
def demo_posterior():
    from pyro_dlatent.inverse.run import synthetic_observations

    obs = synthetic_observations(size=32, seed=12345)
    problem = SourceProblem(32, obs.sensors, obs.noise_sd)
    return obs, ExactBumpPosterior(problem, obs.values)


def test_the_demo_problem_has_the_truth_inside_its_exact_intervals(demo_posterior):
    obs, post = demo_posterior
    interval = post.interval(0.9)
    for j, name in enumerate(NAMES):
        assert interval[j, 0] < obs.truth_aux[name] < interval[j, 1], name
    # a sharp posterior: 90% intervals a small part of the prior box (width 0.26 of it)
    assert np.all(interval[:, 1] - interval[:, 0] < 0.3 * np.ptp(BumpPrior().bounds, axis=1))


def test_field_moments_mix_the_conditional_gaussians(demo_posterior):
    obs, post = demo_posterior
    mean, sd = post.field_moments(1000, rng=0)
    truth = obs.truth_field
    error = np.linalg.norm(mean - truth) / np.linalg.norm(truth)
    assert error < 0.2  # the exact posterior mean of this field (0.137 at 2,000 draws)
    z = (truth - mean) / sd
    assert np.all(sd > 0)
    # on one field pixels are correlated, so only a loose check that the sd is of the error's size
    assert 0.5 < np.sqrt(np.mean(z**2)) < 2.0
    again, _ = post.field_moments(1000, rng=0)
    np.testing.assert_array_equal(again, mean)


def test_bump_prior_checks_its_arguments_and_reads_a_dataset():
    with pytest.raises(ValueError, match="width_range"):
        BumpPrior(width_range=(0.2, 0.1))
    with pytest.raises(ValueError, match="residual_sd"):
        BumpPrior(residual_sd=0.0)
    ds = data.simulate("sources", 4, size=SIZE, seed=0, width_range=(0.06, 0.12))
    assert BumpPrior.from_dataset(ds).width_range == (0.06, 0.12)
    with pytest.raises(ValueError, match="not 'sources'"):
        BumpPrior.from_dataset(data.simulate("halos", 4, size=SIZE, seed=0))


@pytest.mark.slow
def test_simulation_based_calibration_over_200_problems():
    # Ranks of the true u among 99 exact posterior draws, 200 problems from the simulator's prior:
    # uniform at the 1% level (Bonferroni over the four parameters); draws pulled halfway to the
    # posterior mean (a posterior half as wide) fail the same test.
    prior = BumpPrior()
    rng = np.random.default_rng(7)
    truths = prior.sample(200, rng)
    draws, shrunk = [], []
    covariance = prior.covariance(SIZE)
    for i, u in enumerate(truths):
        problem, values, _ = problem_and_data(u, seed=1000 + i)
        post = ExactBumpPosterior(problem, values, points=32, amplitudes=48, covariance=covariance)
        sample = post.sample(99, rng)
        draws.append(sample)
        shrunk.append(post.mean() + 0.5 * (sample - post.mean()))
    p_exact = rank_uniformity_pvalue(sbc_ranks(truths, np.stack(draws)), 99)
    p_shrunk = rank_uniformity_pvalue(sbc_ranks(truths, np.stack(shrunk)), 99)
    assert np.all(p_exact > 0.01 / 4), p_exact
    assert np.all(p_shrunk < 0.01 / 4), p_shrunk
