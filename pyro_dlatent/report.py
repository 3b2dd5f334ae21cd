"""Alignment report of a trained guided-latent model: how its latent space tracks the auxiliaries.

:func:`alignment_report` encodes a dataset with a trained model (any
:class:`~pyro_dlatent.models.base.GuidedLatentModel`), compares the posterior means of the latent
blocks with the dataset's auxiliaries using the metrics of :mod:`pyro_dlatent.metrics`, measures
the reconstruction error when the model can reconstruct, and returns everything as a
JSON-friendly ``dict`` (Python floats, ints, strings, lists and ``None``; never NaN), which
:func:`save_report` writes atomically. Compute it on held-out data to measure generalization.

Which auxiliary scale
---------------------
Every comparison uses the auxiliaries on the scale the guided block is tethered to: the scaler's
transformed variable (``log10 flux`` for a ``log10`` transform, the physical value otherwise),
standardized with the training mean and sd. Correlations, R² and the lifts are invariant to that
affine standardization, so the numbers are those of the transformed physical variable; RMSEs are
quoted in training sd units.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from pyro_dlatent import metrics
from pyro_dlatent.calibration import (
    COVERAGE_LEVELS,
    calibration_summary,
    interval_bounds,
    interval_probabilities,
)
from pyro_dlatent.data.io import check_dataset
from pyro_dlatent.utils import atomic_write
from pyro_dlatent.validation import check_int

__all__ = ["QUALITY_TARGETS", "alignment_report", "check_quality_targets", "save_report"]

QUALITY_TARGETS: dict[str, dict[str, Any]] = {
    "sources": {
        "pearson_r_min": {"x0": 0.98, "y0": 0.98, "log_amplitude": 0.98, "width": 0.98},
        "leakage_max": 0.1,
        "mse_ratio_max": 1.10,
        "masked_r_drop_max": 0.02,
    },
    "galaxies": {
        "pearson_r_min": {"flux": 0.95, "scale_radius": 0.95, "g1": 0.95, "g2": 0.95},
    },
}
"""The Aux-VAE's quality targets on held-out data of two built-in datasets.

Per dataset: the least Pearson r of each named auxiliary, the largest leakage, the largest
reconstruction MSE over that of the same networks trained as a plain VAE, and the largest drop
of r when half the auxiliary values are missing in training (:func:`check_quality_targets`).
"""

_MIN_ROWS = 4
"""Fewest (observed or complete) rows for which a metric is computed; ``None`` below."""


def _float(value: Any) -> float | None:
    """A Python float, or ``None`` for NaN/inf (JSON has no NaN)."""
    value = float(value)
    return value if math.isfinite(value) else None


def _standardized_aux(model: Any, ds: xr.Dataset) -> np.ndarray:
    """The model's auxiliaries in ``ds``, transformed and standardized, ``(n, k)``, NaN missing."""
    missing = [name for name in model.aux_names if name not in ds]
    if missing:
        raise ValueError(
            f"dataset lacks the model's auxiliaries {missing}; it has {ds.attrs['aux_names']}"
        )
    physical = np.stack([ds[name].values.astype(np.float64) for name in model.aux_names], -1)
    return model.scaler.transform(physical)


def _variable_entries(
    model: Any, z_loc: np.ndarray, z_scale: np.ndarray, u: np.ndarray, degree: int
) -> dict[str, dict[str, Any]]:
    """Per-auxiliary alignment on the rows where that auxiliary is observed."""
    scaler = model.scaler
    entries: dict[str, dict[str, Any]] = {}
    for j, name in enumerate(model.aux_names):
        observed = np.isfinite(u[:, j])
        entry: dict[str, Any] = {
            "units": scaler.units[j],
            "transform": scaler.transforms[j],
            "n_observed": int(observed.sum()),
        }
        keys = ("pearson_r", "r2_linear", "r2_poly", "poly_corr")
        if observed.sum() < _MIN_ROWS:
            entry.update(dict.fromkeys(keys))
            entry.update(rmse_standardized=None, guide_rms_z_score=None, guide_mean_sd=None)
            entries[name] = entry
            continue
        z, s, target = z_loc[observed, j], z_scale[observed, j], u[observed, j]
        result = metrics.alignment(z, target, degree, names=[name]).to_dict()
        entry.update({key: _float(result["variables"][name][key]) for key in keys})
        error = z - target
        entry.update(
            # Error of the posterior mean as an estimator of the standardized auxiliary.
            rmse_standardized=_float(np.sqrt(np.mean(error**2))),
            # The guide's latent sd against the error: not an error bar of the auxiliary (its
            # scale is tau's), kept to show how far from one it is; "calibration" is the one.
            guide_rms_z_score=_float(np.sqrt(np.mean((error / s) ** 2))),
            guide_mean_sd=_float(np.mean(s)),
        )
        entries[name] = entry
    return entries


