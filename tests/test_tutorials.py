"""The tutorials run end to end in their fast mode."""

from __future__ import annotations

import json
import os
import runpy
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).parent.parent / "tutorials").glob("[0-9][0-9]_*.py"))
SLOW = {"02_dl_cfm", "03_deep_prior"}  # over a minute each on 2 cores, even in fast mode
PARAMS = [pytest.param(p, marks=[pytest.mark.slow] if p.stem in SLOW else []) for p in TUTORIALS]


@pytest.mark.parametrize("path", PARAMS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs_in_fast_mode(path, tmp_path, monkeypatch):
    monkeypatch.setenv("PYRO_DLATENT_FAST", "1")
    monkeypatch.setenv("PYRO_DLATENT_OUT", str(tmp_path / "out"))
    monkeypatch.chdir(tmp_path)
    namespace = runpy.run_path(str(path), run_name="__main__")
    out = tmp_path / "out"
    figures = list(out.glob("*.png"))
    assert figures, "a tutorial leaves figures"
    assert all(f.stat().st_size > 2000 for f in figures)
    for report in out.glob("*.json"):
        json.loads(report.read_text())
    assert os.environ["PYRO_DLATENT_FAST"] == "1" and namespace["FAST"]
