"""The timing helper every script in ``benchmarks/timing`` shares: measure a call, print ratios.

A script times each variant with :func:`measure` and prints them with :func:`print_ratios`
against the variant it is compared to::

    from _timing import measure, print_ratios

    rows = [("loop", measure(slow)), ("vectorized", measure(fast))]
    print_ratios(rows, baseline="loop")

:func:`measure_interleaved` times several variants in alternating blocks instead, so that a slow
drift of the machine's load (other processes on a shared machine) reaches all of them alike;
:meth:`Timing.from_values` pools measurements taken some other way.

Running ``python benchmarks/timing/bench_x.py`` puts this folder on ``sys.path``, so the import
needs no package.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

__all__ = ["Timing", "measure", "measure_interleaved", "print_ratios"]

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

    @classmethod
    def from_values(cls, values: Iterable[float]) -> Timing:
        """The timing of measurements (seconds per call) taken elsewhere; at least one."""
        values = tuple(float(v) for v in values)
        if not values:
            raise ValueError("expected at least one measurement, got none")
        return cls(median=statistics.median(values), best=min(values), values=values)


def _check(repeat: int, warmup: int, number: int) -> None:
    if repeat < 1:
        raise ValueError(f"expected repeat >= 1, got {repeat}")
    if warmup < 0:
        raise ValueError(f"expected warmup >= 0, got {warmup}")
    if number < 1:
        raise ValueError(f"expected number >= 1, got {number}")


def measure(
    fn: Callable[[], object],
    *,
    repeat: int = 5,
    warmup: int = 1,
    number: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> Timing:
    """Time ``fn()`` with :func:`time.perf_counter` (or ``clock``).

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
    clock : callable, default :func:`time.perf_counter`
        Seconds as a float; :func:`time.process_time` measures this process's CPU time, which
        other processes on a shared machine disturb less (for single-threaded code).

    Returns
    -------
    Timing
        Median, best and all measurements, in seconds per call.
    """
    rows = measure_interleaved({"fn": fn}, repeat=repeat, warmup=warmup, number=number, clock=clock)
    return rows[0][1]


def measure_interleaved(
    fns: Mapping[str, Callable[[], object]],
    *,
    repeat: int = 5,
    warmup: int = 1,
    number: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> list[tuple[str, Timing]]:
    """Time several functions in alternating blocks: the rows :func:`print_ratios` takes.

    Each function is first called ``warmup`` times; then, ``repeat`` times over, each function in
    turn is measured over ``number`` consecutive calls. A drift of the machine's load between
    the first and the last block reaches every function alike.

    Parameters
    ----------
    fns : mapping of str to callable
        Name and function of each variant, called with no arguments.
    repeat, warmup, number, clock
        As for :func:`measure`.

    Returns
    -------
    list of (str, Timing)
        One row per function, in the order of ``fns``.
    """
    for name, fn in fns.items():
        if not callable(fn):
            raise TypeError(f"expected a callable for {name!r}, got {type(fn).__name__}")
    _check(repeat, warmup, number)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    values: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = clock()
            for _ in range(number):
                fn()
            values[name].append((clock() - start) / number)
    return [(name, Timing.from_values(v)) for name, v in values.items()]


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
        speedup = reference / timing.median if timing.median > 0 else math.inf
        note = "  (baseline)" if name == baseline else ""
        print(
            f"{name:<{width}}  median {timing.median * scale:10.3f} {unit}"
            f"  best {timing.best * scale:10.3f} {unit}  speedup {_ratio(speedup):>7}{note}"
        )


def _ratio(value: float) -> str:
    """Two decimals in the usual range, three significant digits outside it."""
    return f"{value:.2f}" if 0.01 <= value < 1000 else f"{value:.3g}"
