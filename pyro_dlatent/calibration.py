"""Calibrated uncertainty: the auxiliaries' predictive distribution given an image, and its checks.

:class:`AuxCalibration` turns an encoder's output into a predictive distribution of each named
auxiliary that is checked against held-out truths; :func:`coverage` and :func:`calibration_summary`
are the checks (empirical coverage of central intervals, RMS z-score, sharpness), shared by the
models' reports and the tests.

Why not the guide's sd
----------------------
The guide's ``q(z_aux | x)`` is the posterior of the *latent* coordinate, whose prior sd about the
standardized auxiliary is ``tau``; its sd says nothing about how far the auxiliary itself lies
from the encoder's mean (on ``sources`` it was 3-7 times too narrow). The quantity a scientist
needs is ``u | x``, and the only honest estimate of its spread is the encoder's error on images
it was not trained on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.stats
import torch

__all__ = [
    "COVERAGE_LEVELS",
    "AuxCalibration",
    "binomial_band",
    "calibration_summary",
    "coverage",
    "encoding_features",
    "interval_bounds",
    "interval_hits",
    "interval_probabilities",
    "quantile_label",
    "rank_uniformity_pvalue",
    "sbc_ranks",
]

COVERAGE_LEVELS = (0.5, 0.8, 0.9, 0.95)
"""Nominal levels of the central intervals every report checks."""

QUANTILE_GRID = 201
"""Probabilities ``k / 200`` at which the studentized residuals' quantiles are stored."""

MIN_CALIBRATION_ROWS = 20
"""Fewest held-out images with an observed value for which an auxiliary is calibrated."""

MAX_MEAN_ROWS = 20_000
"""Training images (an evenly spaced subset beyond this) on which the mean read-out is fitted."""

_FOLDS = 5
_MEAN_RIDGE = 1e-3
_SCALE_RIDGE = 1e-2


def encoding_features(
    z_aux_loc: torch.Tensor, z_aux_scale: torch.Tensor, z_rec_loc: torch.Tensor
) -> torch.Tensor:
    """Quadratic features of an encoding: ``v = (m, r, log s)`` and the upper triangle of ``v vᵀ``.

    Parameters
    ----------
    z_aux_loc, z_aux_scale : Tensor, shape ``(n, aux_dim)``
        The guide's mean ``m`` and sd ``s`` of the guided block.
    z_rec_loc : Tensor, shape ``(n, residual_dim)``
        The guide's mean ``r`` of the residual block.

    Returns
    -------
    Tensor, float64, shape ``(n, d + d (d + 1) / 2)`` with ``d = 2 aux_dim + residual_dim``
    """
    v = torch.cat(
        [z_aux_loc.double(), z_rec_loc.double(), z_aux_scale.double().clamp_min(1e-12).log()], -1
    )
    rows, cols = torch.triu_indices(v.shape[-1], v.shape[-1])
    return torch.cat([v, v[:, rows] * v[:, cols]], -1)


def _ridge(x: torch.Tensor, y: torch.Tensor, penalty: float) -> torch.Tensor:
    """Least squares of ``y`` on ``[1, x]`` with ``penalty * n`` on every slope's square."""
    design = torch.cat([x.new_ones(x.shape[0], 1), x], -1)
    gram = design.T @ design
    ridge = torch.full((design.shape[1],), penalty * design.shape[0], dtype=x.dtype)
    ridge[0] = 0.0
    return torch.linalg.solve(gram + torch.diag(ridge), design.T @ y)


def _fit_log_scale(x: torch.Tensor, residual: torch.Tensor, penalty: float) -> torch.Tensor:
    """Coefficients ``g`` of ``log sigma = g0 + x g`` minimizing the Gaussian negative log score.

    The loss ``mean(log sigma + e² / (2 sigma²)) + penalty |g_{1:}|²`` is convex in ``g``.
    """
    design = torch.cat([x.new_ones(x.shape[0], 1), x], -1)
    coef = torch.zeros(design.shape[1], dtype=x.dtype)
    coef[0] = 0.5 * torch.log(residual.square().mean().clamp_min(1e-300))
    coef.requires_grad_(True)
    optimizer = torch.optim.LBFGS([coef], max_iter=200, line_search_fn="strong_wolfe")
    squared = residual.square()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        log_scale = design @ coef
        loss = (log_scale + 0.5 * squared * torch.exp(-2.0 * log_scale)).mean()
        loss = loss + penalty * coef[1:].square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return coef.detach()


