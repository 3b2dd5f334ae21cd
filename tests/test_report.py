"""Alignment report: keys, JSON round trip, agreement with the metrics called directly."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pyro_dlatent import metrics
from pyro_dlatent.data import simulate
from pyro_dlatent.models.auxvae import AuxVAE
from pyro_dlatent.report import alignment_report, save_report

SIZE = 16
SMALL = {"width": 8, "hidden": 32, "seed": 0}
NAMES = ["x0", "y0", "log_amplitude", "width"]


@pytest.fixture(scope="module")
def data():
    return simulate("sources", 320, size=SIZE, seed=3)


@pytest.fixture(scope="module")
def held_out():
    return simulate("sources", 200, size=SIZE, seed=4)


@pytest.fixture(scope="module")
def model(data):
    vae = AuxVAE.from_dataset(data, residual_dim=2, **SMALL)
    vae.fit(data, epochs=4, batch_size=64, progress=False)
    return vae


@pytest.fixture(scope="module")
def report(model, held_out):
    return alignment_report(model, held_out)


def _standardized(model, ds):
    physical = np.stack([ds[name].values for name in model.aux_names], -1)
    return model.scaler.transform(physical)


def _latents(model, ds):
    encoding = model.encode(ds)
    return (
        encoding.z_aux_loc.double().numpy(),
        encoding.z_aux_scale.double().numpy(),
        encoding.z_rec_loc.double().numpy(),
    )


def test_report_has_every_section_with_sane_values(report, model):
    assert report["n"] == report["n_complete"] == 200
    assert report["tau"] == pytest.approx(model.tau)
    assert report["degree"] == model.degree == 2
    assert report["model"]["class"] == "AuxVAE"
    assert report["model"]["aux_names"] == NAMES
    assert report["model"]["residual_dim"] == 2
    assert report["model"]["config"] == model.config
    assert report["model"]["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert list(report["variables"]) == NAMES
    for entry in report["variables"].values():
        assert entry["n_observed"] == 200
        assert entry["units"] == "" and entry["transform"] == "identity"
        assert -1.0 <= entry["pearson_r"] <= 1.0
        assert entry["r2_linear"] == pytest.approx(entry["pearson_r"] ** 2)
        # A polynomial read-out contains the linear one; canonical correlation >= |Pearson r|.
        assert entry["r2_poly"] >= entry["r2_linear"] - 1e-12
        assert entry["poly_corr"] >= abs(entry["pearson_r"]) - 1e-12
        assert entry["rmse_standardized"] > 0 and entry["guide_rms_z_score"] > 0
        assert entry["guide_mean_sd"] > 0
        calibration = entry["calibration"]
        assert calibration["calibrated"] and calibration["n"] == 200
        assert set(calibration["coverage"]) == {"0.5", "0.8", "0.9", "0.95"}
        coverages = list(calibration["coverage"].values())
        assert coverages == sorted(coverages) and 0.0 <= coverages[0] <= coverages[-1] <= 1.0
        assert calibration["rms_z_score"] > 0 and calibration["mean_sd"] > 0
    assert report["min_pearson_r"] <= report["mean_pearson_r"]
    assert len(report["cross_correlation"]["matrix"]) == 4
    leak = report["leakage"]
    assert 0.0 <= leak["mean"] <= leak["max"] <= 1.0
    assert leak["max"] == pytest.approx(max(leak["max_by_auxiliary"].values()))
    assert leak["max"] == pytest.approx(max(leak["max_by_residual"]))
    assert leak["argmax"]["auxiliary"] in NAMES and leak["argmax"]["residual"] in (0, 1)
    for key in ("mcc", "mig", "sap"):
        assert 0.0 <= report[key] <= 1.0
    assert set(report["dci"]) == {"disentanglement", "completeness", "informativeness"}
    assert len(report["residual"]["activity"]) == len(report["residual"]["mean_posterior_sd"]) == 2
    assert set(report["reconstruction"]) == {"mse", "mse_standardized", "mse_over_variance"}
    # Even four epochs on 320 images track the bump: r well above chance (1/sqrt(200) = 0.07).
    assert report["variables"]["x0"]["pearson_r"] > 0.5


def test_report_agrees_with_metrics_called_directly(report, model, held_out):
    u = _standardized(model, held_out)
    z_aux, z_scale, z_rec = _latents(model, held_out)
    direct = metrics.alignment(z_aux, u, 2, names=NAMES)
    for j, name in enumerate(NAMES):
        entry = report["variables"][name]
        assert entry["pearson_r"] == pytest.approx(direct.pearson_r[j], abs=1e-12)
        assert entry["r2_poly"] == pytest.approx(direct.r2_poly[j], abs=1e-12)
        assert entry["poly_corr"] == pytest.approx(direct.poly_corr[j], abs=1e-12)
        error = z_aux[:, j] - u[:, j]
        assert entry["rmse_standardized"] == pytest.approx(np.sqrt(np.mean(error**2)))
        z_score = np.sqrt(np.mean((error / z_scale[:, j]) ** 2))
        assert entry["guide_rms_z_score"] == pytest.approx(z_score)
        predicted = model.predict_aux(held_out, quantiles=(0.05, 0.95))
        truth = held_out[name].values
        inside = (predicted[f"{name}_q05"] <= truth) & (truth <= predicted[f"{name}_q95"])
        assert entry["calibration"]["coverage"]["0.9"] == pytest.approx(float(inside.mean()))
    np.testing.assert_allclose(report["cross_correlation"]["matrix"], direct.cross_correlation)
    np.testing.assert_allclose(report["residual"]["activity"], z_rec.var(axis=0))
    assert report["cross_correlation"]["max_off_diagonal"] == pytest.approx(direct.max_off_diagonal)
    leak = metrics.leakage(z_rec, u, 2, names=NAMES)
    assert report["leakage"]["max"] == pytest.approx(leak.max_abs_corr)
    assert report["leakage"]["mean"] == pytest.approx(leak.mean_abs_corr)
    row, column = np.unravel_index(np.argmax(leak.matrix), leak.matrix.shape)
    assert report["leakage"]["argmax"]["label"] == (
        f"{leak.row_labels[row]} ~ {leak.column_labels[column]}"
    )
    latents = np.concatenate([z_aux, z_rec], axis=1)
    assert report["mcc"] == pytest.approx(metrics.mcc(latents, u))
    assert report["mig"] == pytest.approx(metrics.mig(latents, u, 20))
    assert report["sap"] == pytest.approx(metrics.sap(latents, u))
    dci = metrics.dci(latents, u, seed=0)
    assert report["dci"]["disentanglement"] == pytest.approx(dci.disentanglement)
    assert report["dci"]["completeness"] == pytest.approx(dci.completeness)
    assert report["dci"]["informativeness"] == pytest.approx(dci.informativeness)
    images = torch.as_tensor(held_out["image"].values)
    rebuilt = model.reconstruct(images)
    mse = (rebuilt - images).double().pow(2).mean().item()
    assert report["reconstruction"]["mse"] == pytest.approx(mse, rel=1e-5)
    assert report["reconstruction"]["mse_standardized"] == pytest.approx(
        mse / model.image_scale.item() ** 2, rel=1e-4
    )
    spread = (images - images.mean(0)).double().pow(2).mean().item()
    assert report["reconstruction"]["mse_over_variance"] == pytest.approx(mse / spread, rel=1e-5)


def test_report_uses_observed_entries_per_variable(model, held_out):
    ds = held_out.copy(deep=True)
    rng = np.random.default_rng(0)
    hidden = {name: rng.random(200) < 0.3 for name in NAMES}
    for name, rows in hidden.items():
        ds[name].values[rows] = np.nan
    report = alignment_report(model, ds)
    u = _standardized(model, held_out)
    z_aux, _, z_rec = _latents(model, held_out)
    for j, name in enumerate(NAMES):
        keep = ~hidden[name]
        assert report["variables"][name]["n_observed"] == keep.sum()
        expected = np.corrcoef(z_aux[keep, j], u[keep, j])[0, 1]
        assert report["variables"][name]["pearson_r"] == pytest.approx(expected, abs=1e-10)
    complete = ~np.any(np.stack(list(hidden.values())), axis=0)
    assert report["n_complete"] == complete.sum()
    latents = np.concatenate([z_aux, z_rec], axis=1)[complete]
    assert report["mcc"] == pytest.approx(metrics.mcc(latents, u[complete]))
    assert report["leakage"]["max"] == pytest.approx(
        metrics.leakage(z_rec[complete], u[complete], 2).max_abs_corr
    )
    # Too few observed rows: the metric is None rather than NaN, and the report stays valid JSON.
    ds["width"].values[3:] = np.nan
    sparse = alignment_report(model, ds)
    assert sparse["variables"]["width"]["pearson_r"] is None
    assert sparse["mcc"] is None and sparse["leakage"] is None
    json.dumps(sparse, allow_nan=False)


class _WithoutReconstruct:
    """A model proxy that hides ``reconstruct`` (as a model that cannot reconstruct would)."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        if name == "reconstruct":
            raise AttributeError(name)
        return getattr(self._model, name)


