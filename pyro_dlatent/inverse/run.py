"""Inversion runs: a trained generator + sensor data -> posterior netCDF, summary and figures."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from pyro_dlatent import data, metrics, plots
from pyro_dlatent.export import save_netcdf
from pyro_dlatent.inverse.collapsed import infer_collapsed
from pyro_dlatent.inverse.exact import NAMES, BumpPrior, ExactBumpPosterior
from pyro_dlatent.inverse.fem import (
    SourceProblem,
    check_noise_sd,
    default_sensors,
    simulate_observations,
)
from pyro_dlatent.inverse.infer import InferenceResult, infer
from pyro_dlatent.inverse.prior import DeepPrior
from pyro_dlatent.utils import write_json, write_netcdf

__all__ = [
    "Observations",
    "invert_run",
    "load_observations",
    "save_observations",
    "synthetic_observations",
]


class Observations:
    """Sensor data for the source problem, with what is known about the truth (if anything).

    Parameters
    ----------
    values : array ``(m,)``
        Observed sensor values.
    sensors : array ``(m, 2)``
        Sensor coordinates in the unit square.
    noise_sd : float
        Standard deviation of the Gaussian sensor noise.
    size : int
        Nodes per axis of the FEM grid (= image side of the generator).
    truth_field : array ``(size, size)``, optional
    truth_aux : mapping of name to float, optional
        Known truth, for synthetic problems and figures.
    simulator : mapping, optional
        The prior the truth was drawn from, when it is the ``sources`` simulator's: the fields of
        :class:`~pyro_dlatent.inverse.exact.BumpPrior`. With it the exact posterior is computed
        beside any inversion as the reference.
    """

    def __init__(
        self,
        values: Any,
        sensors: Any,
        noise_sd: float,
        size: int,
        *,
        truth_field: Any = None,
        truth_aux: dict[str, float] | None = None,
        simulator: dict[str, Any] | None = None,
    ) -> None:
        values = np.asarray(values, dtype=np.float64)
        sensors = np.asarray(sensors, dtype=np.float64)
        if values.ndim != 1 or values.size == 0:
            raise ValueError(f"values must be a non-empty 1-d array, got shape {values.shape}")
        if not np.isfinite(values).all():
            raise ValueError("values contains non-finite entries")
        if sensors.shape != (values.size, 2):
            raise ValueError(f"sensors must have shape ({values.size}, 2), got {sensors.shape}")
        if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 3:
            raise ValueError(f"expected size >= 3 (nodes per axis, an int), got {size!r}")
        self.values = values
        self.sensors = sensors
        self.noise_sd = check_noise_sd(noise_sd)
        self.size = int(size)
        self.truth_field = None if truth_field is None else np.asarray(truth_field, np.float64)
        if self.truth_field is not None and self.truth_field.shape != (self.size, self.size):
            raise ValueError(
                f"truth_field must have shape ({self.size}, {self.size}), "
                f"got {self.truth_field.shape}"
            )
        self.truth_aux = dict(truth_aux or {})
        self.simulator = None if simulator is None else dict(simulator)
        self.bump_prior()  # a malformed simulator fails here, naming its field

    def bump_prior(self) -> BumpPrior | None:
        """The simulator's prior, when known."""
        if self.simulator is None:
            return None
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in self.simulator.items()}
        try:
            return BumpPrior(**fields)
        except TypeError as err:
            raise ValueError(f"simulator {self.simulator!r} is not a BumpPrior: {err}") from err

    def problem(self) -> SourceProblem:
        """The source problem these data observe."""
        return SourceProblem(self.size, self.sensors, self.noise_sd)


def save_observations(obs: Observations, path: str | os.PathLike) -> Path:
    """Write observations (and any truth) to a netCDF file, atomically."""
    path = Path(path)
    ds = xr.Dataset(
        {
            "obs": (("sensor",), obs.values),
            "sensor_x": (("sensor",), obs.sensors[:, 0]),
            "sensor_y": (("sensor",), obs.sensors[:, 1]),
        },
        attrs={
            "noise_sd": obs.noise_sd,
            "size": obs.size,
            "truth_aux": json.dumps(obs.truth_aux),
            "simulator": json.dumps(obs.simulator),
        },
    )
    if obs.truth_field is not None:
        ds["truth_field"] = (("y", "x"), obs.truth_field)
    return write_netcdf(ds, path)


