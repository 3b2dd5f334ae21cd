"""The deep prior science study: sharding, merging its shards, the known-bump oracle."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pyro_dlatent.data.sources import gaussian_bump, residual_covariance, sample_matern_field
from pyro_dlatent.inverse.exact import known_bump_mean
from pyro_dlatent.inverse.model_error import ModelErrorProblem
from pyro_dlatent.inverse.studies import (
    SIZE,
    coverage_summary,
    merge_results,
    source_problem,
    sources_problems,
)
from tests.conftest import run_script

__all__: list[str] = []


@pytest.fixture(scope="module")
def problem():
    return source_problem()


def test_problems_do_not_depend_on_sharding(problem) -> None:
    truths, u_true, data = sources_problems(problem, 0, 4, test_seed=5)
    tail = sources_problems(problem, 2, 2, test_seed=5)
    np.testing.assert_array_equal(truths[2:].numpy(), tail[0].numpy())
    np.testing.assert_array_equal(u_true[2:], tail[1])
    np.testing.assert_array_equal(data[2:].numpy(), tail[2].numpy())
    assert not np.allclose(truths[0].numpy(), truths[1].numpy())
    assert truths.shape == (4, SIZE, SIZE) and data.shape == (4, 25)


def _coverage_shard(start, hits, rhats=None, settings=None):
    svi = [{"problem": start + k, "hits": h} for k, h in enumerate(hits)]
    out = {
        "experiment": "coverage",
        "settings": settings or {"tau": [0.1, 0.1, 0.2, 0.3]},
        "start": start,
        "svi": {"records": svi, **coverage_summary(svi)},
    }
    if rhats is not None:
        nuts = [
            {"problem": start + k, "hits": hits[k], "max_rhat": r, "divergences": d}
            for k, (r, d) in enumerate(rhats)
        ]
        out["nuts"] = {"records": nuts, **coverage_summary(nuts)}
    return out


def test_merge_pools_coverage_shards_like_one_run(tmp_path) -> None:
    first = _coverage_shard(0, [[1, 1, 0, 1], [1, 0, 1, 1]], rhats=[(1.004, 0), (1.02, 1)])
    second = _coverage_shard(2, [[1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 1, 1]], rhats=[(1.001, 0)])
    paths = []
    for name, shard in (("b.json", second), ("a.json", first)):
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(shard))
    out = tmp_path / "merged.json"
    run_script("studies/deep_prior_science.py", "merge", "--out", str(out), *map(str, paths))
    merged = json.loads(out.read_text())
    svi = merged["svi"]
    assert [r["problem"] for r in svi["records"]] == [0, 1, 2, 3, 4]
    # Hand count over the five problems: x0 4/5, y0 4/5, amplitude 4/5, width 4/5.
    assert svi["coverage"] == pytest.approx({"x0": 0.8, "y0": 0.8, "amplitude": 0.8, "width": 0.8})
    assert svi["binomial_se"] == pytest.approx(math.sqrt(0.09 / 5))
    assert svi["met"] is True
    nuts = merged["nuts"]
    assert nuts["num_problems"] == 3
    assert nuts["max_rhat"] == [1.004, 1.02, 1.001]
    assert nuts["worst_rhat"] == pytest.approx(1.02) and nuts["total_divergences"] == 1
    assert nuts["health_met"] is False and nuts["met"] is False
    assert merged["num_shards"] == 2


def test_merge_rejects_overlapping_or_inconsistent_shards() -> None:
    a = _coverage_shard(0, [[1, 1, 1, 1], [1, 1, 1, 1]])
    with pytest.raises(ValueError, match="more than one shard"):
        merge_results([a, _coverage_shard(1, [[1, 1, 1, 1]])])
    with pytest.raises(ValueError, match="different settings"):
        merge_results([a, _coverage_shard(2, [[1, 1, 1, 1]], settings={"tau": 0.05})])
    misspec = {"experiment": "misspec", "settings": {}, "records": []}
    with pytest.raises(ValueError, match="cannot merge"):
        merge_results([a, misspec])
    with pytest.raises(ValueError, match="at least one"):
        merge_results([])


def test_merge_pools_misspec_shards() -> None:
    records = [
        {"problem": 0, "deep": 0.2, "grf": 0.5, "oracle": 0.1},
        {"problem": 1, "deep": 0.4, "grf": 0.6, "oracle": 0.3},
        {"problem": 2, "deep": 0.1, "grf": 0.3, "oracle": 0.2},
    ]
    shards = [
        {"experiment": "misspec", "settings": {"method": "map"}, "records": records[2:]},
        {"experiment": "misspec", "settings": {"method": "map"}, "records": records[:2]},
    ]
    merged = merge_results(shards)
    ratio = merged["deep_over_grf"]
    # Medians: deep 0.2, grf 0.5 -> 2.5; means: deep 0.7/3, grf 1.4/3 -> 2.0.
    assert ratio["ratio_of_medians"] == pytest.approx(2.5)
    assert ratio["ratio_of_means"] == pytest.approx(2.0)
    assert merged["met"] is True
    oracle = merged["oracle_over_grf"]
    assert oracle["ratio_of_medians"] == pytest.approx(0.5 / 0.2)
    assert oracle["fraction_oracle_better"] == pytest.approx(1.0)


def test_oracle_error_matches_the_gaussian_posterior_variance(problem) -> None:
    """The known-bump oracle's squared error averages the trace of the residual's posterior.

    With ``r ~ N(0, C)`` and ``d = A (b + r) + eps``, ``E ||E[f | d] - f||^2 = tr(C_post)``,
    ``C_post = C - C A^T S^-1 A C``. Over ``n = 200`` exact Matérn draws (the simulator's own
    sampler) the sample mean of the squared errors has relative standard error
    ``sd / (mean sqrt(n))``, estimated from the draws (about 1%); the check allows four of
    them. A wrong covariance moves ``tr(C_post)`` (31.5) by far more: length scale 0.1 gives
    41.9, 0.3 gives 16.6, sd 0.3 gives 43.2. The 25 sensors remove about half the residual's
    prior variance ``tr(C) = 64``.
    """
    rng = np.random.default_rng(0)
    n = 200
    residual = sample_matern_field(n, SIZE, sd=0.25, length_scale=0.15, smoothness=1.0, rng=rng)
    u_true = np.column_stack(
        [
            rng.uniform(0.2, 0.8, n),
            rng.uniform(0.2, 0.8, n),
            rng.uniform(0.0, math.log(10.0), n),
            rng.uniform(0.05, 0.15, n),
        ]
    )
    t = np.linspace(0.0, 1.0, SIZE)
    truths = gaussian_bump(t, t, *u_true.T) + residual
    forward = problem.sensor_operator
    data = truths.reshape(n, -1) @ forward.T + problem.noise_sd * rng.standard_normal((n, 25))
    covariance = residual_covariance(SIZE)
    mean = known_bump_mean(problem, u_true, data, covariance)
    squared = ((mean - truths) ** 2).reshape(n, -1).sum(-1)
    cross = covariance @ forward.T
    gram = forward @ cross + problem.noise_sd**2 * np.eye(25)
    expected = np.trace(covariance) - np.trace(cross @ np.linalg.solve(gram, cross.T))
    se = squared.std() / math.sqrt(n)
    assert abs(squared.mean() - expected) < 4 * se, (squared.mean(), expected, se)
    assert expected < 0.6 * np.trace(covariance)  # the data do inform the residual


def test_model_error_problem_is_the_correlated_gaussian_likelihood(problem) -> None:
    """Whitened data and forward map give ``N(d; A f, sigma^2 I + E)`` up to ``log det L``.

    ``log N(L^-1 d; L^-1 A f, I) = log N(d; A f, L L^T) + log det L``, and the constant does not
    depend on the field, so the posterior is the approximation-error posterior exactly.
    """
    rng = np.random.default_rng(1)
    root = rng.standard_normal((25, 25)) * 1e-3
    error = root @ root.T
    wrapped = ModelErrorProblem(problem, error)
    assert wrapped.noise_sd == 1.0 and wrapped.size == problem.size
    fields = torch.as_tensor(rng.standard_normal((3, SIZE, SIZE)))
    data = torch.as_tensor(rng.standard_normal(25) * 0.01)
    total = problem.noise_sd**2 * np.eye(25) + error
    mvn = torch.distributions.MultivariateNormal(
        problem.forward(fields), covariance_matrix=torch.as_tensor(total)
    )
    white = torch.distributions.Normal(wrapped.forward(fields), 1.0)
    log_white = white.log_prob(wrapped.whiten(data)).sum(-1)
    log_det_root = 0.5 * np.linalg.slogdet(total)[1]
    np.testing.assert_allclose(log_white.numpy(), mvn.log_prob(data).numpy() + log_det_root)
    with pytest.raises(ValueError, match="error_covariance"):
        ModelErrorProblem(problem, np.eye(3))
