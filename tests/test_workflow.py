"""The main job end to end (fast mode), and the CLI verbs on its run folder."""

from __future__ import annotations

import json

import arviz as az
import numpy as np
import pytest
import xarray as xr

from pyro_dlatent.checkpoint import load_checkpoint
from pyro_dlatent.cli import main
from pyro_dlatent.export import load_netcdf
from pyro_dlatent.inverse.run import load_observations


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out), "--fast", "--no-progress"]) == 0
    return out


def test_demo_leaves_data_model_report_and_posterior(demo_dir):
    summary = json.loads((demo_dir / "summary.json").read_text())
    assert set(summary["datasets"]) == {"sources", "halos", "galaxies"}
    for name in summary["datasets"]:
        assert (demo_dir / "data" / f"{name}.nc").is_file()
        assert (demo_dir / "data" / f"{name}_preview.png").is_file()
    run = demo_dir / "auxvae"
    names = ("model.pt", "history.json", "report.json", "traversal.png", "scatter.png")
    for name in (*names, "calibration.png"):
        assert (run / name).is_file(), name
    report = json.loads((run / "report.json").read_text())
    assert report["n"] == summary["auxvae"]["held_out_images"]
    for entry in report["variables"].values():  # calibrated on the fit's validation part
        assert entry["calibration"]["calibrated"] and entry["calibration"]["n"] == report["n"]
    inversion = demo_dir / "inversion"
    idata = load_netcdf(inversion / "posterior.nc")
    assert list(idata.posterior["u"].coords["aux"].values) == ["x0", "y0", "log_amplitude", "width"]
    table = az.summary(idata, var_names=["u"], kind="stats")
    assert table.shape[0] == 4 and np.isfinite(table["mean"].to_numpy()).all()
    assert idata.field_summary["field_mean"].shape == (32, 32)
    # The reported error is the whole field's, ||mean - truth|| / ||truth||.
    mean = np.asarray(idata.field_summary["field_mean"])
    truth = load_observations(inversion / "observations.nc").truth_field
    expected = np.linalg.norm(mean - truth) / np.linalg.norm(truth)
    assert summary["inversion"]["relative_l2_error"] == pytest.approx(expected, rel=1e-9)
    for name in ("fields.png", "observed_vs_predicted.png", "marginals.png"):
        assert (inversion / name).stat().st_size > 2000
    # the exact posterior beside it (the simulator is known): the truth inside its 90% intervals
    exact = json.loads((inversion / "summary.json").read_text())["exact"]
    truth_aux = load_observations(inversion / "observations.nc").truth_aux
    for name, (low, high) in exact["u_interval_90"].items():
        assert low < truth_aux[name] < high, name
    assert exact["relative_l2_error"] == pytest.approx(0.136, abs=0.01)