def test_report_without_reconstruction_or_residual_block(data, held_out):
    vae = AuxVAE.from_dataset(data, residual_dim=0, **SMALL)
    vae.fit(data, epochs=1, batch_size=64, progress=False, val_fraction=0.0)
    report = alignment_report(vae, held_out)
    assert report["leakage"] is None
    assert report["reconstruction"]["mse"] > 0
    hidden = alignment_report(_WithoutReconstruct(vae), held_out)
    assert hidden["reconstruction"] is None
    assert hidden["variables"] == report["variables"]


def test_save_report_round_trip_is_atomic(report, tmp_path):
    path = save_report(report, tmp_path / "runs" / "report.json")
    assert json.loads(path.read_text()) == report
    save_report({"n": 1}, path)
    assert json.loads(path.read_text()) == {"n": 1}
    with pytest.raises(ValueError, match="finite"):
        save_report({"n": math.nan}, path)
    assert json.loads(path.read_text()) == {"n": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.json"]


def test_bad_inputs_raise(model, held_out):
    with pytest.raises(ValueError, match="lacks the model's auxiliaries"):
        alignment_report(model, held_out.drop_vars("width").assign_attrs(aux_names=NAMES[:3]))
    with pytest.raises(ValueError, match="batch_size"):
        alignment_report(model, held_out, batch_size=0)
    with pytest.raises(ValueError, match="degree"):
        alignment_report(model, held_out, degree=0)
    with pytest.raises(ValueError, match="num_bins"):
        alignment_report(model, held_out, num_bins=1)
    with pytest.raises(ValueError, match="shape"):
        alignment_report(model, simulate("sources", 8, size=32, seed=0))
