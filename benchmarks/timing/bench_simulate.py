"""Time the built-in simulators: images per second and peak numpy memory for each."""

from __future__ import annotations

import argparse
import json
import platform
import time
import tracemalloc
from pathlib import Path

import numpy as np

from pyro_dlatent.data import SIMULATORS, simulate

__all__ = ["bench", "main"]


def bench(name: str, num: int, size: int, seed: int = 0) -> dict[str, float]:
    """Simulate ``num`` images of ``size x size`` with one simulator and time it.

    A small warm-up call runs first (imports, cached tables), so the number is the throughput.

    Returns
    -------
    dict
        ``seconds``, ``images_per_second`` and ``peak_traced_mib`` (peak of the memory that
        Python and numpy allocate, from :mod:`tracemalloc`; GalSim's C++ buffers are not seen).
    """
    simulate(name, 8, size=size, seed=seed)
    tracemalloc.start()
    start = time.perf_counter()
    ds = simulate(name, num, size=size, seed=seed)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    if not np.isfinite(ds["image"].values).all():
        raise RuntimeError(f"simulator {name!r} produced non-finite images")
    return {
        "seconds": seconds,
        "images_per_second": num / seconds,
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
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    results = {
        "num": args.num,
        "size": args.size,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "simulators": {},
    }
    for name in args.names:
        result = bench(name, args.num, args.size, args.seed)
        results["simulators"][name] = result
        print(
            f"{name:>9}: {args.num} images of {args.size}x{args.size} in "
            f"{result['seconds']:.2f} s = {result['images_per_second']:.0f} images/s "
            f"(peak {result['peak_traced_mib']:.0f} MiB)",
            flush=True,
        )
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
