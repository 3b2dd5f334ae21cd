"""Time the built-in simulators: images per second and peak numpy memory for each.

Each simulator makes ``--num`` images once after a small warm-up call; the speedups printed are
against the ``sources`` simulator (``--baseline``), so they compare the simulators' costs per
image. Run ``python benchmarks/timing/bench_simulate.py --num 256``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tracemalloc
from pathlib import Path

import numpy as np
from _timing import Timing, measure, print_ratios

from pyro_dlatent.data import SIMULATORS, simulate

__all__ = ["bench", "main"]


def bench(name: str, num: int, size: int, seed: int = 0) -> tuple[Timing, dict[str, float]]:
    """Simulate ``num`` images of ``size x size`` with one simulator and time it.

    A small warm-up call runs first (imports, cached tables), so the number is the throughput.

    Returns
    -------
    Timing
        Seconds of the one timed call.
    dict
        ``seconds``, ``images_per_second`` and ``peak_traced_mib`` (peak of the memory that
        Python and numpy allocate, from :mod:`tracemalloc`; GalSim's C++ buffers are not seen).
    """
    simulate(name, 8, size=size, seed=seed)
    made = []
    tracemalloc.start()
    timing = measure(
        lambda: made.append(simulate(name, num, size=size, seed=seed)), repeat=1, warmup=0
    )
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    if not np.isfinite(made[0]["image"].values).all():
        raise RuntimeError(f"simulator {name!r} produced non-finite images")
    return timing, {
        "seconds": timing.median,
        "images_per_second": num / timing.median,
        "peak_traced_mib": peak / 2**20,
    }


def main(argv: list[str] | None = None) -> dict:
    """Command-line entry point; returns the results it prints."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num", type=int, default=10_000, help="images per simulator")
    parser.add_argument("--size", type=int, default=32, help="pixels per side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--names", nargs="+", default=sorted(SIMULATORS), choices=sorted(SIMULATORS)
    )
    parser.add_argument(
        "--baseline", default="sources", help="the simulator the others are compared to"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.baseline not in args.names:
        parser.error(f"--baseline {args.baseline!r} is not among --names {args.names}")
    results = {
        "num": args.num,
        "size": args.size,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "simulators": {},
    }
    rows = []
    for name in args.names:
        timing, result = bench(name, args.num, args.size, args.seed)
        rows.append((name, timing))
        results["simulators"][name] = result
        print(
            f"{name:>9}: {args.num} images of {args.size}x{args.size} in "
            f"{result['seconds']:.2f} s = {result['images_per_second']:.0f} images/s "
            f"(peak {result['peak_traced_mib']:.0f} MiB)",
            flush=True,
        )
    print(f"{args.num} images each:")
    print_ratios(rows, baseline=args.baseline, unit="s")
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
