"""The inverse-problem studies' problems, per-problem records and summaries.

Two studies of ``benchmarks/studies`` score the deep prior over many ``sources`` inverse
problems, and share what is here so that their shards, their tests and the timing benchmarks
compute the same thing:

- the **calibration study** (``deep_prior_calibration.py``): problem ``i`` is
  :func:`~pyro_dlatent.inverse.exact.sample_problem` ``(i)``; :func:`problem_record` scores the
  collapsed deep prior of a saved Aux-VAE against the exact posterior and a fitted GRF on it (a
  task for :func:`pyro_dlatent.studies.run_study`), :func:`draw_record` keeps any method's draws
  beside the exact posterior's, and :func:`parameter_table` / :func:`summarize_records` pool
  the records into coverage, SBC, width and RMSE per named parameter;
- the **science study** (``deep_prior_science.py``): the source problem with fixed sensor noise
  :data:`NOISE_SD` (:func:`source_problem`), held-out ``sources`` problems independent of
  sharding (:func:`sources_problems`), and the summaries of its coverage and misspecification
  experiments, with :func:`merge_results` pooling shards into what an unsharded run gives.

Every problem is a function of its index and the study's seed alone, so a shard, a dask worker
and a serial run compute the same record for it.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any, NamedTuple

import numpy as np
import torch

from pyro_dlatent.calibration import binomial_band, rank_uniformity_pvalue, sbc_ranks
from pyro_dlatent.inverse.exact import NAMES, BumpPrior, ExactBumpPosterior, sample_problem
from pyro_dlatent.inverse.fem import SourceProblem, default_sensors, simulate_observations
from pyro_dlatent.inverse.grf import GRFPrior

__all__ = [
    "COVERAGE_NAMES",
    "NOISE_SD",
    "NUM_RANK_DRAWS",
    "SIZE",
    "StudyContext",
    "coverage_summary",
    "draw_record",
    "merge_results",
    "misspec_summary",
    "named_draws",
    "parameter_table",
    "problem_record",
    "ratio_summary",
    "source_problem",
    "sources_problems",
    "study_context",
    "summarize_records",
]

SIZE = 32
"""Nodes per axis of every study problem (the ``sources`` image grid)."""
NUM_RANK_DRAWS = 99
"""Posterior draws kept per problem for the SBC ranks (``99 + 1`` is a multiple of 10 bins)."""
NOISE_SD = 1e-3
"""Sensor noise sd of the science study, about 1% of the clean data's 1-99% range."""
COVERAGE_NAMES = ("x0", "y0", "amplitude", "width")
"""The named parameters of the coverage experiment (``amplitude = exp(log_amplitude)``)."""


# --------------------------------------------------------------------------- calibration study
def _grf(train: Any, noise_sd: float) -> GRFPrior:
    """The GRF of maximum marginal likelihood on the first 2,048 training fields' data."""
    fields = torch.as_tensor(train["image"].values[:2048], dtype=torch.float64)
    problem = SourceProblem(SIZE, default_sensors(5), noise_sd)
    observed = simulate_observations(problem, fields, seed=0)
    initial = GRFPrior.from_matern(SIZE, 0.2, 1.0, mean=float(fields.mean()))
    return initial.fit_hyperparameters(problem, observed)


def _relative(estimate: np.ndarray, truth: np.ndarray) -> float:
    return float(np.linalg.norm(estimate - truth) / np.linalg.norm(truth))


class StudyContext(NamedTuple):
    """What every problem of a calibration study shares (:func:`study_context`)."""

    generator: Any
    """The saved Aux-VAE's generator: the deep prior."""
    residual: Any
    """Its residual field."""
    bounds: Any
    """The collapsed prior's box (``None``: the training range)."""
    covariance: Any
    """The simulator's residual covariance, for the exact posterior."""
    grf: GRFPrior
    """The GRF of maximum marginal likelihood, the baseline."""


def study_context(
    model: str, train_num: int = 8192, train_seed: int = 0, prior: str = "training", seed: int = 0
) -> StudyContext:
    """Build what every problem of a study shares: generator, residual field, prior box, GRF.

    Cached, so a process builds it once for all the problems it runs; a study on a cluster
    builds it once in the client and sends it to the workers
    (:func:`pyro_dlatent.studies.run_study`'s ``shared``). Arguments as :func:`problem_record`.
    """
    return _context(str(model), train_num, train_seed, prior, seed)