class AuxCalibration(torch.nn.Module):
    """Predictive distribution of each standardized auxiliary given an image's encoding.

    For auxiliary ``j`` on the scale the guided block is tethered to (the scaler's transformed,
    standardized variable :math:`\\tilde u_j`), with :math:`\\phi(x)` the quadratic features of
    the encoding (:func:`encoding_features`, standardized on the training part),

    .. math::

        \\tilde u_j \\mid x \\;=\\; \\mu_j(x) + \\sigma_j(x)\\, \\varepsilon_j, \\qquad
        \\mu_j = a_j + b_j^\\top \\phi(x), \\quad \\log \\sigma_j = c_j + d_j^\\top \\phi(x),
        \\qquad \\varepsilon_j \\sim \\hat F_j,

    where the read-out :math:`\\mu_j` is a ridge regression on the *training* images, the scale
    :math:`\\sigma_j` minimizes the Gaussian negative log score (a proper scoring rule) of the
    read-out's errors on *held-out* images (over the constant, the linear or the quadratic
    features, whichever scores best out of fold, so that a small calibration set gets a simple
    scale), and :math:`\\hat F_j` is the empirical distribution
    of the held-out studentized errors :math:`(\\tilde u_j - \\mu_j) / \\sigma_j`, each computed
    with the scale fitted on the other folds (5-fold cross-fitting, so that no error is scored by
    a scale fitted to it). An interval of level :math:`\\alpha` is
    :math:`\\mu_j + \\sigma_j [\\hat F_j^{-1}(\\frac{1 - \\alpha'}{2}), \\hat F_j^{-1}(\\frac{1 +
    \\alpha'}{2})]` with :math:`\\alpha' = \\alpha (n_j + 1) / n_j` (split-conformal's finite-sample
    correction), so its coverage of exchangeable held-out truths is :math:`\\alpha` whatever the
    shape of the errors, and :math:`\\sigma_j(x)` makes it wide where images are hard (faint or
    small sources) and narrow where they are easy. Each auxiliary uses the held-out rows where it
    is observed, so missing values in training data are simply left out.

    Buffers (saved with the model): ``fitted`` ``(k,)``, ``feature_loc``/``feature_scale``
    ``(f,)``, ``mean_coef``/``log_scale_coef`` ``(k, f + 1)``, ``quantiles`` ``(k, 201)`` (of
    :math:`\\hat F_j` at ``linspace(0, 1, 201)``) and ``num_calibration`` ``(k,)``.

    Parameters
    ----------
    aux_dim, residual_dim : int
        Sizes of the guided and residual blocks.
    """

    def __init__(self, aux_dim: int, residual_dim: int) -> None:
        super().__init__()
        d = 2 * aux_dim + residual_dim
        f = d + d * (d + 1) // 2
        self.aux_dim = aux_dim
        self.linear_features = d
        self.register_buffer("fitted", torch.zeros(aux_dim, dtype=torch.bool))
        self.register_buffer("feature_loc", torch.zeros(f, dtype=torch.float64))
        self.register_buffer("feature_scale", torch.ones(f, dtype=torch.float64))
        self.register_buffer("mean_coef", torch.zeros(aux_dim, f + 1, dtype=torch.float64))
        self.register_buffer("log_scale_coef", torch.zeros(aux_dim, f + 1, dtype=torch.float64))
        self.register_buffer("quantiles", torch.zeros(aux_dim, QUANTILE_GRID, dtype=torch.float64))
        self.register_buffer("num_calibration", torch.zeros(aux_dim, dtype=torch.long))

    def _design(self, features: torch.Tensor) -> torch.Tensor:
        loc, scale = self.feature_loc.cpu(), self.feature_scale.cpu()
        standardized = (features.double().cpu() - loc) / scale
        return torch.cat([torch.ones_like(standardized[:, :1]), standardized], -1)

    def reset(self) -> None:
        """Forget the calibration (``fitted`` all False)."""
        for name, buffer in self.named_buffers():
            if name == "feature_scale":
                buffer.fill_(1.0)
            else:
                buffer.zero_()

    @torch.no_grad()
    def fit(
        self,
        train_features: torch.Tensor,
        train_targets: torch.Tensor,
        held_features: torch.Tensor,
        held_targets: torch.Tensor,
    ) -> list[int]:
        """Fit the read-out on training rows and the scale and error law on held-out rows.

        Parameters
        ----------
        train_features, held_features : Tensor, shape ``(n, f)``
            :func:`encoding_features` of the training and held-out images.
        train_targets, held_targets : Tensor, shape ``(n, aux_dim)``
            Standardized auxiliaries, ``NaN`` where missing.

        Returns
        -------
        list of int
            The auxiliaries left uncalibrated (fewer than :data:`MIN_CALIBRATION_ROWS` held-out
            rows, or fewer than 2 training rows, with an observed value).
        """
        self.reset()
        train_features = train_features.double().cpu()
        held_features = held_features.double().cpu()
        train_targets = train_targets.double().cpu()
        held_targets = held_targets.double().cpu()
        loc = train_features.mean(0)
        scale = train_features.std(0)
        self.feature_loc.copy_(loc)
        self.feature_scale.copy_(torch.where(scale > 1e-12, scale, torch.ones_like(scale)))
        train_x = self._design(train_features)[:, 1:]
        held_x = self._design(held_features)[:, 1:]
        grid = torch.linspace(0.0, 1.0, QUANTILE_GRID, dtype=torch.float64)
        skipped = []
        for j in range(self.aux_dim):
            seen_train = torch.isfinite(train_targets[:, j])
            seen_held = torch.isfinite(held_targets[:, j])
            n_held = int(seen_held.sum())
            if n_held < MIN_CALIBRATION_ROWS or int(seen_train.sum()) < 2:
                skipped.append(j)
                continue
            mean_coef = _ridge(train_x[seen_train], train_targets[seen_train, j], _MEAN_RIDGE)
            x = held_x[seen_held]
            design = torch.cat([x.new_ones(x.shape[0], 1), x], -1)
            error = held_targets[seen_held, j] - design @ mean_coef
            fold = torch.arange(n_held) % _FOLDS
            best = None
            for columns in (0, self.linear_features, x.shape[1]):  # constant, linear, quadratic
                log_scale = torch.empty(n_held, dtype=torch.float64)
                for k in range(_FOLDS):
                    out = fold == k
                    coef = _fit_log_scale(x[~out, :columns], error[~out], _SCALE_RIDGE)
                    log_scale[out] = design[out, : columns + 1] @ coef
                studentized = error * torch.exp(-log_scale)
                score = float((log_scale + 0.5 * studentized**2).mean())  # out-of-fold log score
                if best is None or score < best[0]:
                    best = (score, columns, studentized)
            _, columns, studentized = best
            coef = torch.zeros(x.shape[1] + 1, dtype=torch.float64)
            coef[: columns + 1] = _fit_log_scale(x[:, :columns], error, _SCALE_RIDGE)
            self.mean_coef[j] = mean_coef.to(self.mean_coef)
            self.log_scale_coef[j] = coef.to(self.mean_coef)
            self.quantiles[j] = torch.quantile(studentized, grid).to(self.quantiles)
            self.num_calibration[j] = n_held
            self.fitted[j] = True
        return skipped

    @torch.no_grad()
    def predict(
        self,
        features: torch.Tensor,
        probabilities: Sequence[float] | torch.Tensor,
        *,
        conformal: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Read-out ``mu`` and quantiles ``mu + sigma F^{-1}(p')`` (standardized units).

        Parameters
        ----------
        features : Tensor, shape ``(n, f)``
        probabilities : sequence of float in ``[0, 1]``
            Levels ``p`` of the quantiles.
        conformal : bool
            Move each level away from 1/2 by the factor ``(n_j + 1) / n_j`` (clipped to
            ``[0, 1]``), the finite-sample correction of interval bounds; off for the quantiles
            that moments are computed from.

        Returns
        -------
        mu : Tensor, float64, shape ``(n, aux_dim)``
        quantiles : Tensor, float64, shape ``(n, aux_dim, len(probabilities))``
            ``NaN`` for an auxiliary that is not calibrated.
        """
        design = self._design(features)
        mu = design @ self.mean_coef.cpu().T
        sigma = torch.exp(design @ self.log_scale_coef.cpu().T)
        p = torch.as_tensor(probabilities, dtype=torch.float64).reshape(-1)
        count = self.num_calibration.cpu().double().clamp_min(1.0)[:, None]
        factor = (count + 1.0) / count if conformal else torch.ones_like(count)
        adjusted = (0.5 + (p[None, :] - 0.5) * factor).clamp(0.0, 1.0)
        position = adjusted * (QUANTILE_GRID - 1)
        lower = position.floor().long().clamp(max=QUANTILE_GRID - 2)
        weight = position - lower
        table = self.quantiles.cpu()
        values = (
            torch.gather(table, 1, lower) * (1 - weight)
            + torch.gather(table, 1, lower + 1) * weight
        )  # (aux_dim, len(p))
        quantiles = mu[:, :, None] + sigma[:, :, None] * values[None]
        unfitted = ~self.fitted.cpu()
        quantiles[:, unfitted] = math.nan
        mu[:, unfitted] = math.nan
        return mu, quantiles


def quantile_label(p: float) -> str:
    """Suffix of the variable ``predict_aux`` reports for quantile ``p`` (``0.05 -> "q05"``)."""
    return f"q{100 * p:02g}".replace(".", "_")


def interval_probabilities(levels: Sequence[float] = COVERAGE_LEVELS) -> list[float]:
    """The quantile levels that bound the central intervals of ``levels``, in increasing order."""
    tails = sorted({(1 - level) / 2 for level in levels})
    return tails + [1 - p for p in reversed(tails)]


def interval_bounds(predicted: Any, name: str, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Bounds of the central ``level`` interval of ``name`` in ``predict_aux`` output."""
    lower = predicted[f"{name}_{quantile_label((1 - level) / 2)}"].values
    upper = predicted[f"{name}_{quantile_label((1 + level) / 2)}"].values
    return lower, upper


def coverage(truth: Any, lower: Any, upper: Any) -> float:
    """Fraction of finite ``truth`` values with ``lower <= truth <= upper`` (NaN if none)."""
    truth, lower, upper = (np.asarray(a, dtype=np.float64) for a in (truth, lower, upper))
    seen = np.isfinite(truth)
    if not seen.any():
        return math.nan
    return float(np.mean((lower[seen] <= truth[seen]) & (truth[seen] <= upper[seen])))


def interval_hits(draws: Any, truth: Any, level: float = 0.9) -> np.ndarray:
    """Whether each truth lies in the central ``level`` interval of its posterior draws.

    Parameters
    ----------
    draws : array-like, shape ``(n, k)``
        ``n`` posterior draws of ``k`` parameters.
    truth : array-like, shape ``(k,)``
        The true parameters.
    level : float, default 0.9
        Probability of the central interval, between the ``(1 - level) / 2`` and
        ``(1 + level) / 2`` quantiles of the draws.

    Returns
    -------
    numpy.ndarray of bool, shape ``(k,)``
        ``True`` where the truth lies inside its interval (ends included); averaged over many
        problems drawn from the prior, this is the coverage of the intervals.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"expected 0 < level < 1, got {level!r}")
    lo, hi = np.quantile(np.asarray(draws), [(1 - level) / 2, (1 + level) / 2], axis=0)
    truth = np.asarray(truth)
    return (lo <= truth) & (truth <= hi)


def binomial_band(
    n: int, level: float, alpha: float = 0.01, *, calibration_rows: int | None = None
) -> tuple[float, float]:
    """Central ``1 - alpha`` range of the coverage of ``n`` truths by intervals of ``level``.

    An empirical coverage outside ``[lo, hi]`` rejects calibration at level ``alpha``. With
    ``calibration_rows``, the intervals were calibrated on that many held-out rows, whose own
    sampling error moves the true coverage by about ``sqrt(level (1 - level) / (rows + 2))``
    (the Beta law of split-conformal coverage); the band then adds that variance to the
    binomial one (normal approximation).
    """
    if n < 1:
        raise ValueError(f"expected n >= 1, got {n!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"expected 0 < level < 1, got {level!r}")
    if calibration_rows is None:
        lo, hi = scipy.stats.binom.interval(1.0 - alpha, int(n), float(level))
        return float(lo) / n, float(hi) / n
    variance = level * (1.0 - level) * (1.0 / n + 1.0 / (calibration_rows + 2))
    half = scipy.stats.norm.ppf(1.0 - alpha / 2) * math.sqrt(variance)
    return max(level - half, 0.0), min(level + half, 1.0)


def calibration_summary(
    truth: Any,
    mean: Any,
    sd: Any,
    intervals: Mapping[float, tuple[Any, Any]],
) -> dict[str, Any]:
    """Coverage and sharpness of one auxiliary's reported uncertainty on held-out truths.

    Parameters
    ----------
    truth, mean, sd : array-like, shape ``(n,)``
        True values (``NaN`` = missing, left out), reported means and sds.
    intervals : mapping of level to (lower, upper)
        Reported central intervals.

    Returns
    -------
    dict
        ``n``; ``coverage`` (level -> empirical coverage of the reported intervals);
        ``gaussian_coverage`` (level -> coverage of ``mean ± z sd``); ``rms_z_score``
        (1 when the sd matches the error); ``mean_sd``; ``rmse``; ``sd_over_rmse`` (mean sd
        over the RMS error: at most about 1 for a sharp, calibrated sd); ``spearman_sd_error``
        (rank correlation of the sd with the absolute error: 0 for a constant sd).
    """
    truth, mean, sd = (np.asarray(a, dtype=np.float64) for a in (truth, mean, sd))
    seen = np.isfinite(truth) & np.isfinite(mean) & np.isfinite(sd)
    n = int(seen.sum())
    result: dict[str, Any] = {"n": n}
    if n < 2:
        return result | {
            "coverage": {},
            "gaussian_coverage": {},
            "rms_z_score": None,
            "mean_sd": None,
            "rmse": None,
            "sd_over_rmse": None,
            "spearman_sd_error": None,
        }
    error = truth[seen] - mean[seen]
    scale = sd[seen]
    rmse = float(np.sqrt(np.mean(error**2)))
    result["coverage"] = {
        float(level): coverage(truth[seen], np.asarray(lo)[seen], np.asarray(hi)[seen])
        for level, (lo, hi) in intervals.items()
    }
    result["gaussian_coverage"] = {
        float(level): float(np.mean(np.abs(error) <= scipy.stats.norm.ppf(0.5 + level / 2) * scale))
        for level in intervals
    }
    result["rms_z_score"] = float(np.sqrt(np.mean((error / scale) ** 2)))
    result["mean_sd"] = float(np.mean(scale))
    result["rmse"] = rmse
    result["sd_over_rmse"] = float(np.mean(scale) / rmse) if rmse > 0 else None
    constant = np.ptp(scale) == 0 or np.ptp(np.abs(error)) == 0
    result["spearman_sd_error"] = (
        0.0 if constant else float(scipy.stats.spearmanr(scale, np.abs(error))[0])
    )
    return result


def sbc_ranks(truth: Any, draws: Any) -> np.ndarray:
    """Simulation-based calibration ranks: how many posterior draws fall below each truth.

    Parameters
    ----------
    truth : array-like, shape ``(n, k)``
        True parameters of ``n`` problems drawn from the prior.
    draws : array-like, shape ``(n, L, k)``
        ``L`` posterior draws of each problem.

    Returns
    -------
    numpy.ndarray of int, shape ``(n, k)``
        Ranks in ``0 .. L``: uniform over them when the posteriors are exact (Talts et al., 2018).
    """
    truth = np.asarray(truth, dtype=np.float64)
    draws = np.asarray(draws, dtype=np.float64)
    if draws.ndim != 3 or truth.shape != (draws.shape[0], draws.shape[2]):
        raise ValueError(
            f"expected truth (n, k) and draws (n, L, k), got {truth.shape} and {draws.shape}"
        )
    return (draws < truth[:, None, :]).sum(1)


def rank_uniformity_pvalue(ranks: Any, num_draws: int, bins: int = 10) -> np.ndarray:
    """Chi-square p-value of uniform SBC ranks, per parameter, with ``bins`` equal rank bins.

    ``num_draws + 1`` must be a multiple of ``bins`` so that every bin holds as many ranks.
    """
    ranks = np.asarray(ranks)
    if (num_draws + 1) % bins:
        raise ValueError(f"expected num_draws + 1 a multiple of bins={bins}, got {num_draws}")
    ranks = ranks.reshape(ranks.shape[0], -1)
    counts = np.stack(
        [np.bincount(r * bins // (num_draws + 1), minlength=bins) for r in ranks.T.astype(int)]
    )
    return scipy.stats.chisquare(counts, axis=1).pvalue
