"""Run health of an inversion: divergences, R-hat and ESS, a settled loss, the data misfit."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

__all__ = [
    "MAX_MISFIT_RMS",
    "InferenceWarning",
    "data_misfit",
    "loss_settled",
    "report_health",
    "run_health",
]


class InferenceWarning(UserWarning):
    """A run that finished but whose health checks failed (divergences, R-hat, unsettled loss)."""


def loss_settled(losses: np.ndarray, *, window: float = 0.1, atol: float = 0.01) -> dict[str, Any]:
    """Whether an optimization loss has stopped moving.

    Compares the mean loss over the last ``window`` fraction of the steps (``A``) with the
    mean over the ``window`` before it (``B``). The loss settled when

    .. math:: |\\bar A - \\bar B| \\le \\max\\big(4 \\sqrt{s_A^2 / n + s_B^2 / n},\\;
              \\text{atol}\\big),

    i.e. the change is within four standard errors of the loss's own step-to-step noise (or
    below ``atol`` nats for a loss that has become deterministic).

    Returns
    -------
    dict
        ``settled`` (bool), ``change`` (``mean(B) - mean(A)``), ``noise`` (standard error).
    """
    losses = np.asarray(losses, dtype=np.float64)
    n = int(len(losses) * window)
    if n < 2:
        return {"settled": False, "change": float("nan"), "noise": float("nan")}
    last, previous = losses[-n:], losses[-2 * n : -n]
    change = float(previous.mean() - last.mean())
    noise = float(np.sqrt(last.var(ddof=1) / n + previous.var(ddof=1) / n))
    return {"settled": abs(change) <= max(4.0 * noise, atol), "change": change, "noise": noise}


MAX_MISFIT_RMS = 5.0
"""Largest RMS over sensors, in noise sds, of the posterior-mean data misfit before a warning."""


def data_misfit(model: Any, predictive: Any) -> dict[str, float]:
    """RMS over sensors of ``(d - mean predicted d) / noise_sd``: about 1 for a fit that explains d.

    Parameters
    ----------
    model : InverseProblemModel
        Its ``observations`` and ``noise_sd``.
    predictive : array, shape ``(..., m)``
        Posterior predictive draws of the data.
    """
    predicted = np.asarray(predictive, dtype=np.float64)
    predicted = predicted.reshape(-1, predicted.shape[-1]).mean(0)
    observed = model.observations.detach().cpu().double().numpy()
    noise = model.noise_sd.detach().cpu().double().numpy()
    with np.errstate(over="ignore", invalid="ignore"):
        rms = float(np.sqrt(np.mean(((observed - predicted) / noise) ** 2)))
    return {"misfit_rms": rms if math.isfinite(rms) else math.inf}


def report_health(
    health: dict[str, Any],
    messages: list[str],
    label: str,
    *,
    warn: bool = True,
    rhat_advice: str | None = None,
) -> None:
    """Add the shared run-health messages to ``messages``; store them and warn once.

    NUTS's divergences and R-hat (when ``health`` has them, with ``rhat_advice`` appended) and
    the data misfit beyond :data:`MAX_MISFIT_RMS` join the method's own ``messages``; all of
    them go to ``health["warnings"]`` and, with ``warn``, one :class:`InferenceWarning`.
    """
    if health.get("divergences", 0) > 0:
        messages.append(f"{health['divergences']} divergent transitions")
    if "max_rhat" in health and not health["max_rhat"] <= 1.01:
        advice = f": {rhat_advice}" if rhat_advice else ""
        messages.append(f"max R-hat {health['max_rhat']:.3f} > 1.01{advice}")
    if not health["misfit_rms"] <= MAX_MISFIT_RMS:
        messages.append(
            f"the posterior's predicted data miss the observations by {health['misfit_rms']:.3g} "
            f"noise sds (RMS over sensors, > {MAX_MISFIT_RMS:g}): the prior cannot explain these "
            "data; check the observations' units and noise_sd"
        )
    if messages:
        health["warnings"] = messages
        if warn:
            warnings.warn(f"{label}: " + "; ".join(messages), InferenceWarning, stacklevel=3)


def run_health(idata: Any, var_names: list[str] | None = None) -> dict[str, Any]:
    """Divergences, worst R-hat and smallest bulk/tail ESS of a sampled posterior (via ArviZ).

    Returns
    -------
    dict
        ``divergences`` (int), ``max_rhat``, ``min_ess_bulk``, ``min_ess_tail`` (floats;
        ``max_rhat`` is ``inf`` when a chain did not move, an undefined ESS counts as 0).
    """
    import arviz as az

    posterior = idata["posterior"]
    if hasattr(posterior, "to_dataset"):
        posterior = posterior.to_dataset()
    if var_names is not None:
        posterior = posterior[var_names]
    with np.errstate(divide="ignore", invalid="ignore"):
        rhat = az.rhat(posterior)
        ess_bulk = az.ess(posterior, method="bulk")
        ess_tail = az.ess(posterior, method="tail")

    def _values(ds: Any) -> np.ndarray:
        values = [np.asarray(ds[v], dtype=np.float64).ravel() for v in ds.data_vars]
        return np.concatenate(values) if values else np.array([np.nan])

    rhat_values = _values(rhat)
    # A non-finite R-hat means a chain did not move (zero within-chain variance): the worst case.
    max_rhat = float(np.max(rhat_values)) if np.isfinite(rhat_values).all() else math.inf

    divergences = 0
    groups = idata.groups() if hasattr(idata, "groups") and callable(idata.groups) else None
    has_stats = "sample_stats" in (groups if groups is not None else list(idata.children))
    if has_stats and "diverging" in idata["sample_stats"]:
        divergences = int(np.asarray(idata["sample_stats"]["diverging"]).sum())
    return {
        "divergences": divergences,
        "max_rhat": max_rhat,
        "min_ess_bulk": float(np.nan_to_num(_values(ess_bulk), nan=0.0).min()),
        "min_ess_tail": float(np.nan_to_num(_values(ess_tail), nan=0.0).min()),
    }
