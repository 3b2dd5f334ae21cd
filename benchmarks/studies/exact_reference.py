"""The exact posterior over many ``sources`` inverse problems: the reference for every method.

Problem ``i`` (the same whatever ``--start``/``--count`` shard runs it) draws ``u`` from the
simulator's prior and a Matérn residual with ``numpy.random.default_rng((seed, i))``, observes the
field with 25 sensors and noise of sd ``--noise-fraction`` times the range of its clean data (the
demo's rule), and computes :class:`pyro_dlatent.inverse.exact.ExactBumpPosterior`. Reported per
named parameter: 90% coverage of the exact central intervals, SBC rank p-value (99 draws), median
90% width and RMSE of the posterior mean, the same on the faint third (``log_amplitude`` below its
lower third), and the median relative L2 error of the exact posterior mean field.

Run::

    python benchmarks/studies/exact_reference.py --count 200 --out exact.json
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from pyro_dlatent.calibration import binomial_band, rank_uniformity_pvalue, sbc_ranks
from pyro_dlatent.inverse.exact import NAMES, BumpPrior, ExactBumpPosterior, sample_problem

__all__ = ["main"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--noise-fraction", type=float, default=0.02)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rng = np.random.default_rng((args.seed, 10**9))
    covariance = BumpPrior().covariance(args.size)
    truths, means, intervals, draws, errors, seconds = [], [], [], [], [], []
    for index in range(args.start, args.start + args.count):
        u, fem, values, field = sample_problem(
            index, seed=args.seed, size=args.size, noise_fraction=args.noise_fraction
        )
        start = time.perf_counter()
        post = ExactBumpPosterior(fem, values, covariance=covariance)
        mean_field, _ = post.field_moments(1000, rng)
        seconds.append(time.perf_counter() - start)
        truths.append(u)
        means.append(post.mean())
        intervals.append(post.interval(0.9))
        draws.append(post.sample(99, rng))
        errors.append(float(np.linalg.norm(mean_field - field) / np.linalg.norm(field)))
    truths, means, intervals = np.array(truths), np.array(means), np.array(intervals)
    inside = (intervals[..., 0] <= truths) & (truths <= intervals[..., 1])
    faint = truths[:, 2] < np.log(1.0) + np.log(10.0) / 3
    p_values = rank_uniformity_pvalue(sbc_ranks(truths, np.array(draws)), 99)
    result: dict[str, Any] = {"args": vars(args), "seconds_per_problem": float(np.mean(seconds))}
    for j, name in enumerate(NAMES):
        result[name] = {
            "coverage_90": float(inside[:, j].mean()),
            "coverage_90_faint": float(inside[faint, j].mean()),
            "sbc_p_value": float(p_values[j]),
            "median_width_90": float(np.median(intervals[:, j, 1] - intervals[:, j, 0])),
            "rmse": float(np.sqrt(np.mean((means[:, j] - truths[:, j]) ** 2))),
        }
    result["median_field_error"] = float(np.median(errors))
    result["band_90"] = binomial_band(len(truths), 0.9)
    for name in NAMES:
        entry = result[name]
        print(
            f"{name:>14}: coverage {entry['coverage_90']:.3f}"
            f" (faint {entry['coverage_90_faint']:.3f})"
            f"  SBC p {entry['sbc_p_value']:.3f}  median width {entry['median_width_90']:.4f}"
            f"  RMSE {entry['rmse']:.4f}"
        )
    print(
        f"field error (median) {result['median_field_error']:.3f}; "
        f"{result['seconds_per_problem']:.1f} s per problem; 1% band of the coverage "
        f"{result['band_90'][0]:.3f}-{result['band_90'][1]:.3f}"
    )
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
