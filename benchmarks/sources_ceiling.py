"""The best Pearson r any encoder can reach on ``sources``: exact posterior means of each auxiliary.

For a ``sources`` field ``f = bump(x0, y0, A, w) + r`` with ``r`` the simulator's own Matérn
field, the likelihood of one auxiliary given the image and the *other three* is exact:
``f - bump ~ N(0, C)`` with ``C`` the Matérn covariance on the grid. Its posterior mean under the
simulator's uniform prior (on a fine grid of the parameter's range) is the estimator of largest
Pearson correlation with the truth among all functions of the image, since for any estimator
``g``, ``corr(g, theta) <= corr(E[theta | image], theta)``. Knowing the other three only helps,
so the r printed here is an upper bound (up to its sampling error) of what an encoder that sees
the image alone can reach; with ``--joint`` the width's bound is tightened by leaving the log
amplitude unknown too (a 2-d grid).

Run::

    python benchmarks/sources_ceiling.py --num 1000 --out ceiling.json
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

import numpy as np

from pyro_dlatent.data import simulate
from pyro_dlatent.data.sources import gaussian_bump, grid, residual_covariance

__all__ = ["main", "posterior_means", "whitener"]

NAMES = ("x0", "y0", "log_amplitude", "width")


def whitener(size: int, sd: float, length_scale: float, smoothness: float) -> np.ndarray:
    """``W`` with ``W^T C W = I`` for the Matérn covariance ``C`` on the ``size x size`` grid."""
    cov = residual_covariance(size, sd=sd, length_scale=length_scale, smoothness=smoothness)
    chol = np.linalg.cholesky(cov + 1e-9 * sd**2 * np.eye(len(cov)))
    return np.linalg.inv(chol).T


def _log_likelihood(residuals: np.ndarray, whiten: np.ndarray) -> np.ndarray:
    """``-0.5 |W^T (f - bump)|^2`` for residuals ``(m, pixels)``."""
    return -0.5 * np.square(residuals @ whiten).sum(-1)


def posterior_means(
    ds: Any, whiten: np.ndarray, points: int = 201, joint: bool = False
) -> dict[str, np.ndarray]:
    """Grid posterior mean of each auxiliary given the image and the other three (exact).

    With ``joint``, also ``width_joint``: the width's posterior mean with ``log_amplitude``
    unknown as well (a 2-d grid of ``points // 4`` widths by 61 log amplitudes).
    """
    t = grid(ds.sizes["x"])
    images = ds["image"].values.reshape(ds.sizes["sample"], -1).astype(np.float64)
    truth = {name: ds[name].values.astype(np.float64) for name in NAMES}
    ranges = {
        "x0": ds.attrs["center_range"],
        "y0": ds.attrs["center_range"],
        "log_amplitude": [math.log(v) for v in ds.attrs["amplitude_range"]],
        "width": ds.attrs["width_range"],
    }
    out = {name: np.empty(len(images)) for name in NAMES}
    if joint:
        out["width_joint"] = np.empty(len(images))
        widths = np.linspace(*ranges["width"], max(points // 4, 2))
        amps = np.linspace(*ranges["log_amplitude"], 61)
        ww, aa = np.meshgrid(widths, amps, indexing="ij")
    for i, image in enumerate(images):
        for name in NAMES:
            values = np.linspace(*ranges[name], points)
            args = {k: np.full(points, truth[k][i]) for k in NAMES}
            args[name] = values
            bumps = gaussian_bump(t, t, *(args[k] for k in NAMES)).reshape(points, -1)
            ll = _log_likelihood(image - bumps, whiten)
            weights = np.exp(ll - ll.max())
            out[name][i] = (weights * values).sum() / weights.sum()
        if joint:
            m = ww.size
            args = {k: np.full(m, truth[k][i]) for k in ("x0", "y0")}
            bumps = gaussian_bump(t, t, args["x0"], args["y0"], aa.ravel(), ww.ravel())
            ll = _log_likelihood(image - bumps.reshape(m, -1), whiten)
            weights = np.exp(ll - ll.max())
            out["width_joint"][i] = (weights * ww.ravel()).sum() / weights.sum()
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=1000, help="simulated fields")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--points", type=int, default=201, help="grid points per parameter")
    parser.add_argument("--joint", action="store_true", help="also width with A unknown")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    ds = simulate("sources", args.num, size=args.size, seed=args.seed)
    whiten = whitener(
        args.size, ds.attrs["residual_sd"], ds.attrs["length_scale"], ds.attrs["smoothness"]
    )
    means = posterior_means(ds, whiten, points=args.points, joint=args.joint)
    result: dict[str, Any] = {"num": args.num, "size": args.size, "seed": args.seed, "r": {}}
    for name, estimate in means.items():
        truth = ds["width" if name == "width_joint" else name].values
        r = float(np.corrcoef(estimate, truth)[0, 1])
        # Sampling sd of a Pearson r over n pairs: (1 - r^2) / sqrt(n).
        result["r"][name] = {"r": r, "se": (1.0 - r * r) / math.sqrt(args.num)}
        print(f"{name:>14}: r = {r:.4f} +- {result['r'][name]['se']:.4f}", flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
