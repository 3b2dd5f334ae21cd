"""Argument checks shared by every module: a bad value is refused with its name in the message.

A check returns the value converted to a plain Python ``int`` or ``float`` so that callers store
one type whatever the user passed (a NumPy scalar, a 0-d array).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

__all__ = ["check_float", "check_int", "check_positive"]


def check_int(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` as an ``int`` ``>= minimum``; booleans and non-integers are refused."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"expected {name} >= {minimum} (an int), got {value!r}")
    return int(value)


def check_float(value: Any, name: str, *, minimum: float, strict: bool) -> float:
    """``value`` as a finite ``float`` above ``minimum`` (``> minimum`` when ``strict``)."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and (value > minimum if strict else value >= minimum)
    if not ok:
        relation = ">" if strict else ">="
        raise ValueError(f"expected {name} {relation} {minimum} (a finite number), got {value!r}")
    return float(value)


def check_positive(value: Any, name: str) -> float:
    """``value`` as a finite ``float > 0``."""
    return check_float(value, name, minimum=0.0, strict=True)
