"""Tests of the bi-Laplacian Gaussian-random-field prior and its closed-form source posterior."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from pyro_dlatent.inverse.fem import (
    ConductivityProblem,
    SourceProblem,
    default_sensors,
    simulate_observations,
)
from pyro_dlatent.inverse.grf import GRFPrior
from tests.conftest import assert_close


def _small_prior() -> GRFPrior:
    mean = np.linspace(-0.5, 0.5, 25).reshape(5, 5)
    return GRFPrior(5, gamma=0.3, delta=2.0, mean=mean)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="gamma"):
        GRFPrior(5, gamma=0.0, delta=1.0)
    with pytest.raises(ValueError, match="delta"):
        GRFPrior(5, gamma=1.0, delta=-1.0)
    with pytest.raises(ValueError, match="mean"):
        GRFPrior(5, gamma=1.0, delta=1.0, mean=np.zeros((4, 4)))
    with pytest.raises(ValueError, match="correlation_length"):
        GRFPrior.from_matern(5, correlation_length=0.0, variance=1.0)
    prior = _small_prior()
    with pytest.raises(TypeError, match="SourceProblem"):
        prior.posterior(ConductivityProblem(5, default_sensors(2), 0.1), np.zeros(4))
    with pytest.raises(ValueError, match=r"problem\.size"):
        prior.posterior(SourceProblem(6, default_sensors(2), 0.1), np.zeros(4))
    with pytest.raises(ValueError, match="data"):
        prior.posterior(SourceProblem(5, default_sensors(2), 0.1), np.zeros(3))


def test_matern_parameterization_round_trip():
    prior = GRFPrior.from_matern(9, correlation_length=0.3, variance=2.5)
    assert prior.correlation_length == pytest.approx(0.3)
    assert prior.marginal_variance == pytest.approx(2.5)


def test_log_prob_matches_dense_gaussian():
    prior = _small_prior()
    covariance = prior.covariance().numpy()
    fields = prior.sample(3, seed=1)
    reference = scipy.stats.multivariate_normal(prior.mean.ravel(), covariance)
    expected = reference.logpdf(fields.reshape(3, -1).numpy())
    assert_close(prior.log_prob(fields), expected, atol=1e-9, rtol=1e-9)
    distribution = prior.to_distribution()
    assert distribution.event_shape == (25,)
    assert_close(distribution.log_prob(fields.reshape(3, -1)), expected, atol=1e-9, rtol=1e-9)
    field = fields[0].clone().requires_grad_()
    prior.log_prob(field).backward()
    score = -np.linalg.solve(covariance, field.detach().numpy().ravel() - prior.mean.ravel())
    assert_close(field.grad.reshape(-1), score, atol=1e-8, rtol=1e-8)


def test_posterior_matches_brute_force_bayesian_update():
    prior = _small_prior()
    problem = SourceProblem(5, default_sensors(2), noise_sd=0.05)
    data = simulate_observations(problem, prior.sample(3, seed=2), seed=3).numpy()
    mean, covariance = prior.posterior(problem, data)
    # Dense conditioning in precision form:
    # Q = C^-1 + A^T A / s^2, mu = Q^-1 (C^-1 m + A^T d / s^2).
    prior_covariance = prior.covariance().numpy()
    forward = problem.sensor_operator
    noise = problem.noise_sd**2
    precision = np.linalg.inv(prior_covariance) + forward.T @ forward / noise
    expected_covariance = np.linalg.inv(precision)
    prior_term = np.linalg.solve(prior_covariance, prior.mean.ravel())[:, None]
    expected_mean = expected_covariance @ (prior_term + forward.T @ data.T / noise)
    assert mean.shape == (3, 5, 5) and covariance.shape == (25, 25)
    assert_close(covariance, expected_covariance, atol=1e-10, rtol=1e-8)
    assert_close(mean.reshape(3, -1), expected_mean.T, atol=1e-10, rtol=1e-8)
    single_mean, _ = prior.posterior(problem, torch.as_tensor(data[1]))
    assert_close(single_mean, mean[1], atol=1e-12)


def test_log_marginal_likelihood_matches_dense_gaussian():
    prior = _small_prior()
    problem = SourceProblem(5, default_sensors(2), noise_sd=0.05)
    data = simulate_observations(problem, prior.sample(4, seed=4), seed=5).numpy()
    forward = problem.sensor_operator
    evidence = scipy.stats.multivariate_normal(
        forward @ prior.mean.ravel(),
        forward @ prior.covariance().numpy() @ forward.T + problem.noise_sd**2 * np.eye(4),
    )
    actual = prior.log_marginal_likelihood(problem, data)
    assert actual.shape == (4,)
    assert_close(actual, evidence.logpdf(data), atol=1e-9, rtol=1e-9)
    rows = [torch.as_tensor(row).requires_grad_() for row in data]
    listed = prior.log_marginal_likelihood(problem, rows)
    assert_close(listed, actual, atol=1e-12)


def test_sample_moments_match_covariance():
    prior = _small_prior()
    num = 20_000
    samples = prior.sample(num, seed=7).reshape(num, -1).numpy()
    covariance = prior.covariance().numpy()
    variance = np.diag(covariance)
    # Gaussian sample moments: Var(mean_i) = C_ii / n, Var(S_ij) ~= (C_ij^2 + C_ii C_jj) / n.
    # 5 standard errors over the 25 means and 325 distinct covariances: a false alarm has
    # probability below 350 * 6e-7 ~ 2e-4.
    mean_error = (samples.mean(0) - prior.mean.ravel()) / np.sqrt(variance / num)
    assert np.max(np.abs(mean_error)) < 5.0
    sample_covariance = np.cov(samples, rowvar=False)
    standard_error = np.sqrt((covariance**2 + np.outer(variance, variance)) / num)
    assert np.max(np.abs(sample_covariance - covariance) / standard_error) < 5.0
    assert_close(prior.sample(2, seed=8), prior.sample(2, seed=8))


def test_pointwise_variance_converges_to_matern_formula():
    variance = 2.0
    errors = []
    for size in (9, 17, 33):
        prior = GRFPrior.from_matern(size, correlation_length=0.2, variance=variance)
        centre = (size // 2) * size + size // 2
        errors.append(abs(prior.covariance()[centre, centre].item() - variance) / variance)
    # The discretization error of the SPDE variance shrinks under refinement (about 3x per
    # halving here) and is 11% at 33 nodes per axis.
    assert errors[1] < errors[0] / 2 and errors[2] < errors[1] / 2 and errors[2] < 0.15


def test_robin_boundary_limits_variance_inflation():
    size = 17
    corner, centre = 0, (size // 2) * size + size // 2
    ratios = {}
    for robin in (True, False):
        prior = GRFPrior.from_matern(size, correlation_length=0.2, variance=1.0, robin=robin)
        variance = torch.diagonal(prior.covariance())
        ratios[robin] = (variance[corner] / variance[centre]).item()
    assert ratios[True] < 1.5 < 3.0 < ratios[False]


def test_marginal_likelihood_recovers_true_hyperparameters():
    size = 17
    truth = GRFPrior.from_matern(size, correlation_length=0.3, variance=1.0)
    problem = SourceProblem(size, default_sensors(5), noise_sd=0.005)
    data = simulate_observations(problem, truth.sample(100, seed=9), seed=10)
    start = GRFPrior(size, gamma=3.0 * truth.gamma, delta=truth.delta / 3.0)
    fitted = start.fit_hyperparameters(problem, data)

    def negative_log_evidence(log_params: np.ndarray) -> float:
        gamma, delta = np.exp(log_params)
        return -GRFPrior(size, gamma, delta).log_marginal_likelihood(problem, data).sum().item()

    estimate = np.log([fitted.gamma, fitted.delta])
    assert negative_log_evidence(estimate) <= negative_log_evidence(
        np.log([truth.gamma, truth.delta])
    )
    # Asymptotic sampling covariance of the MLE: the inverse observed information (Hessian of
    # the negative log evidence in log parameters, central differences). The Wald statistic is
    # then chi-square with 2 degrees of freedom; 18.4 is its 1 - 1e-4 quantile.
    step = 1e-3
    hessian = np.empty((2, 2))
    for i in range(2):
        for j in range(2):
            di, dj = step * np.eye(2)[i], step * np.eye(2)[j]
            hessian[i, j] = (
                negative_log_evidence(estimate + di + dj)
                - negative_log_evidence(estimate + di - dj)
                - negative_log_evidence(estimate - di + dj)
                + negative_log_evidence(estimate - di - dj)
            ) / (4 * step**2)
    offset = estimate - np.log([truth.gamma, truth.delta])
    assert offset @ hessian @ offset < scipy.stats.chi2.ppf(1 - 1e-4, df=2)


def test_a_pickled_grf_prior_gives_the_same_posterior():
    # studies send the fitted GRF to their worker processes; SuperLU factors do not pickle
    import pickle

    from pyro_dlatent.inverse.fem import SourceProblem, default_sensors

    prior = GRFPrior.from_matern(16, 0.2, 1.0, mean=0.3)
    copy = pickle.loads(pickle.dumps(prior))
    problem = SourceProblem(16, default_sensors(5), 0.01)
    data = torch.linspace(-1.0, 1.0, problem.num_sensors, dtype=torch.float64)
    for ours, theirs in zip(
        prior.posterior(problem, data), copy.posterior(problem, data), strict=True
    ):
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))
