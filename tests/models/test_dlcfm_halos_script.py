"""``benchmarks/studies/dlcfm_halos.py`` end to end on tiny runs, with and without a time budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_script

TINY = ["--num", "80", "--size", "16", "--width", "4", "--hidden", "16", "--field-channels", "4"]
TINY += ["--residual-dim", "2", "--batch-size", "32"]


def halos(*argv: str) -> dict:
    """Run the script with ``argv``; the results it wrote (``--output``, else in ``--run-dir``)."""
    run_script("studies/dlcfm_halos.py", *argv)
    if "--output" in argv:
        return json.loads(Path(argv[argv.index("--output") + 1]).read_text())
    name = "results_evaluated.json" if "--evaluate-only" in argv else "results.json"
    return json.loads((Path(argv[argv.index("--run-dir") + 1]) / name).read_text())


def test_tiny_run_writes_every_metric(tmp_path):
    out = str(tmp_path / "halos.json")
    result = halos(*TINY, "--epochs", "2", "--run-dir", str(tmp_path / "run"), "--output", out)
    assert result["epochs_run"] == {"dlcfm": 2, "auxvae": 2}
    assert (result["num_train"], result["num_held_out"]) == (64, 16)
    for name in ("dlcfm", "auxvae"):
        scores = result["models"][name]
        assert set(scores["pearson_r"]) == {"log10_M500", "concentration"}
        assert 0.0 <= scores["leakage"] <= 1.0
        for key in ("", "_by_mass", "_dihedral", "_by_mass_dihedral"):
            assert 0.0 <= scores[f"anomaly_auroc_disturbed{key}"] <= 1.0, key
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
    result = halos(*argv)
    assert result["epochs_run"] == {"dlcfm": 1}
    argv[argv.index("--no-auxvae")] = "--progress"
    result = halos(*argv)
    assert result["epochs_run"] == {"dlcfm": 1, "auxvae": 3}


def test_evaluate_only_reproduces_the_scores_of_the_run(tmp_path):
    run = tmp_path / "run"
    argv = [*TINY, "--epochs", "1", "--run-dir", str(run)]
    trained = halos(*argv)
    again = halos(*argv, "--evaluate-only")
    assert (run / "results.json").exists() and (run / "results_evaluated.json").exists()
    for name in ("dlcfm", "auxvae"):
        first, second = trained["models"][name], again["models"][name]
        for key in ("pearson_r", "leakage", "power_spectrum_error", "y_m_slope"):
            assert json.dumps(second[key]) == json.dumps(first[key]), key  # NaN == NaN
        assert second["anomaly_auroc_disturbed"] == first["anomaly_auroc_disturbed"]
    # refitting the generation map on the fit's own training part makes the map it saved
    recalibrated = halos(*argv, "--evaluate-only", "--recalibrate")["models"]["dlcfm"]
    for key in ("power_spectrum_error", "pixel_histogram_w1", "y_m_slope"):
        assert json.dumps(recalibrated[key]) == json.dumps(trained["models"]["dlcfm"][key]), key
    with pytest.raises(SystemExit):
        halos(*argv, "--recalibrate")
    # the scores name the checkpoint's architecture, whatever this run's flags say
    assert trained["models"]["dlcfm"]["config"]["field_mean_head"] is True
    plain = [*TINY, "--epochs", "1", "--run-dir", str(tmp_path / "plain"), "--no-field-mean-head"]
    halos(*plain)
    scored = halos(*plain[:-1], "--evaluate-only")
    assert scored["settings"]["field_mean_head"] is True
    assert scored["models"]["dlcfm"]["config"]["field_mean_head"] is False


@pytest.mark.filterwarnings("ignore:ema_decay=.* leaves:UserWarning")  # short test fits
def test_evaluate_only_scores_the_live_weights_of_an_averaged_fit(tmp_path):
    # Averaging leaves the training path as it is: the live weights of an averaged run, with
    # the generation map refitted, score exactly as the same run without averaging.
    plain = halos(*TINY, "--epochs", "2", "--run-dir", str(tmp_path / "plain"))
    run = [*TINY, "--epochs", "2", "--run-dir", str(tmp_path / "avg"), "--ema-decay", "0.5"]
    averaged = halos(*run)
    live = halos(*run, "--evaluate-only", "--weights", "live")
    first, second = plain["models"]["dlcfm"], live["models"]["dlcfm"]
    for key in ("pearson_r", "leakage", "power_spectrum_error", "y_m_slope"):
        assert json.dumps(second[key]) == json.dumps(first[key]), key
    assert averaged["models"]["dlcfm"]["power_spectrum_error"] != first["power_spectrum_error"]
    for key in ("pearson_r", "power_spectrum_error"):  # the Aux-VAE is not averaged
        assert live["models"]["auxvae"][key] == averaged["models"]["auxvae"][key], key
    with pytest.raises(SystemExit, match="averaged weights"):
        halos(*TINY, "--run-dir", str(tmp_path / "plain"), "--evaluate-only", "--weights", "live")
    with pytest.raises(SystemExit):
        halos(*TINY, "--run-dir", str(tmp_path / "plain"), "--weights", "live")


def test_evaluate_only_without_checkpoints_fails_clearly(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoints"):
        halos(*TINY, "--run-dir", str(tmp_path / "empty"), "--evaluate-only")