def test_cli_traverse_encode_invert(demo_dir, tmp_path, capsys):
    run = demo_dir / "auxvae"
    data_file = demo_dir / "data" / "sources.nc"
    assert (
        main(["traverse", str(run), "--out", str(tmp_path / "t.png"), "--data", str(data_file)])
        == 0
    )
    assert (tmp_path / "t.png").stat().st_size > 2000
    assert main(["encode", str(run), str(data_file), "--out", str(tmp_path / "enc.nc")]) == 0
    encoded = xr.load_dataset(tmp_path / "enc.nc", engine="h5netcdf")
    assert encoded["z_aux"].shape == (64, 4) and "x0_sd" in encoded
    assert (encoded["x0_sd"] > 0).all()
    assert encoded.attrs["calibrated"].split() == ["x0", "y0", "log_amplitude", "width"]
    assert "90% interval" in encoded.attrs["uncertainty"]
    assert encoded["x0_q05"].attrs["long_name"] == "predictive 0.05 quantile"
    assert (encoded["x0_q05"] < encoded["x0_q95"]).all()
    observations = demo_dir / "inversion" / "observations.nc"
    assert load_observations(observations).values.shape == (25,)
    args = ["invert", str(run), "--out", str(tmp_path / "inv"), "--observations", str(observations)]
    assert main([*args, "--method", "map", "--steps", "50", "--no-progress"]) == 0
    assert (tmp_path / "inv" / "posterior.nc").is_file()
    # the folder holds the observations of its posterior (an earlier run's would not match)
    written = load_observations(tmp_path / "inv" / "observations.nc")
    np.testing.assert_array_equal(written.values, load_observations(observations).values)
    assert main([*args, "--method", "map"]) == 2  # the posterior there is kept
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--method", "bogus", "--overwrite"]) == 2
    assert main([*args, "--sampler", "bogus", "--overwrite"]) == 2
    # the default: the collapsed deep prior, with 90% intervals in the summary
    assert main([*args, "--overwrite", "--num-samples", "200", "--no-progress"]) == 0
    summary = json.loads((tmp_path / "inv" / "summary.json").read_text())
    assert summary["method"] == "collapsed" and summary["health"]["pareto_k"] < 0.7
    low, high = summary["u_interval_90"]["width"]
    assert low < summary["u_mean"]["width"] < high
    assert main(["invert", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 1
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:ema_decay=.* leaves:UserWarning")  # a short test fit
def test_cli_dlcfm_train_sample_tails_anomalies(tmp_path, capsys):
    run = tmp_path / "dlcfm"
    train = ["train", "halos", "--model", "dlcfm", "--out", str(run), "--num", "96"]
    small = ["--size", "16", "--epochs", "1", "--batch-size", "32", "--no-progress"]
    assert main([*train, *small, "--ema-decay", "0.9"]) == 0
    for name in ("model.pt", "report.json", "traversal.png", "scatter.png"):
        assert (run / name).is_file(), name
    average = load_checkpoint(run / "checkpoints" / "last.pt").state["average"]
    assert average["decay"] == 0.9 and average["applied"] is True
    bad = ["train", "halos", "--model", "dlcfm", "--out", str(tmp_path / "bad"), "--num", "96"]
    assert main([*bad, *small, "--ema-decay", "1.5"]) == 1
    # a generator of halo maps cannot invert a source problem: the error names both lists
    assert main(["invert", str(run), "--out", str(tmp_path / "inv"), "--method", "map"]) == 1
    err = capsys.readouterr().err
    assert "['log10_M500', 'concentration']" in err and "x0" in err
    assert not (tmp_path / "inv").exists()  # the failed command left no folder behind
    aux = ["--aux", "log10_M500=14.0", "--aux", "log10_M500=15.0", "--aux", "concentration=3"]
    assert main(["sample", str(run), "--out", str(tmp_path / "s.nc"), *aux, "--num", "2"]) == 0
    images = xr.load_dataset(tmp_path / "s.nc", engine="h5netcdf")["image"]
    assert images.shape == (4, 16, 16) and np.isfinite(images.values).all()
    # the same seed with the weights the optimizer left instead of their average
    live = ["sample", str(run), "--out", str(tmp_path / "live.nc"), *aux, "--num", "2"]
    assert main([*live, "--weights", "live"]) == 0
    live_images = xr.load_dataset(tmp_path / "live.nc", engine="h5netcdf")["image"]
    assert np.abs(live_images.values - images.values).max() > 1e-3
    assert main([*live, "--weights", "averaged"]) == 2  # nothing saved is replaced unasked
    assert "--overwrite" in capsys.readouterr().err
    assert main([*live, "--weights", "averaged", "--overwrite"]) == 0
    again = xr.load_dataset(tmp_path / "live.nc", engine="h5netcdf")["image"]
    assert np.array_equal(again.values, images.values)
    assert main([*live, "--weights", "best", "--overwrite"]) == 1
    assert "weights must be" in capsys.readouterr().err
    tail_args = ["--aux", "log10_M500=14.5", "--aux", "concentration=3", "--num", "4"]
    assert main(["tails", str(run), "--out", str(tmp_path / "t.png"), *tail_args]) == 0
    assert (tmp_path / "t.png").stat().st_size > 2000
    assert main(["anomalies", str(run), "halos", "--out", str(tmp_path / "anom")]) == 0
    table = xr.load_dataset(tmp_path / "anom" / "anomalies.nc", engine="h5netcdf")
    assert "disturbed" in table and (np.diff(table["score"].values) <= 0).all()
    by = ["anomalies", str(run), "halos", "--out", str(tmp_path / "by"), "--by", "log10_M500"]
    assert main(by) == 0
    conditional = xr.load_dataset(tmp_path / "by" / "anomalies.nc", engine="h5netcdf")
    assert conditional.sizes["rank"] == table.sizes["rank"]
    assert not np.allclose(np.sort(conditional["score"].values), np.sort(table["score"].values))
    assert main(by) == 2  # the table there is kept
    assert main([*by[:-1], "mass", "--overwrite"]) == 2
    views = [
        "anomalies",
        str(run),
        "halos",
        "--out",
        str(tmp_path / "views"),
        "--views",
        "dihedral",
    ]
    assert main([*views, "--by", "log10_M500"]) == 0
    averaged = xr.load_dataset(tmp_path / "views" / "anomalies.nc", engine="h5netcdf")
    assert averaged.sizes["rank"] == table.sizes["rank"]
    assert (np.diff(averaged["score"].values) <= 0).all()
    assert averaged.attrs["views"] == "dihedral" and averaged.attrs["by"] == "log10_M500"
    assert not np.allclose(np.sort(averaged["score"].values), np.sort(conditional["score"].values))
    assert main([*views[:-1], "rotations", "--overwrite"]) == 2
    assert main(["sample", str(run), "--out", str(tmp_path / "x.png"), "--aux", "mass"]) == 2
