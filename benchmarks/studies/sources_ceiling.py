"""The best Pearson r any encoder can reach on ``sources``: exact posterior means of each auxiliary.

For a ``sources`` field ``f = bump(x0, y0, A, w) + r`` with ``r`` the simulator's own Matérn
field, the likelihood of one auxiliary given the image and the *other three* is exact:
``f - bump ~ N(0, C)`` with ``C`` the Matérn covariance on the grid. Its posterior mean under the
simulator's uniform prior (on a fine grid of the parameter's range) is the estimator of largest
Pearson correlation with the truth among all functions of the image, since for any estimator
``g``, ``corr(g, theta) <= corr(E[theta | image], theta)``. Knowing the other three only helps,
so the r printed here is an upper bound (up to its sampling error) of what an encoder that sees
the image alone can reach; with ``--joint`` the width's bound is tightened by leaving the log
amplitude unknown too (a 2-d grid). The posterior means are
:func:`pyro_dlatent.inverse.exact.aux_posterior_means`.

Run::

    python benchmarks/studies/sources_ceiling.py --num 1000 --out ceiling.json
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

import numpy as np

from pyro_dlatent.data import simulate
from pyro_dlatent.inverse.exact import aux_posterior_means, residual_whitener

__all__ = ["main"]


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
    whitener = residual_whitener(
        args.size, ds.attrs["residual_sd"], ds.attrs["length_scale"], ds.attrs["smoothness"]
    )
    means = aux_posterior_means(ds, whitener, points=args.points, joint=args.joint)
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
