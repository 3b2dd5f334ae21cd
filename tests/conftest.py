"""Test configuration: a clean Pyro state, a fixed seed and validation before each test."""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _clean_pyro_state():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    torch.set_default_dtype(torch.float32)
    yield
    pyro.clear_param_store()


def assert_close(actual, expected, *, atol: float = 1e-6, rtol: float = 1e-6) -> None:
    """Compare nested tensors, arrays, dicts and sequences element by element."""
    if isinstance(expected, dict):
        assert set(actual) == set(expected), (set(actual), set(expected))
        for key in expected:
            assert_close(actual[key], expected[key], atol=atol, rtol=rtol)
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            assert_close(a, e, atol=atol, rtol=rtol)
    else:
        torch.testing.assert_close(
            torch.as_tensor(actual, dtype=torch.float64),
            torch.as_tensor(expected, dtype=torch.float64),
            atol=atol,
            rtol=rtol,
        )


def run_script(path: str, *argv: str) -> None:
    """Run ``benchmarks/<path>`` in this process as ``python benchmarks/<path> *argv`` would.

    The script runs as ``__main__`` with its own folder first on ``sys.path`` (where the timing
    scripts find ``_timing``); a script that exits raises ``SystemExit`` here.
    """
    script = Path(__file__).resolve().parents[1] / "benchmarks" / path
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(script), *argv]
    sys.path.insert(0, str(script.parent))
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path
