"""Array checks and column statistics shared by the metrics: conversion, scaling, correlation."""

from __future__ import annotations

from typing import Any

import numpy as np

_CONSTANT_SPREAD = 1e-12
"""A column whose range, relative to its largest magnitude, is below this is treated as constant."""


def _to_numpy(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a numeric array, got {type(x).__name__}") from err
    if not np.isfinite(arr).all():
        raise ValueError(f"expected finite values in {name}, got NaN or infinite entries")
    return arr


def _as_columns(x: Any, name: str, min_rows: int = 2) -> np.ndarray:
    """Return ``x`` as a finite float64 array of shape ``(n, columns)``."""
    arr = _to_numpy(x, name)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"expected {name} of shape (n, columns), got shape {arr.shape}")
    if arr.shape[0] < min_rows:
        raise ValueError(f"expected at least {min_rows} rows in {name}, got {arr.shape[0]}")
    if arr.shape[1] < 1:
        raise ValueError(f"expected at least one column in {name}, got shape {arr.shape}")
    return arr


def _check_same_rows(**arrays: np.ndarray) -> None:
    rows = {name: a.shape[0] for name, a in arrays.items()}
    if len(set(rows.values())) != 1:
        raise ValueError(f"expected the same number of rows (samples), got {rows}")


def _check_degree(degree: int) -> int:
    if isinstance(degree, bool) or int(degree) != degree or degree < 1:
        raise ValueError(f"expected degree >= 1 (an integer), got {degree}")
    return int(degree)


def _constant_columns(x: np.ndarray) -> np.ndarray:
    """Boolean mask ``(columns,)`` of columns that are constant up to rounding."""
    scale = np.max(np.abs(x), axis=0)
    safe = np.where(scale > 0, scale, 1.0)
    spread = np.ptp(x / safe, axis=0)
    return spread <= _CONSTANT_SPREAD


def _standardize(x: np.ndarray) -> np.ndarray:
    """Center and scale each column to unit (population) variance; constant columns become 0.

    Columns are first divided by their largest magnitude so that any finite input, however
    large or small, is standardized without overflow.
    """
    constant = _constant_columns(x)
    scale = np.max(np.abs(x), axis=0)
    y = x / np.where(scale > 0, scale, 1.0)
    y = y - y.mean(axis=0)
    std = y.std(axis=0)
    ok = ~constant & (std > 0)
    out = np.zeros_like(y)
    out[:, ok] = y[:, ok] / std[ok]
    return out


def _correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation matrix ``(a.shape[1], b.shape[1])``; 0 for constant columns."""
    corr = _standardize(a).T @ _standardize(b) / a.shape[0]
    return np.clip(corr, -1.0, 1.0)
