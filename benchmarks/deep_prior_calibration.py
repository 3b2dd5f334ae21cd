"""The collapsed deep prior against the exact posterior over many ``sources`` inverse problems.

Problem ``i`` is :func:`pyro_dlatent.inverse.exact.sample_problem` ``(i, seed=--seed)`` (the same
whatever shard computes it). For each, the exact posterior
(:class:`~pyro_dlatent.inverse.exact.ExactBumpPosterior`), the collapsed deep prior of a trained
Aux-VAE (:class:`~pyro_dlatent.inverse.collapsed.CollapsedPosterior`, prior box: the training
range) and a Gaussian random field fitted by maximum marginal likelihood on training fields.
Reported per named parameter: 90% coverage (all, faint third), SBC rank p-value (99 draws),
median 90% width and RMSE of the posterior mean, each method's over exact; for the field, the
median relative L2 error of the posterior mean (exact, collapsed, GRF) and the pixelwise
coverage of the collapsed posterior's 90% intervals. ``--sampler nuts`` runs Pyro's NUTS on the
collapsed model (4 chains) and adds R-hat, divergences and time per problem.

Run (train once, then shard; ``--merge`` combines shard outputs)::

    python benchmarks/deep_prior_calibration.py --train-only --model vae.pt
    python benchmarks/deep_prior_calibration.py --model vae.pt --count 200 --out study.json

or as dask tasks, one record file per problem (a rerun skips the recorded ones; ``--scheduler
tcp://host:8786`` sends them to a running cluster)::

    python benchmarks/deep_prior_calibration.py --model vae.pt --count 200 --records study/
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyro_dlatent import data
from pyro_dlatent.calibration import binomial_band, rank_uniformity_pvalue, sbc_ranks
from pyro_dlatent.inverse.collapsed import SAMPLERS, infer_collapsed
from pyro_dlatent.inverse.exact import NAMES, BumpPrior, ExactBumpPosterior, sample_problem
from pyro_dlatent.inverse.fem import SourceProblem, default_sensors, simulate_observations
from pyro_dlatent.inverse.grf import GRFPrior
from pyro_dlatent.models import AuxVAE
from pyro_dlatent.residual import residual_field
from pyro_dlatent.studies import run_study

__all__ = ["draw_record", "main", "parameter_table", "problem_record", "summarize"]

SIZE = 32
NUM_RANK_DRAWS = 99


def _train(args: argparse.Namespace) -> AuxVAE:
    train = data.simulate("sources", args.train_num, size=SIZE, seed=args.train_seed)
    model = AuxVAE.from_dataset(train, seed=args.train_seed)
    model.fit(train, epochs=args.epochs, seed=args.train_seed, progress=False)
    model.save(args.model)
    return model


def _grf(train: Any, noise_sd: float) -> GRFPrior:
    fields = torch.as_tensor(train["image"].values[:2048], dtype=torch.float64)
    problem = SourceProblem(SIZE, default_sensors(5), noise_sd)
    observed = simulate_observations(problem, fields, seed=0)
    initial = GRFPrior.from_matern(SIZE, 0.2, 1.0, mean=float(fields.mean()))
    return initial.fit_hyperparameters(problem, observed)


def _relative(estimate: np.ndarray, truth: np.ndarray) -> float:
    return float(np.linalg.norm(estimate - truth) / np.linalg.norm(truth))


@functools.lru_cache(maxsize=2)
def _context(model_path: str, train_num: int, train_seed: int, prior: str, seed: int) -> tuple:
    """What every problem of a study shares: generator, residual field, prior box, GRF.

    Cached, so a process (or a dask worker) builds it once for all the problems it runs.
    """
    model = AuxVAE.load(model_path)
    generator = model.generator()
    if list(generator.scaler.names) != list(NAMES):
        raise ValueError(f"the model's auxiliaries {generator.scaler.names} are not {NAMES}")
    train = data.simulate("sources", train_num, size=SIZE, seed=train_seed)
    residual = generator.residual_field  # fitted by AuxVAE.fit on its training part
    if residual is None:
        residual = residual_field(generator, train["image"].values, train[list(NAMES)])
    bounds = BumpPrior().bounds if prior == "simulator" else None
    _, first, _, _ = sample_problem(0, seed=seed, size=SIZE)
    return generator, residual, bounds, BumpPrior().covariance(SIZE), _grf(train, first.noise_sd)


def problem_record(
    index: int,
    *,
    model: str,
    train_num: int = 8192,
    train_seed: int = 0,
    prior: str = "training",
    seed: int = 0,
    sampler: str = "importance",
    num_samples: int = 1000,
    target_accept: float | None = None,
) -> dict[str, Any]:
    """Problem ``index`` of the study: exact, collapsed and GRF posteriors, as one record."""
    generator, residual, bounds, covariance, grf = _context(
        model, train_num, train_seed, prior, seed
    )
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


def _task(args: argparse.Namespace) -> Any:
    return functools.partial(
        problem_record,
        model=str(args.model),
        train_num=args.train_num,
        train_seed=args.train_seed,
        prior=args.prior,
        seed=args.seed,
        sampler=args.sampler,
        num_samples=args.num_samples,
        target_accept=args.target_accept,
    )


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One record per problem of the shard ``--start``, ``--count``, in this process."""
    task, records = _task(args), []
    for index in range(args.start, args.start + args.count):
        records.append(task(index))
        health = {k: v for k, v in records[-1].items() if k in _HEALTH}
        print(
            f"problem {index}: {records[-1]['seconds']:.1f} s, "
            + ", ".join(f"{k} {v:.3g}" for k, v in health.items()),
            flush=True,
        )
    return records


