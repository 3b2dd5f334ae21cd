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


def test_a_study_on_two_dask_workers_records_what_the_serial_run_records(model_path, tmp_path):
    # the context (model, residual field, GRF) is built once by the script and sent to the
    # workers; the records are the serial run's, timings aside
    common = ["--model", str(model_path), "--train-num", "64", "--num-samples", "100"]
    common += ["--count", "2"]
    run_script(SCRIPT, *common, "--records", str(tmp_path / "a"), "--scheduler", "serial")
    run_script(SCRIPT, *common, "--records", str(tmp_path / "b"), "--workers", "2")
    for index in (0, 1):
        a, b = (
            json.loads((tmp_path / d / "records" / f"{index:06d}.json").read_text()) for d in "ab"
        )
        assert {k: v for k, v in a.items() if k != "seconds"} == {
            k: v for k, v in b.items() if k != "seconds"
        }
