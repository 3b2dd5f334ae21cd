"""One entry point for Bayesian inversion with a field prior: MAP, SVI or NUTS, as ArviZ data.

:func:`infer` builds the :class:`~pyro_dlatent.inverse.prior.InverseProblemModel`
``p(d, theta) = p(d | field(theta)) p(theta)``, runs a method object
(:class:`~pyro_dlatent.inverse.methods.MAP`, :class:`~pyro_dlatent.inverse.methods.SVI` or
:class:`~pyro_dlatent.inverse.methods.NUTS`, each holding only its own settings) and pushes the
posterior draws through the model in vectorized chunks (:class:`~pyro.infer.Predictive` with
``parallel=True``) for the posterior predictive, the pointwise log-likelihood and the field's
posterior mean and standard deviation, exported with :func:`pyro_dlatent.export.to_arviz`.
Run health (divergences, R-hat, ESS; whether the SVI loss settled; the data misfit) is checked
and reported with an :class:`~pyro_dlatent.inverse.health.InferenceWarning`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Predictive

from pyro_dlatent.export import field_summary_from_moments, to_arviz
from pyro_dlatent.inverse._pyro_nuts import SAMPLE_STATS, _RecordingNUTS
from pyro_dlatent.inverse.health import (
    MAX_MISFIT_RMS,
    InferenceWarning,
    data_misfit,
    loss_settled,
    report_health,
    run_health,
)
from pyro_dlatent.inverse.methods import GUIDES, MAP, NUTS, SVI, SVI_START, Method
from pyro_dlatent.inverse.potential import LatentPotential
from pyro_dlatent.inverse.prior import FIELD_SITE, OBS_SITE, InverseProblemModel
from pyro_dlatent.validation import check_int

__all__ = [
    "GUIDES",
    "MAP",
    "MAX_MISFIT_RMS",
    "METHODS",
    "NUTS",
    "SAMPLE_STATS",
    "SVI",
    "InferenceResult",
    "InferenceWarning",
    "LatentPotential",
    "_RecordingNUTS",
    "data_misfit",
    "infer",
    "loss_settled",
    "report_health",
    "run_health",
]

METHODS = {"map": MAP, "svi": SVI, "nuts": NUTS}
"""Method names of :func:`infer` and the classes they name."""


@dataclass
class InferenceResult:
    """What :func:`infer` returns.

    Attributes
    ----------
    idata : arviz.InferenceData or xarray.DataTree
        Groups ``posterior``, ``posterior_predictive``, ``log_likelihood``, ``sample_stats``
        (NUTS), ``observed_data``, ``constant_data`` and ``field_summary``.
    method : str
        ``"map"``, ``"svi"``, ``"nuts"`` (or ``"collapsed"`` from
        :func:`~pyro_dlatent.inverse.collapsed.infer_collapsed`).
    model : InverseProblemModel
        The Pyro model that was inverted.
    samples : dict of str to Tensor
        Posterior draws of the prior's latent sites, shape ``(chain, draw, *event)``.
    health : dict
        Divergences, R-hat and ESS (NUTS), whether the loss settled (SVI), start losses (MAP).
    losses : numpy.ndarray, optional
        Loss per optimization step (SVI, MAP; for MAP the sum over the starts).
    guide : pyro.infer.autoguide.AutoGuide, optional
        The fitted guide (SVI, MAP).
    """

    idata: Any
    method: str
    model: InverseProblemModel
    samples: dict[str, torch.Tensor]
    health: dict[str, Any] = field(default_factory=dict)
    losses: np.ndarray | None = None
    guide: Any = None


# --------------------------------------------------------------------------- RNG
@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Run with torch's RNG seeded by ``seed`` and restore the caller's RNG state afterwards."""
    if seed is None:
        yield
        return
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------- posterior outputs
def _posterior_outputs(
    model: InverseProblemModel,
    latent: Mapping[str, torch.Tensor],
    chunk_size: int,
    keep_fields: bool = False,
) -> dict[str, Any]:
    """Push posterior draws through the model in vectorized chunks.

    Returns the posterior predictive and pointwise log-likelihood of ``"obs"``
    ``(chain, draw, num_sensors)``, the field's draw count, mean and ``M2`` (sum of squared
    deviations) accumulated in float64 with Chan's pairwise update, and, with ``keep_fields``,
    every field draw ``(chain, draw, H, W)``.
    """
    first = next(iter(latent.values()))
    num_chains, num_draws = first.shape[:2]
    total = num_chains * num_draws
    flat = {k: v.reshape(total, *v.shape[2:]) for k, v in latent.items()}
    predictive_obs, log_lik, kept = [], [], []
    count, mean, m2 = 0, None, None
    with torch.no_grad():
        for start in range(0, total, chunk_size):
            chunk = {k: v[start : start + chunk_size] for k, v in flat.items()}
            n = next(iter(chunk.values())).shape[0]
            trace = Predictive(model, posterior_samples=chunk, parallel=True).get_vectorized_trace()
            obs_fn = trace.nodes[OBS_SITE]["fn"]
            base = obs_fn.base_dist if isinstance(obs_fn, dist.Independent) else obs_fn
            log_lik.append(base.log_prob(model.observations).reshape(n, -1))
            predictive_obs.append(obs_fn.sample().reshape(n, -1))
            fields = trace.nodes[FIELD_SITE]["value"].reshape(n, *model.prior.field_shape)
            if keep_fields:
                kept.append(fields.detach().cpu())
            fields = fields.detach().to(torch.float64).cpu().numpy()
            chunk_mean = fields.mean(axis=0)
            chunk_m2 = ((fields - chunk_mean) ** 2).sum(axis=0)
            if mean is None:
                count, mean, m2 = n, chunk_mean, chunk_m2
            else:
                delta = chunk_mean - mean
                new_count = count + n
                mean = mean + delta * (n / new_count)
                m2 = m2 + chunk_m2 + delta**2 * (count * n / new_count)
                count = new_count
    shape = (num_chains, num_draws)
    return {
        "posterior_predictive": torch.cat(predictive_obs).reshape(*shape, -1),
        "log_likelihood": torch.cat(log_lik).reshape(*shape, -1),
        "field_count": count,
        "field_mean": mean,
        "field_m2": m2,
        "fields": torch.cat(kept).reshape(*shape, *model.prior.field_shape) if kept else None,
    }