@functools.lru_cache(maxsize=2)
def _context(
    model_path: str, train_num: int, train_seed: int, prior: str, seed: int
) -> StudyContext:
    from pyro_dlatent import data
    from pyro_dlatent.models import AuxVAE
    from pyro_dlatent.residual import residual_field

    generator = AuxVAE.load(model_path).generator()
    if list(generator.scaler.names) != list(NAMES):
        raise ValueError(f"the model's auxiliaries {generator.scaler.names} are not {NAMES}")
    train = data.simulate("sources", train_num, size=SIZE, seed=train_seed)
    residual = generator.residual_field  # fitted by AuxVAE.fit on its training part
    if residual is None:
        residual = residual_field(generator, train["image"].values, train[list(NAMES)])
    bounds = BumpPrior().bounds if prior == "simulator" else None
    _, first, _, _ = sample_problem(0, seed=seed, size=SIZE)
    return StudyContext(
        generator, residual, bounds, BumpPrior().covariance(SIZE), _grf(train, first.noise_sd)
    )


def problem_record(
    index: int,
    context: StudyContext | None = None,
    *,
    model: str | None = None,
    train_num: int = 8192,
    train_seed: int = 0,
    prior: str = "training",
    seed: int = 0,
    sampler: str = "importance",
    num_samples: int = 1000,
    target_accept: float | None = None,
) -> dict[str, Any]:
    """Problem ``index`` of the calibration study: exact, collapsed and GRF posteriors.

    Parameters
    ----------
    index : int
        The problem, :func:`~pyro_dlatent.inverse.exact.sample_problem` ``(index, seed=seed)``.
    context : StudyContext, optional
        What the study's problems share, built by :func:`study_context` with the same
        ``model``, ``train_num``, ``train_seed``, ``prior`` and ``seed``; default: built here
        (once per process).
    model : str, optional
        Path of a saved Aux-VAE trained on ``sources``; its generator is the deep prior. Needed
        without ``context``.
    train_num, train_seed : int
        The ``sources`` training set the GRF is fitted on (and the residual field, for a model
        saved without one).
    prior : {"training", "simulator"}
        The collapsed prior's box: the training range, or the simulator's :class:`BumpPrior`.
    seed : int
        The study's seed.
    sampler, num_samples, target_accept
        Passed to :func:`~pyro_dlatent.inverse.collapsed.infer_collapsed` (``target_accept`` as
        ``target_accept_prob``, left at its default when ``None``).

    Returns
    -------
    dict
        :func:`draw_record` of the collapsed posterior, the relative L2 errors of the posterior
        mean fields (``field_error``, ``exact_field_error``, ``grf_field_error``), the fraction
        of nodes inside the collapsed 90% intervals (``pixel_coverage``), the inference's
        ``seconds`` and its run health (``pareto_k``, ``num_modes``, ...; ``max_rhat`` and
        ``divergences`` for NUTS). JSON-able.
    """
    from pyro_dlatent.inverse.collapsed import infer_collapsed

    if context is None:
        if model is None:
            raise ValueError("problem_record needs a model path or a context")
        context = study_context(model, train_num, train_seed, prior, seed)
    generator, residual, bounds, covariance, grf = context
    u, problem, values, field = sample_problem(index, seed=seed, size=SIZE)
    rng = np.random.default_rng((seed, index, 7))
    exact = ExactBumpPosterior(problem, values, covariance=covariance)
    exact_field, _ = exact.field_moments(1000, rng)
    start = time.perf_counter()
    result = infer_collapsed(
        problem,
        generator,
        values,
        residual=residual,
        bounds=bounds,
        sampler=sampler,
        num_samples=num_samples,
        seed=index,
        warn=False,
        **({} if target_accept is None else {"target_accept_prob": target_accept}),
    )
    seconds = time.perf_counter() - start
    draws = np.asarray(result.idata.posterior["u"]).reshape(-1, len(NAMES))
    fields = result.idata.field_summary
    low, high = np.asarray(fields["field_q05"]), np.asarray(fields["field_q95"])
    grf_mean, _ = grf.posterior(problem, torch.as_tensor(values))
    health = {k: v for k, v in result.health.items() if k != "warnings"}
    return {
        **draw_record(index, u, exact, draws, rng),
        "field_error": _relative(np.asarray(fields["field_mean"]), field),
        "exact_field_error": _relative(exact_field, field),
        "grf_field_error": _relative(np.asarray(grf_mean).reshape(field.shape), field),
        "pixel_coverage": float(((low <= field) & (field <= high)).mean()),
        "seconds": seconds,
        **health,
    }