def load_observations(path: str | os.PathLike) -> Observations:
    """Read observations written by :func:`save_observations` (or any file of that layout).

    The file needs ``obs``, ``sensor_x``, ``sensor_y`` (dim ``sensor``) and the attributes
    ``noise_sd`` and ``size``; ``truth_field`` ``(y, x)`` is optional.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"observations file {str(path)!r} does not exist")
    try:
        ds = xr.load_dataset(path, engine="h5netcdf")
    except Exception as err:
        raise ValueError(f"observations file {str(path)!r} is not readable netCDF: {err}") from err
    missing = [v for v in ("obs", "sensor_x", "sensor_y") if v not in ds]
    missing += [a for a in ("noise_sd", "size") if a not in ds.attrs]
    if missing:
        raise ValueError(f"observations file {str(path)!r} lacks {missing}")
    truth_aux = ds.attrs.get("truth_aux", "{}")
    simulator = ds.attrs.get("simulator", "null")
    return Observations(
        ds["obs"].values,
        np.column_stack([ds["sensor_x"].values, ds["sensor_y"].values]),
        float(ds.attrs["noise_sd"]),
        int(ds.attrs["size"]),
        truth_field=ds["truth_field"].values if "truth_field" in ds else None,
        truth_aux=json.loads(truth_aux) if isinstance(truth_aux, str) else {},
        simulator=json.loads(simulator) if isinstance(simulator, str) else None,
    )


def synthetic_observations(
    *,
    size: int = 32,
    sensors_per_axis: int = 5,
    noise_fraction: float = 0.02,
    seed: int = 12345,
) -> Observations:
    """A held-out ``sources`` field observed by a sensor grid, with noise.

    The noise sd is ``noise_fraction`` times the range of the noise-free sensor data.
    """
    ds = data.simulate("sources", 1, size=size, seed=seed)
    truth = ds["image"].values[0].astype(np.float64)
    sensors = default_sensors(sensors_per_axis)
    clean = SourceProblem(size, sensors, 1.0).forward(torch.as_tensor(truth)).numpy()
    noise_sd = float(noise_fraction * (clean.max() - clean.min()))
    problem = SourceProblem(size, sensors, noise_sd)
    values = simulate_observations(problem, torch.as_tensor(truth), seed=seed).numpy()
    truth_aux = {name: float(ds[name].values[0]) for name in ds.attrs["aux_names"]}
    simulator = dataclasses.asdict(BumpPrior.from_dataset(ds))
    return Observations(
        values,
        sensors,
        noise_sd,
        size,
        truth_field=truth,
        truth_aux=truth_aux,
        simulator=simulator,
    )


def invert_run(
    generator: torch.nn.Module,
    observations: Observations,
    out: str | os.PathLike,
    *,
    method: str = "collapsed",
    **infer_kwargs: Any,
) -> InferenceResult:
    """Invert ``observations`` under the deep prior of ``generator``; write results into ``out``.

    ``out`` receives ``posterior.nc`` (the ArviZ data), ``summary.json`` (``az.summary`` of the
    named parameters, run health, field error when the truth is known) and the figures
    ``fields.png`` (truth / posterior mean / posterior sd), ``observed_vs_predicted.png`` and
    ``marginals.png`` (named parameters with the truth marked). When the observations know their
    simulator (:attr:`Observations.simulator`), the exact posterior
    (:class:`~pyro_dlatent.inverse.exact.ExactBumpPosterior`) is drawn over the marginals and
    summarized under ``summary["exact"]``. A generator whose auxiliaries are not the problem's
    named parameters is refused.

    Parameters
    ----------
    generator : torch.nn.Module
        A frozen generator ``G(z_aux, z_rec) -> (batch, H, W)`` (``AuxVAE.generator()``).
    observations : Observations
    out : folder, created if absent
    method : {"collapsed", "map", "svi", "nuts"}
        ``"collapsed"``: :func:`infer_collapsed` (the residual field integrated out); the others
        :func:`infer` on the full deep prior.
    **infer_kwargs
        Passed on; what is left out takes the called function's own default.
    """
    import arviz as az

    if generator.image_size != observations.size:
        raise ValueError(
            f"observations are on a {observations.size}x{observations.size} grid but the "
            f"generator makes {generator.image_size}x{generator.image_size} fields"
        )
    names = list(generator.scaler.names)
    known = list(observations.truth_aux) or (list(NAMES) if observations.simulator else [])
    if known and sorted(known) != sorted(names):
        raise ValueError(
            f"the generator's auxiliaries {names} are not the problem's named parameters "
            f"{known}: invert with a generator trained on data of this problem"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bump_prior = observations.bump_prior()
    problem = observations.problem()  # assembled and factorized once, used by every step below
    if method == "collapsed":
        if bump_prior is not None and "bounds" not in infer_kwargs:
            infer_kwargs["bounds"] = bump_prior.bounds[[NAMES.index(n) for n in names]]
        result = infer_collapsed(problem, generator, observations.values, **infer_kwargs)
    else:
        result = infer(
            problem,
            DeepPrior(generator),
            observations.values,
            method=method,
            **infer_kwargs,
        )
    idata = result.idata
    save_netcdf(idata, out / "posterior.nc", overwrite=True)

    u_draws = np.asarray(idata.posterior["u"]).reshape(-1, len(names))
    mean = np.asarray(idata.field_summary["field_mean"])
    sd = np.asarray(idata.field_summary["field_sd"]) if "field_sd" in idata.field_summary else None
    summary: dict[str, Any] = {"method": method, "health": result.health, "names": names}
    summary["u_mean"] = dict(zip(names, u_draws.mean(0).tolist(), strict=True))
    summary["u_sd"] = dict(zip(names, u_draws.std(0).tolist(), strict=True))
    interval = np.quantile(u_draws, [0.05, 0.95], axis=0).T
    summary["u_interval_90"] = dict(zip(names, interval.tolist(), strict=True))
    if method == "nuts":
        table = az.summary(idata, var_names=["u"])
        summary["az_summary"] = json.loads(table.to_json(orient="index"))
    truth = observations.truth_field
    if truth is not None:
        summary["relative_l2_error"] = float(metrics.relative_l2_error(mean[None], truth[None])[0])
    if observations.truth_aux:
        summary["truth_aux"] = observations.truth_aux
    reference = None
    if bump_prior is not None:
        exact = ExactBumpPosterior(problem, observations.values, bump_prior)
        order = [NAMES.index(n) for n in names]
        reference = exact.sample(4000, rng=0)[:, order]
        interval = exact.interval(0.9)[order]
        summary["exact"] = {
            "u_mean": dict(zip(names, exact.mean()[order].tolist(), strict=True)),
            "u_sd": dict(zip(names, exact.sd()[order].tolist(), strict=True)),
            "u_interval_90": dict(zip(names, interval.tolist(), strict=True)),
        }
        if truth is not None:
            exact_mean, _ = exact.field_moments(2000, rng=0)
            error = metrics.relative_l2_error(exact_mean[None], truth[None])[0]
            summary["exact"]["relative_l2_error"] = float(error)
    write_json(summary, out / "summary.json")

    plots.save_figure(
        plots.posterior_fields(truth, mean, sd, sensors=observations.sensors), out / "fields.png"
    )
    predictive = np.asarray(idata.posterior_predictive["obs"]).reshape(-1, observations.values.size)
    plots.save_figure(
        plots.observed_vs_predicted(observations.values, predictive.mean(0), predictive.std(0)),
        out / "observed_vs_predicted.png",
    )
    truth_u = None
    if all(n in observations.truth_aux for n in names):
        truth_u = np.array([observations.truth_aux[n] for n in names])
    units = generator.scaler.units
    labels = [f"{n} [{u}]" if u else n for n, u in zip(names, units, strict=True)]
    plots.save_figure(
        plots.marginal_posteriors(u_draws, names=labels, truth=truth_u, reference=reference),
        out / "marginals.png",
    )
    return result
