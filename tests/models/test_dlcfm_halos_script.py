"""``benchmarks/dlcfm_halos.py`` end to end on a tiny run, with and without a time budget."""

from __future__ import annotations

import json

import pytest

from tests.conftest import load_benchmark

halos = load_benchmark("dlcfm_halos")
TINY = ["--num", "80", "--size", "16", "--width", "4", "--hidden", "16", "--field-channels", "4"]
TINY += ["--residual-dim", "2", "--batch-size", "32"]


def test_tiny_run_writes_every_metric(tmp_path):
    out = tmp_path / "halos.json"
    argv = [*TINY, "--epochs", "2", "--run-dir", str(tmp_path / "run"), "--output", str(out)]
    result = halos.main(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["epochs_run"] == {"dlcfm": 2, "auxvae": 2}
    assert (result["num_train"], result["num_held_out"]) == (64, 16)
    for name in ("dlcfm", "auxvae"):
        scores = result["models"][name]
        assert set(scores["pearson_r"]) == {"log10_M500", "concentration"}
        assert 0.0 <= scores["leakage"] <= 1.0
        assert 0.0 <= scores["anomaly_auroc_disturbed"] <= 1.0
        assert (tmp_path / "run" / "figures" / f"{name}_samples.png").exists()
    assert set(result["fidelity_gain_over_auxvae"]) == {
        "power_spectrum_error",
        "pixel_histogram_w1",
        "radial_profile_error",
    }


def test_time_budget_cuts_the_epochs(tmp_path):
    # A one-epoch probe of even this tiny model takes far more than 0.6 ms, so a budget of
    # 1e-5 minutes leaves the minimum of one epoch, whatever --epochs asks for; the Aux-VAE's
    # own budget of 10 minutes leaves its --epochs cap of 3 untouched.
    argv = [*TINY, "--epochs", "3", "--train-minutes", "1e-5", "--auxvae-minutes", "10"]
    argv += ["--run-dir", str(tmp_path / "run"), "--no-auxvae"]
    result = halos.main(argv)
    assert result["epochs_run"] == {"dlcfm": 1}
    argv[argv.index("--no-auxvae")] = "--progress"
    result = halos.main(argv)
    assert result["epochs_run"] == {"dlcfm": 1, "auxvae": 3}


def test_binned_slope_recovers_a_power_law():
    import numpy as np

    x = np.linspace(13.0, 15.0, 400)
    assert halos.binned_power_law_slope(x, 10.0 ** (1.75 * x - 20.0)) == pytest.approx(
        1.75, abs=1e-2
    )
