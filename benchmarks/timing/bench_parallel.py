"""Chains on several processes and a study on a dask cluster, against their one-process runs.

Run ``python benchmarks/timing/bench_parallel.py --model vae.pt [--problems 20]
[--output par.json]`` with an Aux-VAE checkpoint of ``sources``
(``benchmarks/studies/deep_prior_calibration.py --train-only`` writes one). Two timings, each
against its baseline in the same run (one run each, ``_timing.measure``), with the speedup
printed:

(a) ``infer_collapsed(..., sampler="nuts")``, 4 chains of 500 + 1,000 steps on one problem, on
    one process and on ``min(4, cores)`` processes (the draws are identical; checked);
(b) the calibration study's importance-sampling records of ``--problems`` problems, serially
    in this process and as dask tasks on a local cluster of one worker per core (the records
    are identical, timings aside; checked).

The ideal speedup on a 2-core machine is 2; process start-up, the per-worker context (8,192
simulated training images and the GRF fit, built once per worker) and the machine's other load
take from it.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from _timing import measure, print_ratios

from pyro_dlatent.inverse.chains import available_cores
from pyro_dlatent.inverse.collapsed import infer_collapsed
from pyro_dlatent.inverse.exact import sample_problem
from pyro_dlatent.inverse.studies import _context, problem_record, study_context
from pyro_dlatent.models import AuxVAE
from pyro_dlatent.studies import run_study

__all__ = ["main"]


def _chains(model_path: str, index: int) -> dict[str, float]:
    generator = AuxVAE.load(model_path).generator()
    _, problem, values, _ = sample_problem(index, size=generator.image_size)
    timings, draws = {}, {}
    for processes in (1, min(4, available_cores())):

        def chains(processes: int = processes) -> None:
            result = infer_collapsed(
                problem, generator, values, sampler="nuts", num_processes=processes, warn=False
            )
            draws[processes] = result.idata.posterior["u"].values

        timings[processes] = measure(chains, repeat=1, warmup=0)
    one, many = sorted(timings)
    assert np.array_equal(draws[one], draws[many]), "parallel chains drew other draws"
    print("collapsed NUTS, 4 chains:")
    rows = [(f"{n} process{'es' if n > 1 else ''}", timings[n]) for n in (one, many)]
    print_ratios(rows, baseline=rows[0][0], unit="s")
    seconds = {n: timing.median for n, timing in timings.items()}
    return {
        "chains_1_process_s": seconds[one],
        f"chains_{many}_processes_s": seconds[many],
        "chains_speedup": seconds[one] / seconds[many],
    }


def _study(model_path: str, problems: int) -> dict[str, float]:
    task = functools.partial(problem_record, model=model_path)  # the study's defaults
    timings, records = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for scheduler in ("serial", None):
            out = Path(folder) / str(scheduler)

            def study(scheduler: str | None = scheduler, out: Path = out) -> None:
                # each timed run builds the study's context (model, residual field, GRF) once
                _context.cache_clear()
                shared = study_context(model_path)
                records[scheduler] = run_study(
                    task, range(problems), out, scheduler=scheduler, shared=shared
                )

            timings[scheduler] = measure(study, repeat=1, warmup=0)
            shutil.rmtree(out)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in records["serial"]]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in records[None]]
    print(f"the calibration study's records of {problems} problems:")
    rows = [("serial", timings["serial"]), (f"dask, {available_cores()} workers", timings[None])]
    print_ratios(rows, baseline="serial", unit="s")
    seconds = {scheduler: timing.median for scheduler, timing in timings.items()}
    return {
        "study_serial_s": seconds["serial"],
        "study_dask_s": seconds[None],
        "study_workers": available_cores(),
        "study_speedup": seconds["serial"] / seconds[None],
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--problems", type=int, default=20)
    parser.add_argument("--problem", type=int, default=3, help="the chains' problem")
    parser.add_argument("--skip", choices=("chains", "study"), default=None)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result: dict[str, float] = {"cores": available_cores()}
    if args.skip != "chains":
        result.update(_chains(args.model, args.problem))
    if args.skip != "study":
        result.update(_study(args.model, args.problems))
    for key, value in result.items():
        print(f"{key:>24}: {value:.3f}" if isinstance(value, float) else f"{key:>24}: {value}")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
