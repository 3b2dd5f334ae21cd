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
collapsed model (4 chains) and adds R-hat, divergences and time per problem. Each problem's
record is :func:`pyro_dlatent.inverse.studies.problem_record`, the summary
:func:`pyro_dlatent.inverse.studies.summarize_records`.

Run (train once, then shard; ``--merge`` combines shard outputs)::

    python benchmarks/studies/deep_prior_calibration.py --train-only --model vae.pt
    python benchmarks/studies/deep_prior_calibration.py --model vae.pt --count 200 --out study.json

or as dask tasks, one record file per problem (a rerun skips the recorded ones; ``--scheduler
tcp://host:8786`` sends them to a running cluster)::

    python benchmarks/studies/deep_prior_calibration.py --model vae.pt --count 200 --records study/
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path
from typing import Any

import torch

from pyro_dlatent import data
from pyro_dlatent.inverse.collapsed import SAMPLERS
from pyro_dlatent.inverse.exact import NAMES
from pyro_dlatent.inverse.studies import SIZE, problem_record, study_context, summarize_records
from pyro_dlatent.models import AuxVAE
from pyro_dlatent.studies import run_study

__all__ = ["main"]

_HEALTH = ("num_modes", "ess", "pareto_k", "divergences", "misfit_rms", "max_rhat", "min_ess_bulk")


def _train(args: argparse.Namespace) -> AuxVAE:
    train = data.simulate("sources", args.train_num, size=SIZE, seed=args.train_seed)
    model = AuxVAE.from_dataset(train, seed=args.train_seed)
    model.fit(train, epochs=args.epochs, seed=args.train_seed, progress=False)
    model.save(args.model)
    return model


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
        # built once here and sent to each worker, not rebuilt by every worker
        shared = study_context(args.model, args.train_num, args.train_seed, args.prior, args.seed)
        records = run_study(
            _task(args),
            indices,
            args.records,
            scheduler=args.scheduler,
            workers=args.workers,
            shared=shared,
        )
    else:
        records = run(args)
    result = summarize_records(records)
    _print(result)
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": result, "records": records}, indent=1))
    return result


if __name__ == "__main__":
    main()
