"""The auxiliaries given an image, with calibrated uncertainty: ``predict_aux`` and its fit.

:class:`AuxPrediction` is a part of :class:`~pyro_dlatent.models.base.GuidedLatentModel`: the
encoder estimates the named variables, and the predictive distribution
(:class:`~pyro_dlatent.calibration.AuxCalibration`) fitted on images the weights were not
trained on turns its output into error bars that cover held-out truths at their nominal rate.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import xarray as xr

from pyro_dlatent.calibration import (
    MAX_MEAN_ROWS,
    MIN_CALIBRATION_ROWS,
    encoding_features,
    quantile_label,
)
from pyro_dlatent.models.tensors import ModelTensors
from pyro_dlatent.validation import check_int

if TYPE_CHECKING:
    from pyro_dlatent.calibration import AuxCalibration
    from pyro_dlatent.latent import AuxScaler

__all__ = ["AuxPrediction"]

_PREDICTIVE_POINTS = 200
"""Equally likely quantiles whose physical values give :meth:`AuxPrediction.predict_aux`'s
mean and sd."""


class AuxPrediction:
    """Auxiliary prediction with calibrated uncertainty, a part of ``GuidedLatentModel``.

    Uses the model's ``encode``, ``prepare``, ``scaler``, ``aux_names`` and ``aux_calibration``.
    """

    aux_calibration: AuxCalibration
    scaler: AuxScaler
    aux_names: list[str]

    @property
    def uncertainty_calibrated(self) -> bool:
        """Whether :meth:`calibrate_uncertainty` has calibrated every auxiliary."""
        return bool(self.aux_calibration.fitted.all())

    def _uncertainty_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.aux_calibration.state_dict().items()}

    def _targets(self, tensors: ModelTensors) -> torch.Tensor:
        """Standardized auxiliaries of prepared data, ``NaN`` where missing."""
        aux = tensors.aux.double()
        return aux if tensors.mask is None else torch.where(tensors.mask, aux, math.nan)

    def _features(self, images: torch.Tensor, batch_size: int) -> torch.Tensor:
        encoding = self.encode(images, batch_size=batch_size)
        return encoding_features(encoding.z_aux_loc, encoding.z_aux_scale, encoding.z_rec_loc)

    def calibrate_uncertainty(
        self,
        train: xr.Dataset | ModelTensors,
        held_out: xr.Dataset | ModelTensors,
        *,
        batch_size: int = 256,
    ) -> list[str]:
        """Fit the predictive distribution that :meth:`predict_aux` reports.

        The model's ``fit`` calls it on its training and validation parts, so a user only calls it
        after changing the weights, or to calibrate on a labelled set of their own. The read-out
        is fitted on ``train`` (at most :data:`~pyro_dlatent.calibration.MAX_MEAN_ROWS` evenly
        spaced images) and the scale and error law on ``held_out``, which must be images the
        weights were not trained on; the rule is :class:`~pyro_dlatent.calibration.AuxCalibration`.

        Parameters
        ----------
        train, held_out : xarray.Dataset or ModelTensors
            Labelled images (``NaN`` = missing auxiliary).
        batch_size : int
            Batch size of encoding.

        Returns
        -------
        list of str
            Auxiliaries left uncalibrated (too few held-out values); a warning names them.
        """
        train = train if isinstance(train, ModelTensors) else self.prepare(train, name="train")
        held = (
            held_out
            if isinstance(held_out, ModelTensors)
            else self.prepare(held_out, name="held_out")
        )
        batch_size = check_int(batch_size, "batch_size", 1)
        n = train.images.shape[0]
        rows = torch.arange(n)
        if n > MAX_MEAN_ROWS:
            rows = torch.linspace(0, n - 1, MAX_MEAN_ROWS).round().long()
        rows = rows.to(train.images.device)
        skipped = self.aux_calibration.fit(
            self._features(train.images[rows], batch_size),
            self._targets(train)[rows],
            self._features(held.images, batch_size),
            self._targets(held),
        )
        names = [self.aux_names[j] for j in skipped]
        if names:
            warnings.warn(
                f"auxiliaries {names} have fewer than {MIN_CALIBRATION_ROWS} "
                "held-out values, too few to calibrate their uncertainty; predict_aux reports "
                "the guide's sd for them (fit with a larger val_fraction)",
                stacklevel=2,
            )
        return names

    def predict_aux(
        self,
        images: Any,
        *,
        quantiles: Sequence[float] = (0.05, 0.25, 0.75, 0.95),
        batch_size: int = 256,
    ) -> xr.Dataset:
        """Mean, sd and quantiles of each auxiliary given the image, in physical units.

        Once calibrated (the model's ``fit`` does it on its validation part), the answer is the
        predictive distribution of :class:`~pyro_dlatent.calibration.AuxCalibration`: on the
        guided block's scale (transformed, standardized) it is ``mu(x) + sigma(x) eps`` with
        ``eps`` drawn from the held-out studentized errors, so its central intervals cover held-out
        truths at their nominal rate, and ``sigma(x)`` grows with the image's difficulty. It is
        mapped to physical units through the scaler's inverse, quantile by quantile (exact for
        the monotone transforms); the mean and sd are those of 200 equally likely quantiles.

        Without a calibration (``fit(val_fraction=0)``, or a checkpoint written before it) an
        auxiliary gets the guide's Gaussian ``N(m_j, s_j^2)`` mapped the same way, with a
        warning: that sd is the latent coordinate's, on the scale of ``tau``, and is not an
        error bar.

        Parameters
        ----------
        images : array-like, Tensor, DataArray or Dataset, shape ``(n, H, W)``
        quantiles : sequence of float in ``(0, 1)``
            Levels reported as ``{name}_q{100 p:02g}`` (``x0_q05``, ``x0_q95``, ...): the
            central 90% interval is ``[q05, q95]``.
        batch_size : int

        Returns
        -------
        xarray.Dataset
            For each auxiliary ``name``: ``name`` (mean), ``name_sd`` and the quantiles, dim
            ``sample``, with ``units`` and ``long_name`` attributes; ``attrs["calibrated"]``
            lists the auxiliaries whose uncertainty is calibrated.
        """
        levels = np.asarray(quantiles, dtype=np.float64).reshape(-1)
        if not np.all((levels > 0) & (levels < 1)):
            raise ValueError(f"expected quantiles in (0, 1), got {list(quantiles)!r}")
        labels = [quantile_label(p) for p in levels]
        if len(set(labels)) != len(labels):
            raise ValueError(f"expected distinct quantiles, got {list(quantiles)!r}")
        encoding = self.encode(images, batch_size=batch_size)
        grid = (np.arange(_PREDICTIVE_POINTS) + 0.5) / _PREDICTIVE_POINTS
        fitted = self.aux_calibration.fitted.cpu().numpy()
        features = encoding_features(encoding.z_aux_loc, encoding.z_aux_scale, encoding.z_rec_loc)
        _, points = self.aux_calibration.predict(features, grid, conformal=False)
        _, bounds = self.aux_calibration.predict(features, levels)
        table = torch.cat([points, bounds], -1)
        # the guide's Gaussian for auxiliaries without a calibration
        m = encoding.z_aux_loc.double().cpu()[:, :, None]
        s = encoding.z_aux_scale.double().cpu()[:, :, None]
        normal = torch.distributions.Normal(0.0, 1.0).icdf(
            torch.as_tensor(np.concatenate([grid, levels]))
        )
        table = torch.where(torch.as_tensor(fitted)[None, :, None], table, m + s * normal)
        physical = self.scaler.inverse_transform_tensor(table.transpose(1, 2)).transpose(1, 2)
        physical = physical.numpy()
        points, reported = physical[..., : len(grid)], physical[..., len(grid) :]
        mean, sd = points.mean(-1), points.std(-1)
        calibrated = [n for n, f in zip(self.scaler.names, fitted, strict=True) if f]
        if not fitted.all():
            missing = [n for n in self.scaler.names if n not in calibrated]
            warnings.warn(
                f"the uncertainty of {missing} "
                "is not calibrated: their sd is the guide's latent sd, not an error bar "
                "(fit with val_fraction > 0, or call calibrate_uncertainty)",
                stacklevel=2,
            )
        data_vars = {}
        for j, (name, units) in enumerate(zip(self.scaler.names, self.scaler.units, strict=True)):
            what = "predictive" if fitted[j] else "guide (not calibrated)"
            data_vars[name] = ("sample", mean[:, j], {"units": units, "long_name": f"{what} mean"})
            data_vars[f"{name}_sd"] = (
                "sample",
                sd[:, j],
                {"units": units, "long_name": f"{what} standard deviation"},
            )
            for i, (p, label) in enumerate(zip(levels, labels, strict=True)):
                data_vars[f"{name}_{label}"] = (
                    "sample",
                    reported[:, j, i],
                    {"units": units, "long_name": f"{what} {p:g} quantile"},
                )
        return xr.Dataset(
            data_vars,
            attrs={"aux_names": list(self.scaler.names), "calibrated": calibrated},
        )
