"""``benchmarks/studies/deep_prior_calibration.py`` runs end to end, shards and merges."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pyro_dlatent import data
from pyro_dlatent.models import AuxVAE
from tests.conftest import run_script

__all__: list[str] = []

SCRIPT = "studies/deep_prior_calibration.py"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    train = data.simulate("sources", 64, size=32, seed=0)
    vae = AuxVAE.from_dataset(train, residual_dim=2, width=8, hidden=32, seed=0)
    vae.fit(train, epochs=1, seed=0, progress=False)
    return vae.save(tmp_path_factory.mktemp("model") / "vae.pt")


def test_a_sharded_study_merges_into_the_whole(model_path, tmp_path) -> None:
    common = ["--model", str(model_path), "--train-num", "64", "--num-samples", "100"]
    run_script(SCRIPT, *common, "--count", "2", "--out", str(tmp_path / "whole.json"))
    whole = json.loads((tmp_path / "whole.json").read_text())["summary"]
    for start in (0, 1):
        out = str(tmp_path / f"part{start}.json")
        run_script(SCRIPT, *common, "--start", str(start), "--count", "1", "--out", out)
    parts = [str(tmp_path / f"part{start}.json") for start in (0, 1)]
    run_script(SCRIPT, "--model", "unused", "--merge", *parts, "--out", str(tmp_path / "m.json"))
    merged = json.loads((tmp_path / "m.json").read_text())["summary"]
    for key in ("collapsed", "exact", "field"):
        assert json.dumps(merged[key], sort_keys=True) == json.dumps(whole[key], sort_keys=True)
    records = json.loads((tmp_path / "whole.json").read_text())["records"]
    assert [r["index"] for r in records] == [0, 1]
    for entry in whole["collapsed"].values():
        assert 0.0 <= entry["coverage_90"] <= 1.0 and entry["median_width_90"] > 0
    assert 0.0 < whole["field"]["pixel_coverage_90"] <= 1.0
    assert np.isfinite(whole["field"]["median_error_grf"])