def _problem_metadata(
    problem: Any, noise_sd: torch.Tensor, num_sensors: int, field_shape: tuple[int, int]
) -> tuple[dict, dict, dict]:
    """constant_data variables, their dims, and coords (sensors, noise, mesh nodes).

    ``node_x``, ``node_y`` ``(y, x)`` are the mesh-node coordinates (``node_xy[i, j] = (x, y)``
    of the field's pixel ``[i, j]``); the index coordinates ``x`` and ``y`` are its first row
    and column, exact for the structured unit-square mesh.
    """
    constant: dict[str, Any] = {"noise_sd": noise_sd.detach().cpu().numpy()}
    dims: dict[str, list[str]] = {}
    if constant["noise_sd"].ndim == 1:
        dims["noise_sd"] = ["sensor"]
    coords: dict[str, Any] = {"sensor": list(range(num_sensors))}
    sensors = getattr(problem, "sensors", None)
    if sensors is not None:
        sensors = np.asarray(sensors, dtype=np.float64)
        if sensors.shape == (num_sensors, 2):
            constant["sensor_x"] = sensors[:, 0]
            constant["sensor_y"] = sensors[:, 1]
            dims["sensor_x"] = ["sensor"]
            dims["sensor_y"] = ["sensor"]
    height, width = field_shape
    node_xy = getattr(problem, "node_xy", None)
    if node_xy is not None and np.shape(node_xy) == (height, width, 2):
        node_xy = np.asarray(node_xy, dtype=np.float64)
        coords["x"] = node_xy[0, :, 0]
        coords["y"] = node_xy[:, 0, 1]
        constant["node_x"] = node_xy[..., 0]
        constant["node_y"] = node_xy[..., 1]
        dims["node_x"] = dims["node_y"] = ["y", "x"]
    else:
        coords["x"] = np.arange(width, dtype=np.float64)
        coords["y"] = np.arange(height, dtype=np.float64)
    return constant, dims, coords


_LEGACY = {"svi_init": "init"}
"""Keyword names of the string form that a method object spells differently."""


