"""Calibration of ``predict_aux`` on held-out truths: coverage, sharpness, and coverage by third.

Trains an Aux-VAE (or DL-CFM) at the package defaults on ``--num`` simulated images, calibrates
it as ``fit`` does (its validation part), and scores what ``predict_aux`` reports on ``--test-num``
images simulated with another seed: for each auxiliary the coverage of the central 50/80/90/95%
intervals (quantiles) and of mean ± z sd, the RMS z-score, the mean sd over the RMS error, the
rank correlation of the sd with the absolute error, the 90% coverage in each third of the
auxiliary's range, and Pearson r of the reported mean. ``--dataset user`` is an image simulator
written here (elliptical Sérsic-like blobs with two named factors, a log10-transformed one, and a
hidden one), brought in through :func:`pyro_dlatent.data.from_arrays` as a user would.

Run::

    python benchmarks/studies/aux_calibration.py --dataset sources --out sources_calibration.json
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import scipy.stats
import torch
import xarray as xr

from pyro_dlatent import data
from pyro_dlatent.calibration import (
    COVERAGE_LEVELS,
    binomial_band,
    calibration_summary,
    coverage,
    interval_bounds,
    interval_probabilities,
)
from pyro_dlatent.runs import build_model

__all__ = ["main", "score", "user_dataset"]


def user_dataset(n: int, *, size: int = 32, seed: int = 0) -> xr.Dataset:
    """Elliptical blobs: log10 flux and axis ratio named, orientation hidden, plus pixel noise."""
    rng = np.random.default_rng(seed)
    flux = 10 ** rng.uniform(1.0, 2.5, n)
    axis_ratio = rng.uniform(0.3, 1.0, n)
    angle = rng.uniform(0.0, np.pi, n)
    c = np.arange(size) - (size - 1) / 2
    x, y = np.meshgrid(c, c)
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u = cos * x + sin * y
    v = (-sin * x + cos * y) / axis_ratio[:, None, None]
    profile = np.exp(-np.sqrt(u**2 + v**2) / 2.5)
    profile /= profile.sum(axis=(1, 2), keepdims=True)
    images = flux[:, None, None] * profile + 0.02 * rng.normal(size=(n, size, size))
    return data.from_arrays(
        images,
        {"flux": flux, "axis_ratio": axis_ratio},
        units={"flux": "count"},
        transforms={"flux": "log10"},
        extra={"angle": angle},
    )


def _dataset(name: str, n: int, size: int, seed: int) -> xr.Dataset:
    if name == "user":
        return user_dataset(n, size=size, seed=seed)
    return data.simulate(name, n, size=size, seed=seed)


def score(model: Any, held_out: xr.Dataset) -> dict[str, Any]:
    """The calibration numbers of every auxiliary of ``model`` on ``held_out``."""
    predicted = model.predict_aux(held_out, quantiles=interval_probabilities(COVERAGE_LEVELS))
    result = {}
    for name in model.aux_names:
        truth = held_out[name].values.astype(np.float64)
        entry = calibration_summary(
            truth,
            predicted[name].values,
            predicted[f"{name}_sd"].values,
            {level: interval_bounds(predicted, name, level) for level in COVERAGE_LEVELS},
        )
        third = np.digitize(truth, np.quantile(truth, [1 / 3, 2 / 3]))
        lower, upper = interval_bounds(predicted, name, 0.9)
        entry["coverage_90_by_third"] = [
            coverage(truth[third == k], lower[third == k], upper[third == k]) for k in range(3)
        ]
        entry["pearson_r"] = float(scipy.stats.pearsonr(predicted[name].values, truth)[0])
        entry["band_90"] = binomial_band(
            len(truth), 0.9, calibration_rows=int(model.aux_calibration.num_calibration.max())
        )
        result[name] = entry
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="sources", help="sources, galaxies, halos or user")
    parser.add_argument("--model", default="auxvae", choices=["auxvae", "dlcfm"])
    parser.add_argument("--num", type=int, default=8192, help="training images")
    parser.add_argument("--test-num", type=int, default=4096, help="held-out images")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument(
        "--model-kwargs",
        type=json.loads,
        default={},
        help="JSON of model options, e.g. '{\"depth\": 2}'",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="JSON file of the results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train = _dataset(args.dataset, args.num, args.size, args.seed)
    held_out = _dataset(args.dataset, args.test_num, args.size, args.seed + 10_000)
    model = build_model(args.model, train, **{"seed": args.seed, **args.model_kwargs})
    start = time.perf_counter()
    model.fit(train, epochs=args.epochs, seed=args.seed, progress=False)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    model.calibrate_uncertainty(*data.split(train, 0.1, seed=args.seed))
    calibration_seconds = time.perf_counter() - start
    result = {
        "args": vars(args),
        "fit_seconds": fit_seconds,
        "calibration_seconds": calibration_seconds,
        "variables": score(model, held_out),
    }
    for name, entry in result["variables"].items():
        cover = entry["coverage"]
        print(
            f"{name:>14}: coverage 50/80/90/95 "
            + " / ".join(f"{cover[level]:.3f}" for level in COVERAGE_LEVELS)
            + f"  rms z {entry['rms_z_score']:.2f}  sd/rmse {entry['sd_over_rmse']:.2f}"
            + f"  spearman {entry['spearman_sd_error']:.2f}"
            + "  90% by third "
            + " / ".join(f"{c:.2f}" for c in entry["coverage_90_by_third"])
            + f"  r {entry['pearson_r']:.4f}"
        )
    print(
        f"fit {fit_seconds:.0f} s; calibration {calibration_seconds:.1f} s "
        f"({calibration_seconds / fit_seconds:.1%} of fit)"
    )
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2, default=float)
    return result


if __name__ == "__main__":
    main()