_HEALTH = ("num_modes", "ess", "pareto_k", "divergences", "misfit_rms", "max_rhat", "min_ess_bulk")


def draw_record(
    index: int, truth: np.ndarray, exact: Any, draws: np.ndarray, rng: np.random.Generator
) -> dict[str, Any]:
    """Problem ``index``'s truth, exact posterior and a method's ``draws`` of ``u``, as a record."""
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
    """Named-parameter scores of ``exact`` and of the method whose record keys have no prefix.

    Per name: 90% coverage (all, faint third: ``log_amplitude`` below a third of its range),
    SBC rank p-value, median 90% width and RMSE of the posterior mean; the method's width and
    RMSE also over exact's.
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


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Coverage, SBC, widths, RMSE and field errors of the collapsed prior and exact."""
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


def _print(result: dict[str, Any]) -> None:
    for name in NAMES:
        c, e = result["collapsed"][name], result["exact"][name]
        print(
            f"{name:>14}: coverage {c['coverage_90']:.3f} (faint {c['coverage_90_faint']:.3f}; "
            f"exact {e['coverage_90']:.3f})  SBC p {c['sbc_p_value']:.3f}  width x exact "
            f"{c['width_over_exact']:.2f}  RMSE x exact {c['rmse_over_exact']:.2f}"
        )
    f = result["field"]
    print(
        f"field error median {f['median_error']:.3f} (exact {f['median_error_exact']:.3f}, "
        f"x {f['error_over_exact']:.3f}; GRF {f['median_error_grf']:.3f}); pixel coverage "
        f"{f['pixel_coverage_90']:.3f}; {result['seconds_per_problem']:.1f} s per problem; "
        f"1% band {result['band_90'][0]:.3f}-{result['band_90'][1]:.3f}"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", required=True, help="Aux-VAE checkpoint (written by --train-only)"
    )
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--train-num", type=int, default=8192)
    parser.add_argument("--train-seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prior", choices=("training", "simulator"), default="training")
    parser.add_argument("--sampler", choices=SAMPLERS, default="importance")
    parser.add_argument("--num-samples", type=int, default=1000, help="draws (per NUTS chain)")
    parser.add_argument(
        "--target-accept", type=float, default=None, help="NUTS target acceptance [API default]"
    )
    parser.add_argument("--out", default=None)
    parser.add_argument("--merge", nargs="+", default=None, help="shard outputs to combine")
    parser.add_argument(
        "--records",
        default=None,
        help="run the problems as dask tasks, one record file each under this folder (a rerun "
        "skips the recorded ones)",
    )
    parser.add_argument(
        "--scheduler",
        default=None,
        help="with --records: a dask scheduler address, or 'serial' (default: a local cluster)",
    )
    parser.add_argument("--workers", type=int, default=None, help="local cluster's workers")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.train_only:
        _train(args)
        return {}
    if args.merge:
        records = [r for path in args.merge for r in json.loads(Path(path).read_text())["records"]]
    elif args.records:
        indices = range(args.start, args.start + args.count)
        records = run_study(
            _task(args), indices, args.records, scheduler=args.scheduler, workers=args.workers
        )
    else:
        records = run(args)
    result = summarize(records)
    _print(result)
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": result, "records": records}, indent=1))
    return result


if __name__ == "__main__":
    main()