def _calibration_entries(model: Any, images: Any, ds: xr.Dataset, batch_size: int) -> dict:
    """Coverage and sharpness of :meth:`predict_aux`'s reported uncertainty, per auxiliary."""
    predicted = model.predict_aux(
        images, quantiles=interval_probabilities(COVERAGE_LEVELS), batch_size=batch_size
    )
    entries = {}
    for name in model.aux_names:
        truth = ds[name].values.astype(np.float64)
        intervals = {level: interval_bounds(predicted, name, level) for level in COVERAGE_LEVELS}
        summary = calibration_summary(
            truth, predicted[name].values, predicted[f"{name}_sd"].values, intervals
        )
        entry: dict[str, Any] = {}
        for key, value in summary.items():
            if isinstance(value, dict):
                entry[key] = {str(level): _float(v) for level, v in value.items()}
            else:
                entry[key] = _float(value) if isinstance(value, float) else value
        entry["calibrated"] = name in predicted.attrs["calibrated"]
        entries[name] = entry
    return entries


def _leakage_entry(z_rec: np.ndarray, u: np.ndarray, degree: int, names: list[str]) -> dict:
    result = metrics.leakage(z_rec, u, degree, names=names)
    row, column = np.unravel_index(int(np.argmax(result.matrix)), result.matrix.shape)
    by_pair = result.by_pair
    return {
        "degree": degree,
        "max": _float(result.max_abs_corr),
        "mean": _float(result.mean_abs_corr),
        "argmax": {
            "residual": int(row // degree),
            "residual_power": int(row % degree) + 1,
            "auxiliary": names[column // degree],
            "auxiliary_power": int(column % degree) + 1,
            "label": f"{result.row_labels[row]} ~ {result.column_labels[column]}",
        },
        "max_by_auxiliary": {name: _float(by_pair[:, j].max()) for j, name in enumerate(names)},
        "max_by_residual": [_float(v) for v in by_pair.max(axis=1)],
    }


def _reconstruction_entry(model: Any, images: torch.Tensor, batch_size: int) -> dict[str, Any]:
    """Mean squared reconstruction error at the posterior means, in two unit systems."""
    squared, squared_std, spread = 0.0, 0.0, 0.0
    mean_image = images.double().mean(0)
    with torch.no_grad():
        for chunk in images.split(batch_size):
            rebuilt = model.reconstruct(chunk, batch_size=batch_size).to(chunk.device)
            squared += float((rebuilt.double() - chunk.double()).pow(2).sum())
            difference = model.standardize_images(rebuilt) - model.standardize_images(chunk)
            squared_std += float(difference.double().pow(2).sum())
            spread += float((chunk.double() - mean_image).pow(2).sum())
    count = images.numel()
    return {
        "mse": _float(squared / count),
        "mse_standardized": _float(squared_std / count),
        # 1 - this is the fraction of pixel variance (about the mean image) reconstructed.
        "mse_over_variance": _float(squared / spread) if spread > 0 else None,
    }


def alignment_report(
    model: Any,
    dataset: xr.Dataset,
    *,
    batch_size: int = 256,
    degree: int | None = None,
    num_bins: int = 20,
    seed: int = 0,
) -> dict[str, Any]:
    """Alignment, disentanglement and reconstruction numbers of a trained model on a dataset.

    The dataset is encoded once; with :math:`m_i = E_q[z_{aux}]`, :math:`r_i = E_q[z_{rec}]`
    the posterior means and :math:`\\tilde u` the standardized (transformed) auxiliaries:

    - ``variables[name]``: for guided coordinate ``j`` against auxiliary ``j`` on the rows where
      it is observed, Pearson ``pearson_r``, ``r2_linear`` (:math:`r^2`), ``r2_poly`` (R² of a
      degree-``K`` polynomial read-out) and ``poly_corr`` (first canonical correlation of the
      lifts), all from :func:`pyro_dlatent.metrics.alignment`; ``rmse_standardized``
      :math:`= \\sqrt{\\overline{(m_j - \\tilde u_j)^2}}`; ``guide_rms_z_score``
      :math:`= \\sqrt{\\overline{((m_j - \\tilde u_j) / s_j)^2}}` with :math:`s_j` the guide's
      sd of the latent coordinate, and ``guide_mean_sd`` (the guide's sd lives on the scale of
      ``tau``: these say how far it is from an error bar); ``calibration``, the check of what
      :meth:`predict_aux` reports, in physical units (:func:`pyro_dlatent.calibration.
      calibration_summary`): ``coverage`` of its central 50/80/90/95% intervals,
      ``gaussian_coverage`` of mean ± z sd, ``rms_z_score``, ``mean_sd``, ``rmse``,
      ``sd_over_rmse``, ``spearman_sd_error`` and whether it is ``calibrated``; plus ``units``
      and ``transform``;
    - on the rows where *every* auxiliary is observed (``n_complete``): ``cross_correlation``
      (signed :math:`\\mathrm{corr}(m_j, \\tilde u_l)` and its largest and mean off-diagonal
      magnitude), ``leakage`` (:func:`pyro_dlatent.metrics.leakage` of :math:`r` against
      :math:`\\tilde u`: ``max``, ``mean`` and where the maximum sits; ``None`` without a residual
      block), and ``mcc``, ``mig``, ``dci`` (``disentanglement``, ``completeness``,
      ``informativeness``) and ``sap`` of the full latent mean :math:`(m, r)` against
      :math:`\\tilde u`;
    - ``reconstruction`` (when the model has ``reconstruct``): ``mse`` in the dataset's units,
      ``mse_standardized`` in the model's standardized image units and ``mse_over_variance``
      (MSE over the pixel variance about the mean image); else ``None``;
    - ``residual``: per residual coordinate, its ``activity`` :math:`\\mathrm{Var}_x(r_i)` (a
      coordinate below about 0.01 is collapsed onto its prior and carries nothing) and its
      ``mean_posterior_sd``;
    - ``n``, ``n_complete``, ``tau``, ``degree`` and ``model`` (class, sizes, parameter count and
      the full config).

    Metrics that need more rows than available (4) are ``None``.

    Parameters
    ----------
    model : GuidedLatentModel
        A trained model (``encode``, ``scaler``, ``aux_names``, ``tau``, ``config``).
    dataset : xarray.Dataset
        Images ``(sample, y, x)`` of the model's size and the model's auxiliaries (``NaN`` =
        missing); extra auxiliaries are ignored.
    batch_size : int
        Batch size of encoding and reconstruction.
    degree : int, optional
        Polynomial-lift degree ``K`` of the alignment and leakage metrics (default: the model's
        penalty degree, else 2).
    num_bins : int
        Bins of :func:`pyro_dlatent.metrics.mig`.
    seed : int
        Seed of the train/test split of :func:`pyro_dlatent.metrics.dci` (the only random part).

    Returns
    -------
    dict
        JSON-friendly (see :func:`save_report`).
    """
    ds = check_dataset(dataset, name="dataset")
    batch_size = check_int(batch_size, "batch_size")
    if degree is None:
        degree = int(getattr(model, "degree", 2))
    degree = check_int(degree, "degree")
    num_bins = check_int(num_bins, "num_bins")
    if num_bins < 2:
        raise ValueError(f"expected num_bins >= 2, got {num_bins}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"expected seed >= 0 (an int), got {seed!r}")

    names = list(model.aux_names)
    u = _standardized_aux(model, ds)
    images = model._as_images(ds["image"].values, name="dataset['image']")
    encoding = model.encode(images, batch_size=batch_size)
    z_aux = encoding.z_aux_loc.double().cpu().numpy()
    z_aux_scale = encoding.z_aux_scale.double().cpu().numpy()
    z_rec = encoding.z_rec_loc.double().cpu().numpy()
    z_rec_scale = encoding.z_rec_scale.double().cpu().numpy()

    complete = np.isfinite(u).all(axis=1)
    n_complete = int(complete.sum())
    report: dict[str, Any] = {
        "n": int(u.shape[0]),
        "n_complete": n_complete,
        "tau": _float(model.tau),
        "degree": degree,
        "model": {
            "class": type(model).__name__,
            "aux_names": names,
            "aux_dim": int(model.aux_dim),
            "residual_dim": int(model.residual_dim),
            "num_parameters": int(sum(p.numel() for p in model.parameters())),
            "config": dict(model.config),
        },
        "variables": _variable_entries(model, z_aux, z_aux_scale, u, degree),
        "residual": {
            "activity": [_float(v) for v in z_rec.var(axis=0)],
            "mean_posterior_sd": [_float(v) for v in z_rec_scale.mean(axis=0)],
        },
    }
    if hasattr(model, "predict_aux"):
        calibration = _calibration_entries(model, images, ds, batch_size)
        for name, entry in calibration.items():
            report["variables"][name]["calibration"] = entry
    r_values = [v["pearson_r"] for v in report["variables"].values() if v["pearson_r"] is not None]
    report["mean_pearson_r"] = _float(np.mean(r_values)) if r_values else None
    report["min_pearson_r"] = _float(np.min(r_values)) if r_values else None

    if n_complete >= _MIN_ROWS:
        uc, zc, rc = u[complete], z_aux[complete], z_rec[complete]
        latents = np.concatenate([zc, rc], axis=1)
        cross = metrics.alignment(zc, uc, degree, names=names)
        report["cross_correlation"] = {
            "rows": [f"z_aux[{j}]" for j in range(len(names))],
            "columns": names,
            "matrix": cross.cross_correlation.tolist(),
            "max_off_diagonal": _float(cross.max_off_diagonal),
            "mean_off_diagonal": _float(cross.mean_off_diagonal),
        }
        report["leakage"] = _leakage_entry(rc, uc, degree, names) if rc.shape[1] else None
        report["mcc"] = _float(metrics.mcc(latents, uc))
        report["mig"] = _float(metrics.mig(latents, uc, num_bins))
        result = metrics.dci(latents, uc, seed=seed)
        report["dci"] = {
            "disentanglement": _float(result.disentanglement),
            "completeness": _float(result.completeness),
            "informativeness": _float(result.informativeness),
        }
        report["sap"] = _float(metrics.sap(latents, uc))
    else:
        report.update(cross_correlation=None, leakage=None, mcc=None, mig=None, dci=None, sap=None)

    if hasattr(model, "reconstruct"):
        report["reconstruction"] = _reconstruction_entry(model, images, batch_size)
    else:
        report["reconstruction"] = None
    return report


def save_report(report: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a report as indented JSON, atomically (temporary file in the same folder, renamed).

    The parent folder is created if needed; an existing file is replaced only once the new one
    is completely written. Non-finite floats are refused (``ValueError``): reports from
    :func:`alignment_report` hold ``None`` instead.

    Returns
    -------
    Path
    """
    path = Path(path)
    try:
        text = json.dumps(report, indent=2, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"report must be JSON-serializable with finite numbers: {err}") from err
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))
    return path


def check_quality_targets(dataset: str, reports: Mapping[str, Any]) -> dict[str, Any]:
    """Compare alignment reports of an Aux-VAE and its baselines with :data:`QUALITY_TARGETS`.

    Parameters
    ----------
    dataset : {"sources", "galaxies"}
        Whose targets.
    reports : mapping
        :func:`alignment_report` of each variant on the same held-out data: ``"auxvae"`` (the
        model scored), and optionally ``"plain"`` (the same networks without penalties or
        labels, for the MSE ratio) and ``"masked"`` (trained with auxiliary values missing, for
        the drop of r).

    Returns
    -------
    dict
        One entry per target that the reports allow to check, ``pearson_r[name]``,
        ``leakage``, ``mse_ratio`` and ``masked_r_drop``: ``value``, the bound (``min`` or
        ``max``) and ``pass``.
    """
    if dataset not in QUALITY_TARGETS:
        raise ValueError(f"expected dataset in {sorted(QUALITY_TARGETS)}, got {dataset!r}")
    targets = QUALITY_TARGETS[dataset]
    checks: dict[str, Any] = {}
    aux = reports["auxvae"]
    for name, minimum in targets["pearson_r_min"].items():
        value = aux["variables"][name]["pearson_r"]
        checks[f"pearson_r[{name}]"] = {"value": value, "min": minimum, "pass": value >= minimum}
    if "leakage_max" in targets and aux["leakage"] is not None:
        value = aux["leakage"]["max"]
        maximum = targets["leakage_max"]
        checks["leakage"] = {"value": value, "max": maximum, "pass": value <= maximum}
    if "mse_ratio_max" in targets and "plain" in reports:
        ratio = aux["reconstruction"]["mse"] / reports["plain"]["reconstruction"]["mse"]
        maximum = targets["mse_ratio_max"]
        checks["mse_ratio"] = {"value": ratio, "max": maximum, "pass": ratio <= maximum}
    if "masked_r_drop_max" in targets and "masked" in reports:
        drops = {
            name: aux["variables"][name]["pearson_r"] - entry["pearson_r"]
            for name, entry in reports["masked"]["variables"].items()
        }
        maximum = targets["masked_r_drop_max"]
        worst = max(drops.values())
        checks["masked_r_drop"] = {
            "value": worst,
            "by_variable": drops,
            "max": maximum,
            "pass": worst <= maximum,
        }
    return checks