def draw_record(
    index: int, truth: Any, exact: ExactBumpPosterior, draws: Any, rng: np.random.Generator
) -> dict[str, Any]:
    """A method's draws of ``u`` on problem ``index`` beside the exact posterior, as a record.

    Parameters
    ----------
    index : int
    truth : array-like, shape ``(4,)``
        The true ``x0, y0, log_amplitude, width``.
    exact : ExactBumpPosterior
        The problem's exact posterior.
    draws : array-like, shape ``(n, 4)``
        The method's posterior draws, ``n >= NUM_RANK_DRAWS``.
    rng : numpy.random.Generator
        Picks the :data:`NUM_RANK_DRAWS` draws kept of each (for the SBC ranks).

    Returns
    -------
    dict
        ``index``, ``truth``; the exact posterior's ``exact_mean``, ``exact_interval`` (90%)
        and ``exact_draws``; the method's ``mean``, ``interval`` and ``draws``. JSON-able.
    """
    draws = np.asarray(draws)
    return {
        "index": index,
        "truth": np.asarray(truth).tolist(),
        "exact_mean": exact.mean().tolist(),
        "exact_interval": exact.interval(0.9).tolist(),
        "exact_draws": exact.sample(NUM_RANK_DRAWS, rng).tolist(),
        "mean": draws.mean(0).tolist(),
        "interval": np.quantile(draws, [0.05, 0.95], axis=0).T.tolist(),
        "draws": draws[rng.choice(len(draws), NUM_RANK_DRAWS, replace=False)].tolist(),
    }


def parameter_table(records: list[dict[str, Any]], label: str = "collapsed") -> dict[str, Any]:
    """Named-parameter scores of the exact posterior and of the method of :func:`draw_record`.

    Per name: 90% coverage (all, and the faint third: ``log_amplitude`` below a third of its
    range), SBC rank p-value, median 90% width and RMSE of the posterior mean; the method's width
    and RMSE also over the exact posterior's.

    Parameters
    ----------
    records : list of dict
        :func:`draw_record` entries (or records that contain them).
    label : str
        The method's key in the result.

    Returns
    -------
    dict
        ``num_problems``, ``num_faint``, ``exact`` and ``label`` (each name to its scores), and
        ``band_90``, the 1% band of a calibrated 90% coverage over these problems.
    """
    truths = np.array([r["truth"] for r in records])
    faint = truths[:, 2] < np.log(10.0) / 3
    result: dict[str, Any] = {"num_problems": len(records), "num_faint": int(faint.sum())}
    for prefix, name_of in (("exact_", "exact"), ("", label)):
        intervals = np.array([r[prefix + "interval"] for r in records])
        means = np.array([r[prefix + "mean"] for r in records])
        draws = np.array([r[prefix + "draws"] for r in records])
        inside = (intervals[..., 0] <= truths) & (truths <= intervals[..., 1])
        p_values = rank_uniformity_pvalue(sbc_ranks(truths, draws), NUM_RANK_DRAWS)
        result[name_of] = {
            name: {
                "coverage_90": float(inside[:, j].mean()),
                "coverage_90_faint": float(inside[faint, j].mean()),
                "sbc_p_value": float(p_values[j]),
                "median_width_90": float(np.median(intervals[:, j, 1] - intervals[:, j, 0])),
                "rmse": float(np.sqrt(np.mean((means[:, j] - truths[:, j]) ** 2))),
            }
            for j, name in enumerate(NAMES)
        }
    for name in NAMES:
        entry, reference = result[label][name], result["exact"][name]
        entry["width_over_exact"] = entry["median_width_90"] / reference["median_width_90"]
        entry["rmse_over_exact"] = entry["rmse"] / reference["rmse"]
    result["band_90"] = binomial_band(len(records), 0.9)
    return result