def method_from_settings(method: str, settings: Mapping[str, Any]) -> Method:
    """The method object for ``infer``'s string form: ``method`` with its settings.

    Settings the method does not take are ignored with a ``FutureWarning`` (they were silently
    ignored before; a later release will refuse them); ``svi_init`` is :class:`SVI`'s ``init``
    and ``num_starts``, ``lbfgs_steps`` given to ``"svi"`` set its :class:`MAP` start.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
    klass = METHODS[method]
    own = {f.name for f in dataclasses.fields(klass)}
    known = (
        own
        | {"num_starts", "lbfgs_steps", "svi_init"}
        | {f.name for k in METHODS.values() for f in dataclasses.fields(k)}
    )
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(f"infer() got unexpected keyword arguments {unknown}")
    settings = {_LEGACY.get(k, k): v for k, v in settings.items()}
    if klass is SVI:
        init = settings.pop("init", "map")
        if isinstance(init, str) and init not in ("map", "median"):
            raise ValueError(f"svi_init must be 'map' or 'median', got {init!r}")
        if init == "map":
            start = {k: settings.pop(k) for k in ("num_starts", "lbfgs_steps") if k in settings}
            steps = check_int(settings.get("steps", 2000), "steps", 1)
            init = MAP(steps=min(steps, SVI_START.steps), **start)
        settings["init"] = init
    ignored = sorted(set(settings) - own)
    if ignored:
        warnings.warn(
            f"{ignored} are not settings of method={method!r} and are ignored (a later release "
            f"will refuse them); pass infer(..., {klass.__name__}(...)) with its own settings",
            FutureWarning,
            stacklevel=3,
        )
    return klass(**{k: v for k, v in settings.items() if k in own})


def infer(
    problem: Any,
    prior: Any,
    observations: Any,
    method: str | Method = "nuts",
    *,
    field_draws: bool = False,
    chunk_size: int = 256,
    seed: int | None = 0,
    progress: bool = True,
    warn: bool = True,
    **settings: Any,
) -> InferenceResult:
    """Invert sensor data for the field under a field prior, by MAP, SVI or NUTS.

    Parameters
    ----------
    problem : object
        Forward problem with ``forward(field (batch, H, W)) -> (batch, m)``, ``noise_sd``,
        ``num_sensors`` (and ``sensors (m, 2)``, ``node_xy (H, W, 2)`` for the export).
    prior : DeepPrior or GRFFieldPrior
        The field prior.
    observations : array-like, shape ``(m,)``
        Sensor data.
    method : MAP, SVI, NUTS or {"map", "svi", "nuts"}
        A method object with its settings (:mod:`pyro_dlatent.inverse.methods`), or its name,
        in which case ``**settings`` are the method's settings (``svi_init`` for
        :class:`SVI`'s ``init``).
    field_draws : bool
        Also store every posterior field draw in ``posterior`` (``(chain, draw, y, x)``);
        large for fine meshes, so off by default (the mean and sd are always stored).
    chunk_size : int
        Draws pushed through the model at once for the predictive quantities.
    seed : int, optional
        Seed of torch's RNG for the whole run; the caller's RNG state is restored afterwards.
        ``None`` uses (and advances) the current global state.
    progress : bool
        Show progress bars.
    warn : bool
        Emit an :class:`InferenceWarning` when a health check fails.
    **settings
        With a method name: that method's settings.

    Returns
    -------
    InferenceResult
        ``result.idata`` holds the ArviZ groups (see :func:`pyro_dlatent.export.to_arviz`).
    """
    if isinstance(method, str):
        method = method_from_settings(method, settings)
    elif not isinstance(method, MAP | SVI | NUTS):
        raise ValueError(
            f"method must be a MAP, SVI or NUTS object or one of {tuple(METHODS)}, got {method!r}"
        )
    elif settings:
        raise TypeError(
            f"infer() got settings {sorted(settings)} beside a {type(method).__name__} object; "
            "give them to the object"
        )
    chunk_size = check_int(chunk_size, "chunk_size", 1)
    if seed is not None:
        seed = check_int(seed, "seed", 0)
    if observations is None:
        raise ValueError("observations must be given (shape (num_sensors,)), got None")
    model = InverseProblemModel(problem, prior, observations)

    with _seeded(seed), pyro.get_param_store().scope(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was not registered in the param store.*")
        run = method.run(model, progress=progress, chunk_size=chunk_size)
        latent = run.latent
        outputs = _posterior_outputs(model, latent, chunk_size, keep_fields=field_draws)
        fields = outputs["fields"]

    constant, constant_dims, coords = _problem_metadata(
        problem, model.noise_sd, model.num_sensors, model.prior.field_shape
    )
    meta = prior.arviz_metadata()
    dims = {**meta["dims"], **constant_dims, OBS_SITE: ["sensor"]}
    posterior = {k: v.detach().cpu().numpy() for k, v in latent.items()}
    if fields is not None and FIELD_SITE not in posterior:
        posterior[FIELD_SITE] = fields.cpu().numpy()
        dims[FIELD_SITE] = ["y", "x"]
    count = outputs["field_count"]
    summary = {"field_mean": outputs["field_mean"]}
    if count > 1:
        summary["field_sd"] = np.sqrt(outputs["field_m2"] / (count - 1))
    idata = to_arviz(
        posterior,
        posterior_predictive={OBS_SITE: outputs["posterior_predictive"]},
        log_likelihood={OBS_SITE: outputs["log_likelihood"]},
        observed_data={OBS_SITE: model.observations},
        sample_stats=run.stats,
        constant_data=constant,
        coords={**coords, **meta["coords"]},
        dims=dims,
        var_attrs=meta["attrs"],
        attrs={"inference_method": method.name},
        field_summary=field_summary_from_moments(summary, x=coords["x"], y=coords["y"]),
    )

    health: dict[str, Any] = dict(run.health or {})
    checked, messages = method.check(idata, run)
    health.update(checked)
    health.update(data_misfit(model, outputs["posterior_predictive"]))
    report_health(health, messages, method.name, warn=warn)
    return InferenceResult(
        idata=idata,
        method=method.name,
        model=model,
        samples={k: v.detach() for k, v in latent.items()},
        health=health,
        losses=run.losses,
        guide=run.guide,
    )
