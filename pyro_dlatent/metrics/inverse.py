"""Inverse-problem metrics: the error of estimates and the coverage of posterior intervals."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from pyro_dlatent.metrics._arrays import _to_numpy

__all__ = ["interval_coverage", "relative_l2_error"]


def relative_l2_error(estimate: ArrayLike, truth: ArrayLike) -> np.ndarray:
    """Per-sample relative L2 error :math:`\\|\\hat x_s - x_s\\|_2 / \\|x_s\\|_2`.

    Parameters
    ----------
    estimate : array-like, shape ``(batch, *dims)``
        Estimates, one per row.
    truth : array-like, shape ``(batch, *dims)`` or ``dims``
        Truths; a single truth without the batch dimension is compared with every estimate.

    Returns
    -------
    numpy.ndarray, shape ``(batch,)``
    """
    est = _to_numpy(estimate, "estimate")
    tru = _to_numpy(truth, "truth")
    if est.ndim < 1:
        raise ValueError(f"expected estimate of shape (batch, *dims), got shape {est.shape}")
    if tru.shape == est.shape[1:]:
        tru = np.broadcast_to(tru, est.shape)
    if tru.shape != est.shape:
        raise ValueError(
            f"expected truth of shape {est.shape} or {est.shape[1:]}, got shape {tru.shape}"
        )
    num = est.reshape(est.shape[0], -1) - tru.reshape(tru.shape[0], -1)
    norm_truth = np.linalg.norm(tru.reshape(tru.shape[0], -1), axis=1)
    if np.any(norm_truth == 0):
        raise ValueError("expected truth with a nonzero norm in every sample, got a zero truth")
    return np.linalg.norm(num, axis=1) / norm_truth


def interval_coverage(samples: ArrayLike, truth: ArrayLike, level: float = 0.9) -> np.ndarray:
    """Fraction of truths inside the central posterior interval, per parameter.

    For case :math:`c` with posterior draws :math:`\\theta^{(s)}_c`, the central interval at
    level :math:`\\gamma` runs between the empirical quantiles :math:`(1 - \\gamma)/2` and
    :math:`(1 + \\gamma)/2` of the draws, and

    .. math:: \\mathrm{coverage} = \\frac{1}{C} \\sum_{c=1}^{C}
        \\mathbf 1\\big[q_{(1-\\gamma)/2, c} \\le \\theta^{true}_c \\le q_{(1+\\gamma)/2, c}\\big].

    For calibrated posteriors it is :math:`\\gamma` up to binomial error
    :math:`\\sqrt{\\gamma(1 - \\gamma)/C}`.

    Parameters
    ----------
    samples : array-like, shape ``(num_draws, num_cases, *param_shape)``
        Posterior draws for each case (e.g. each simulated inverse problem).
    truth : array-like, shape ``(num_cases, *param_shape)``
        True parameter of each case.
    level : float
        Interval level :math:`\\gamma` in ``(0, 1)``.

    Returns
    -------
    numpy.ndarray, shape ``param_shape``
    """
    if not (isinstance(level, int | float) and 0 < level < 1):
        raise ValueError(f"expected 0 < level < 1, got {level}")
    draws = _to_numpy(samples, "samples")
    tru = _to_numpy(truth, "truth")
    if draws.ndim < 2 or draws.shape[1:] != tru.shape:
        raise ValueError(
            "expected samples of shape (num_draws, *truth.shape) with truth of shape "
            f"(num_cases, *param_shape), got {draws.shape} and {tru.shape}"
        )
    lower, upper = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return ((lower <= tru) & (tru <= upper)).mean(axis=0)
