"""Neural posterior estimation (``sbi``) on the ``sources`` problems of the deep-prior study.

What a user would pick instead of a deep prior: NPE (a masked autoregressive flow, ``sbi``'s
defaults) trained on ``--num-simulations`` pairs ``(u, d)`` of the same simulator as
:func:`pyro_dlatent.inverse.exact.sample_problem` (``u`` from the prior box, a bump plus a Matérn
field, 25 sensors, noise sd 2% of the clean data's range), as many simulations as the generator
had training images. Scored on the study's problems against the exact posterior with
:func:`pyro_dlatent.inverse.studies.parameter_table`, as ``deep_prior_calibration.py`` scores the
collapsed deep prior. Needs ``pip install sbi`` (not a package dependency).

Run::

    python benchmarks/studies/npe_reference.py --num-simulations 8192 --count 200 --out npe.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyro_dlatent.data.sources import gaussian_bump, grid, sample_matern_field
from pyro_dlatent.inverse.exact import NAMES, BumpPrior, ExactBumpPosterior, sample_problem
from pyro_dlatent.inverse.fem import SourceProblem, default_sensors
from pyro_dlatent.inverse.studies import SIZE, draw_record, parameter_table

__all__ = ["main", "simulate"]


def simulate(num: int, seed: int, noise_fraction: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
    """``num`` pairs ``(u, d)`` of the study's simulator, ``(num, 4)`` and ``(num, 25)``."""
    rng = np.random.default_rng(seed)
    prior = BumpPrior()
    u = prior.sample(num, rng)
    t = grid(SIZE)
    fields = gaussian_bump(t, t, *u.T) + sample_matern_field(
        num,
        SIZE,
        sd=prior.residual_sd,
        length_scale=prior.length_scale,
        smoothness=prior.smoothness,
        rng=rng,
    )
    operator = SourceProblem(SIZE, default_sensors(5), 1.0).sensor_operator
    clean = fields.reshape(num, -1) @ operator.T
    noise_sd = noise_fraction * (clean.max(1) - clean.min(1))
    return u, clean + noise_sd[:, None] * rng.standard_normal(clean.shape)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from sbi.inference import NPE
    from sbi.utils import BoxUniform

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-simulations", type=int, default=8192)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    bounds = torch.as_tensor(BumpPrior().bounds, dtype=torch.float32)
    prior = BoxUniform(low=bounds[:, 0], high=bounds[:, 1])
    u, x = simulate(args.num_simulations, seed=(args.seed, 99))
    start = time.perf_counter()
    inference = NPE(prior=prior, show_progress_bars=False)
    inference.append_simulations(
        torch.as_tensor(u, dtype=torch.float32), torch.as_tensor(x, dtype=torch.float32)
    ).train()
    posterior = inference.build_posterior()
    train_seconds = time.perf_counter() - start
    covariance = BumpPrior().covariance(SIZE)
    records = []
    for index in range(args.start, args.start + args.count):
        truth, problem, values, _ = sample_problem(index, seed=args.seed, size=SIZE)
        rng = np.random.default_rng((args.seed, index, 7))
        exact = ExactBumpPosterior(problem, values, covariance=covariance)
        start = time.perf_counter()
        draws = posterior.sample(
            (1000,), x=torch.as_tensor(values, dtype=torch.float32), show_progress_bars=False
        ).numpy()
        seconds = time.perf_counter() - start
        records.append({**draw_record(index, truth, exact, draws, rng), "seconds": seconds})
    result = parameter_table(records, "npe")
    result["train_seconds"] = train_seconds
    result["seconds_per_problem"] = float(np.mean([r["seconds"] for r in records]))
    for name in NAMES:
        entry = result["npe"][name]
        print(
            f"{name:>14}: coverage {entry['coverage_90']:.3f} (faint "
            f"{entry['coverage_90_faint']:.3f})  SBC p {entry['sbc_p_value']:.3f}  width x exact "
            f"{entry['width_over_exact']:.2f}  RMSE x exact {entry['rmse_over_exact']:.2f}"
        )
    print(f"trained in {train_seconds:.0f} s; {result['seconds_per_problem']:.2f} s per problem")
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": result, "records": records}, indent=1))
    return result


if __name__ == "__main__":
    main()