def summarize_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The calibration study's summary of :func:`problem_record` records.

    :func:`parameter_table` of the collapsed prior, and ``field`` (median relative L2 errors of
    the collapsed, exact and GRF posterior mean fields, and the pixel coverage of the collapsed
    90% intervals), time per problem, Pareto k and the number of multimodal problems; after
    NUTS also ``nuts`` (R-hat, divergences and bulk ESS).
    """
    result = parameter_table(records)
    errors = {k: np.median([r[k] for r in records]) for k in ("field_error", "exact_field_error")}
    result["field"] = {
        "median_error": float(errors["field_error"]),
        "median_error_exact": float(errors["exact_field_error"]),
        "median_error_grf": float(np.median([r["grf_field_error"] for r in records])),
        "error_over_exact": float(errors["field_error"] / errors["exact_field_error"]),
        "pixel_coverage_90": float(np.mean([r["pixel_coverage"] for r in records])),
    }
    result["seconds_per_problem"] = float(np.mean([r["seconds"] for r in records]))
    result["max_seconds"] = float(np.max([r["seconds"] for r in records]))
    result["median_pareto_k"] = float(np.median([r["pareto_k"] for r in records]))
    result["multimodal"] = int(sum(r["num_modes"] > 1 for r in records))
    if all("max_rhat" in r for r in records):  # NUTS
        single = [r for r in records if r["num_modes"] == 1]
        result["nuts"] = {
            "unimodal_problems": len(single),
            "unimodal_max_rhat": float(max(r["max_rhat"] for r in single)) if single else None,
            "unimodal_divergences": int(sum(r["divergences"] for r in single)),
            "divergences": int(sum(r["divergences"] for r in records)),
            "rhat_above_1.01": int(sum(r["max_rhat"] > 1.01 for r in records)),
            "min_ess_bulk": float(min(r["min_ess_bulk"] for r in records)),
        }
    return result


# --------------------------------------------------------------------------- science study
def source_problem(noise_sd: float = NOISE_SD) -> SourceProblem:
    """The science study's source problem: unit conductivity, 5x5 sensors, :data:`SIZE` nodes."""
    return SourceProblem(SIZE, default_sensors(5), noise_sd=noise_sd)


def sources_problems(
    problem: SourceProblem, start: int, count: int, test_seed: int
) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    """Held-out ``sources`` problems ``start, ..., start + count - 1``, independent of sharding.

    Problem ``i`` is the single field ``simulate("sources", 1, seed=test_seed + i)`` observed
    with noise from ``numpy.random.default_rng([test_seed, i])``, so a shard that starts at
    ``i`` sees exactly the truth and data the unsharded run sees at ``i``.

    Returns
    -------
    truths : Tensor, shape ``(count, SIZE, SIZE)``, float64
    u_true : numpy.ndarray, shape ``(count, 4)``
        ``x0, y0, log_amplitude, width`` (latent order, the simulator's units).
    data : Tensor, shape ``(count, m)``, float64
    """
    from pyro_dlatent.data import simulate

    if start < 0:
        raise ValueError(f"expected start >= 0, got {start}")
    truths, u_true, data = [], [], []
    for i in range(start, start + count):
        ds = simulate("sources", 1, size=SIZE, seed=test_seed + i)
        truth = torch.as_tensor(ds["image"].values, dtype=torch.float64)
        truths.append(truth[0])
        u_true.append([float(ds[k].values[0]) for k in NAMES])
        noise = np.random.default_rng([test_seed, i])
        data.append(simulate_observations(problem, truth, seed=noise)[0])
    if not truths:
        return torch.zeros(0, SIZE, SIZE, dtype=torch.float64), np.zeros((0, 4)), torch.zeros(0)
    return torch.stack(truths), np.asarray(u_true), torch.stack(data)


def named_draws(samples: torch.Tensor) -> np.ndarray:
    """Draws of ``u`` ``(..., 4)`` as ``(n, 4)`` float64, ``log_amplitude`` exponentiated.

    The columns are then :data:`COVERAGE_NAMES`.
    """
    u = samples.reshape(-1, samples.shape[-1]).double().numpy().copy()
    u[:, 2] = np.exp(u[:, 2])
    return u


def ratio_summary(
    errors: Any, baseline: Any, name: str = "deep", baseline_name: str = "baseline"
) -> dict[str, float]:
    """Per-problem errors of a method (``name``) against a baseline's; ratios baseline / method.

    Parameters
    ----------
    errors, baseline : array-like, shape ``(n,)``
        Errors of the method and of the baseline on the same problems.

    Returns
    -------
    dict
        Medians and means of both, ``ratio_of_medians``, ``ratio_of_means``,
        ``median_of_ratios`` and ``fraction_{name}_better`` (above 1: the method is better).
    """
    errors, baseline = np.asarray(errors), np.asarray(baseline)
    ratio = baseline / errors
    return {
        f"{name}_median": float(np.median(errors)),
        f"{name}_mean": float(np.mean(errors)),
        f"{baseline_name}_median": float(np.median(baseline)),
        f"{baseline_name}_mean": float(np.mean(baseline)),
        "ratio_of_medians": float(np.median(baseline) / np.median(errors)),
        "ratio_of_means": float(np.mean(baseline) / np.mean(errors)),
        "median_of_ratios": float(np.median(ratio)),
        f"fraction_{name}_better": float(np.mean(ratio > 1.0)),
    }


