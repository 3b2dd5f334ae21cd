"""The timing helper every script in ``benchmarks/timing`` shares: measure a call, print ratios.

A script times each variant with :func:`measure` and prints them with :func:`print_ratios`
against the variant it is compared to::

    from _timing import measure, print_ratios

    rows = [("loop", measure(slow)), ("vectorized", measure(fast))]
    print_ratios(rows, baseline="loop")

Running ``python benchmarks/timing/bench_x.py`` puts this folder on ``sys.path``, so the import
needs no package.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

__all__ = ["Timing", "measure", "print_ratios"]

_UNITS = {"s": 1.0, "ms": 1e3, "us": 1e6}


class Timing(NamedTuple):
    """Seconds per call of one timed function.

    Attributes
    ----------
    median : float
        Median over the measurements, seconds per call.
    best : float
        Fastest measurement, seconds per call.
    values : tuple of float
        Every measurement, seconds per call, in the order taken.
    """

    median: float
    best: float
    values: tuple[float, ...]


def measure(
    fn: Callable[[], object], *, repeat: int = 5, warmup: int = 1, number: int = 1
) -> Timing:
    """Time ``fn()`` with :func:`time.perf_counter`.

    ``fn`` is first called ``warmup`` times untimed (imports, caches, compilation); then each of
    ``repeat`` measurements times ``number`` consecutive calls and divides by ``number``.

    Parameters
    ----------
    fn : callable
        Called with no arguments; its return value is discarded.
    repeat : int, default 5
        Number of measurements, at least 1.
    warmup : int, default 1
        Untimed calls before the first measurement, at least 0.
    number : int, default 1
        Calls per measurement, at least 1 (raise it for calls shorter than a millisecond).

    Returns
    -------
    Timing
        Median, best and all measurements, in seconds per call.
    """
    if not callable(fn):
        raise TypeError(f"expected a callable fn, got {type(fn).__name__}")
    if repeat < 1:
        raise ValueError(f"expected repeat >= 1, got {repeat}")
    if warmup < 0:
        raise ValueError(f"expected warmup >= 0, got {warmup}")
    if number < 1:
        raise ValueError(f"expected number >= 1, got {number}")
    for _ in range(warmup):
        fn()
    values = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        values.append((time.perf_counter() - start) / number)
    return Timing(median=statistics.median(values), best=min(values), values=tuple(values))


def print_ratios(rows: Sequence[tuple[str, Timing]], *, baseline: str, unit: str = "ms") -> None:
    """Print each row's median and best time and its speedup over the baseline row.

    The speedup of a row is the baseline's median divided by the row's median: above 1 the row
    is faster than the baseline, below 1 slower. A header line states this before the rows.

    Parameters
    ----------
    rows : sequence of (str, Timing)
        Name and timing of each variant, printed in this order.
    baseline : str
        Name of the row the others are compared to; it must be one of ``rows``.
    unit : {"ms", "s", "us"}, default "ms"
        Unit of the printed times.
    """
    if unit not in _UNITS:
        raise ValueError(f"expected unit in {sorted(_UNITS)}, got {unit!r}")
    timings = dict(rows)
    if baseline not in timings:
        raise ValueError(f"expected baseline among the row names {list(timings)}, got {baseline!r}")
    reference = timings[baseline].median
    scale = _UNITS[unit]
    width = max(len(name) for name, _ in rows)
    print(f"speedup = median of {baseline!r} / median of the row (> 1: faster than {baseline!r})")
    for name, timing in rows:
        speedup = reference / timing.median if timing.median > 0 else float("inf")
        note = "  (baseline)" if name == baseline else ""
        print(
            f"{name:<{width}}  median {timing.median * scale:10.3f} {unit}"
            f"  best {timing.best * scale:10.3f} {unit}  speedup {speedup:6.2f}{note}"
        )
