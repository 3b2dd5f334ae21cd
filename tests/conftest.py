"""Test configuration: a clean Pyro state, a fixed seed and validation before each test."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

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


def load_benchmark(name: str) -> ModuleType:
    """The script ``benchmarks/<name>.py`` as a module (loaded once per test session)."""
    key = f"_benchmark_{name}"
    if key not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(key, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module  # before running it, so its dataclasses can find it
        spec.loader.exec_module(module)
    return sys.modules[key]