def misspec_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Error summaries of per-problem misspecification records (``problem, deep, grf, oracle``).

    ``deep_over_grf`` compares the deep prior with the fitted GRF (``met``: the GRF's error is
    at least twice the deep prior's, by medians and by means); ``oracle_over_grf`` does the same
    for the known-bump oracle (:func:`~pyro_dlatent.inverse.exact.known_bump_mean`), the best any
    prior that is unsure only of the residual can do.
    """
    records = sorted(records, key=lambda r: r["problem"])
    grf = np.array([r["grf"] for r in records])
    out: dict[str, Any] = {"num_problems": len(records)}
    deep = np.array([r["deep"] for r in records if r.get("deep") is not None])
    if len(deep) == len(records) and records:
        out["deep_over_grf"] = ratio_summary(deep, grf, "deep", "grf")
        ratio = out["deep_over_grf"]
        out["met"] = bool(min(ratio["ratio_of_medians"], ratio["ratio_of_means"]) >= 2.0)
    oracle = np.array([r["oracle"] for r in records if r.get("oracle") is not None])
    if len(oracle) == len(records) and records:
        out["oracle_over_grf"] = ratio_summary(oracle, grf, "oracle", "grf")
    return out


def coverage_summary(records: list[dict[str, Any]], level: float = 0.9) -> dict[str, Any]:
    """Coverage per parameter and run health of per-problem records of one method.

    Each record holds ``problem`` and ``hits`` (four 0/1 flags in :data:`COVERAGE_NAMES` order),
    and, for NUTS, ``max_rhat`` and ``divergences``. The binomial standard error is that of a
    coverage of exactly ``level`` over the number of problems, ``sqrt(level (1 - level) / n)``;
    ``met`` asks every coverage to lie in ``[0.8, 0.97]`` (and, for NUTS, R-hat <= 1.01 with no
    divergences).
    """
    records = sorted(records, key=lambda r: r["problem"])
    hits = np.array([r["hits"] for r in records], dtype=float).reshape(-1, 4)
    n = len(records)
    cov = hits.mean(axis=0) if n else np.full(4, np.nan)
    out: dict[str, Any] = {
        "num_problems": n,
        "coverage": dict(zip(COVERAGE_NAMES, cov.tolist(), strict=True)),
        "binomial_se": math.sqrt(level * (1 - level) / n) if n else math.nan,
        "coverage_met": bool(n and np.all((cov >= 0.8) & (cov <= 0.97))),
    }
    if records and "max_rhat" in records[0]:
        rhats = [float(r["max_rhat"]) for r in records]
        divergences = [int(r["divergences"]) for r in records]
        out.update(
            max_rhat=rhats,
            divergences=divergences,
            worst_rhat=float(np.max(rhats)),
            total_divergences=int(np.sum(divergences)),
            health_met=bool(np.max(rhats) <= 1.01 and np.sum(divergences) == 0),
        )
        out["met"] = bool(out["coverage_met"] and out["health_met"])
    else:
        out["met"] = out["coverage_met"]
    return out


def merge_results(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool shard results of one science experiment (``coverage`` or ``misspec``) into one.

    The shards must share the experiment and its ``settings`` and cover disjoint problems; the
    per-problem records are concatenated and summarized exactly as an unsharded run would be.
    """
    if not results:
        raise ValueError("expected at least one shard result to merge")
    experiment = results[0].get("experiment")
    if experiment not in ("coverage", "misspec"):
        raise ValueError(f"expected coverage or misspec shards, got experiment {experiment!r}")
    for result in results[1:]:
        if result.get("experiment") != experiment:
            raise ValueError(
                f"cannot merge a {result.get('experiment')!r} shard with {experiment!r} shards"
            )
        settings, reference = result.get("settings") or {}, results[0].get("settings") or {}
        if settings != reference:
            keys = sorted(
                k for k in set(settings) | set(reference) if settings.get(k) != reference.get(k)
            )
            raise ValueError(f"shards were run with different settings {keys}; refusing to merge")
    merged: dict[str, Any] = {
        "experiment": experiment,
        "settings": results[0].get("settings"),
        "num_shards": len(results),
    }
    if "calibration" in results[0]:
        merged["calibration"] = results[0]["calibration"]
    groups = ("svi", "nuts") if experiment == "coverage" else (None,)
    for group in groups:
        records = []
        for result in results:
            part = result if group is None else result.get(group)
            if part is not None:
                records.extend(part["records"])
        problems = [r["problem"] for r in records]
        duplicates = sorted({p for p in problems if problems.count(p) > 1})
        if duplicates:
            raise ValueError(f"problems {duplicates} appear in more than one shard")
        records = sorted(records, key=lambda r: r["problem"])
        if group is None:
            merged.update(records=records, **misspec_summary(records), target_ratio=2.0)
        elif records:
            merged[group] = {"records": records, **coverage_summary(records)}
    return merged
