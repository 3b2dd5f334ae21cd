"""Disentanglement scores of a representation against ground-truth factors: MCC, MIG, SAP, DCI.

Each score matches the latents to the factors in its own way and is invariant to permutations
of the latents; the tests check the known answers (identity near 1, zeros 0, a duplicated or
mixed representation low).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import linear_sum_assignment
from scipy.stats import rankdata

from pyro_dlatent.metrics._arrays import (
    _as_columns,
    _check_degree,
    _check_same_rows,
    _constant_columns,
    _correlation,
)
from pyro_dlatent.metrics.lift import polynomial_lift

__all__ = ["DCIResult", "dci", "mcc", "mig", "sap"]


def _entropy_normalized(p: np.ndarray, base: int) -> float:
    """Entropy of the distribution ``p`` in units of ``log(base)``; 0 when ``base <= 1``."""
    if base <= 1:
        return 0.0
    p = p[p > 0]
    return float(-(p * np.log(p)).sum() / math.log(base))


# ---------------------------------------------------------------------------------- MCC
def mcc(latents: ArrayLike, factors: ArrayLike, method: str = "pearson") -> float:
    """Mean correlation coefficient after the best one-to-one matching.

    With :math:`C_{ik} = |\\operatorname{corr}(z_i, v_k)|` (Pearson, or Spearman rank
    correlation), the latents are matched to the factors by the assignment :math:`\\pi` that
    maximizes :math:`\\sum_k C_{\\pi(k) k}` (:func:`scipy.optimize.linear_sum_assignment`), and

    .. math:: \\mathrm{MCC} = \\frac{1}{k'} \\sum_{k} C_{\\pi(k) k},

    where :math:`k'` counts the non-constant factors. When there are fewer latents than
    factors, unmatched factors contribute 0. The score is invariant to permutations, sign
    flips and (with ``"pearson"``) affine maps of the latents, or (with ``"spearman"``) any
    strictly monotone map.

    Parameters
    ----------
    latents : array-like, shape ``(n, d)``
    factors : array-like, shape ``(n, k)``
    method : {"pearson", "spearman"}
        Correlation used in :math:`C`.

    Returns
    -------
    float
        In ``[0, 1]``; 0 when every factor is constant.
    """
    if method not in ("pearson", "spearman"):
        raise ValueError(f"expected method in ('pearson', 'spearman'), got {method!r}")
    z = _as_columns(latents, "latents")
    v = _as_columns(factors, "factors")
    _check_same_rows(latents=z, factors=v)
    informative = ~_constant_columns(v)
    if not informative.any():
        return 0.0
    v = v[:, informative]
    if method == "spearman":
        z, v = rankdata(z, axis=0), rankdata(v, axis=0)
    corr = np.abs(_correlation(z, v))
    rows, cols = linear_sum_assignment(corr, maximize=True)
    return float(np.clip(corr[rows, cols].sum() / v.shape[1], 0.0, 1.0))


# ---------------------------------------------------------------------------------- MIG
def _discretize(x: np.ndarray, num_bins: int) -> np.ndarray:
    """Integer codes of ``x (n,)`` in ``num_bins`` equal-width bins over its range."""
    if _constant_columns(x[:, None])[0]:
        return np.zeros(x.shape[0], dtype=np.int64)
    x = x / np.max(np.abs(x))
    lo, hi = x.min(), x.max()
    codes = np.floor((x - lo) / (hi - lo) * num_bins).astype(np.int64)
    return np.clip(codes, 0, num_bins - 1)


def _codes(x: np.ndarray) -> np.ndarray:
    return np.unique(x, return_inverse=True)[1].reshape(-1)


def _discrete_entropy(codes: np.ndarray) -> float:
    p = np.bincount(codes) / codes.size
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _discrete_mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """Plug-in mutual information (nats) of two integer code arrays."""
    nb = int(b.max()) + 1
    joint = np.bincount(a * nb + b, minlength=(int(a.max()) + 1) * nb).reshape(-1, nb)
    joint = joint / a.size
    pa, pb = joint.sum(axis=1), joint.sum(axis=0)
    nz = joint > 0
    outer = np.outer(pa, pb)
    return float(max(0.0, (joint[nz] * np.log(joint[nz] / outer[nz])).sum()))


def mig(
    latents: ArrayLike,
    factors: ArrayLike,
    num_bins: int = 20,
    *,
    discrete_factors: bool | Sequence[bool] | None = None,
) -> float:
    """Mutual information gap (Chen et al. 2018).

    Latents are discretized into ``num_bins`` equal-width bins over their range; continuous
    factors too. With the plug-in mutual information :math:`I(z_i; v_k)` of the discretized
    variables (nats) and :math:`H(v_k)` the entropy of the discretized factor,

    .. math:: \\mathrm{MIG} = \\frac{1}{k'} \\sum_k \\frac{I(z_{(1)}; v_k) - I(z_{(2)}; v_k)}
        {H(v_k)},

    where :math:`z_{(1)}, z_{(2)}` are the latents with the largest and second-largest
    information about :math:`v_k` (the second is taken as 0 when ``d = 1``) and :math:`k'`
    counts the non-constant factors.

    A perfect representation does not score exactly 1: the plug-in estimate of the
    information between *independent* discretized variables is biased upwards by about
    :math:`(B_z - 1)(B_v - 1) / (2n)` nats (:math:`B` occupied bins), so the identity
    representation with ``num_bins = B`` scores about
    :math:`1 - (B - 1)^2 / (2 n H(v))`, e.g. 0.994 for uniform factors, ``B = 20`` and
    ``n = 10000``. Choose ``num_bins`` well below :math:`\\sqrt{n}`.

    Parameters
    ----------
    latents : array-like, shape ``(n, d)``
    factors : array-like, shape ``(n, k)``
    num_bins : int
        Number of equal-width bins for continuous variables (at least 2).
    discrete_factors : bool or sequence of bool, optional
        Whether each factor is already discrete (used as is). By default a factor is treated
        as discrete when it takes at most ``num_bins`` distinct values.

    Returns
    -------
    float
        In ``[0, 1]``; 0 when every factor is constant.
    """
    if isinstance(num_bins, bool) or int(num_bins) != num_bins or num_bins < 2:
        raise ValueError(f"expected num_bins >= 2 (an integer), got {num_bins}")
    num_bins = int(num_bins)
    z = _as_columns(latents, "latents")
    v = _as_columns(factors, "factors")
    _check_same_rows(latents=z, factors=v)
    k = v.shape[1]
    if discrete_factors is None:
        discrete = [np.unique(v[:, j]).size <= num_bins for j in range(k)]
    elif isinstance(discrete_factors, bool | np.bool_):
        discrete = [bool(discrete_factors)] * k
    else:
        discrete = [bool(flag) for flag in discrete_factors]
        if len(discrete) != k:
            raise ValueError(f"expected {k} discrete_factors flags, got {len(discrete)}")
    z_codes = [_discretize(z[:, i], num_bins) for i in range(z.shape[1])]
    gaps = []
    for j in range(k):
        v_codes = _codes(v[:, j]) if discrete[j] else _discretize(v[:, j], num_bins)
        entropy = _discrete_entropy(v_codes)
        if entropy <= 0:
            continue
        info = sorted((_discrete_mutual_information(c, v_codes) for c in z_codes), reverse=True)
        second = info[1] if len(info) > 1 else 0.0
        gaps.append((info[0] - second) / entropy)
    return float(np.clip(np.mean(gaps), 0.0, 1.0)) if gaps else 0.0


# ---------------------------------------------------------------------------------- SAP
def sap(latents: ArrayLike, factors: ArrayLike) -> float:
    """Separated attribute predictability (Kumar et al. 2018) for continuous factors.

    The predictability of factor :math:`v_k` from latent :math:`z_i` alone is the R² of the
    least-squares line, :math:`S_{ik} = \\operatorname{corr}(z_i, v_k)^2`. The score averages,
    over the non-constant factors, the gap between the best and second-best latent:

    .. math:: \\mathrm{SAP} = \\frac{1}{k'} \\sum_k \\big(S_{(1)k} - S_{(2)k}\\big),

    with :math:`S_{(2)k} = 0` when ``d = 1``.

    Parameters
    ----------
    latents : array-like, shape ``(n, d)``
    factors : array-like, shape ``(n, k)``

    Returns
    -------
    float
        In ``[0, 1]``; 0 when every factor is constant.
    """
    z = _as_columns(latents, "latents")
    v = _as_columns(factors, "factors")
    _check_same_rows(latents=z, factors=v)
    informative = ~_constant_columns(v)
    if not informative.any():
        return 0.0
    score = np.sort(_correlation(z, v[:, informative]) ** 2, axis=0)[::-1]
    second = score[1] if score.shape[0] > 1 else np.zeros(score.shape[1])
    return float(np.clip(np.mean(score[0] - second), 0.0, 1.0))


# ---------------------------------------------------------------------------------- DCI
@dataclass
class DCIResult:
    """Disentanglement, completeness and informativeness (Eastwood & Williams 2018).

    Attributes
    ----------
    disentanglement, completeness, informativeness : float
        The three scores, each in ``[0, 1]``.
    importance : numpy.ndarray, shape ``(d, k)``
        Importance :math:`R_{ik}` of latent ``i`` for factor ``k``.
    informativeness_per_factor : numpy.ndarray, shape ``(k,)``
        Held-out R² of each factor, clipped to ``[0, 1]`` (NaN-free; constant factors get 0).
    """

    disentanglement: float
    completeness: float
    informativeness: float
    importance: np.ndarray
    informativeness_per_factor: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary."""
        return {
            "disentanglement": self.disentanglement,
            "completeness": self.completeness,
            "informativeness": self.informativeness,
            "importance": self.importance.tolist(),
            "informativeness_per_factor": self.informativeness_per_factor.tolist(),
        }


def _ridge(features: np.ndarray, targets: np.ndarray, alpha: float) -> np.ndarray:
    """Coefficients ``(p, k)`` minimizing ``|T - F B|^2 / n + alpha |B|^2`` (centered data)."""
    n, p = features.shape
    gram = features.T @ features / n + alpha * np.eye(p)
    return np.linalg.solve(gram, features.T @ targets / n)


def dci(
    latents: ArrayLike,
    factors: ArrayLike,
    *,
    degree: int = 1,
    alpha: float = 1e-3,
    test_fraction: float = 0.25,
    seed: int | np.random.Generator | None = None,
) -> DCIResult:
    """Disentanglement, completeness and informativeness (Eastwood & Williams 2018).

    The importance matrix comes from a ridge regression of each standardized factor on the
    standardized (and optionally polynomial-lifted) latents, fitted on a random training split:

    .. math:: \\hat B = \\arg\\min_B \\tfrac{1}{n}\\|V - L(Z) B\\|^2 + \\alpha \\|B\\|^2,
        \\qquad R_{ik} = \\sum_{p=1}^{K} |\\hat B_{iK + p - 1,\\, k}|,

    the absolute standardized coefficients (summed over the powers of latent ``i``), the
    linear-model importance used by Eastwood & Williams with their lasso. With
    :math:`P_{ik} = R_{ik} / \\sum_{k'} R_{ik'}` and :math:`\\tilde P_{ik} = R_{ik} / \\sum_{i'}
    R_{i'k}`,

    .. math::

        D = \\sum_i \\rho_i \\big(1 - H_k(P_{i\\cdot})\\big), \\quad
        \\rho_i = \\frac{\\sum_k R_{ik}}{\\sum_{ik} R_{ik}}, \\qquad
        C = \\frac{1}{k'} \\sum_k \\big(1 - H_d(\\tilde P_{\\cdot k})\\big),

    where :math:`H_b` is the entropy in base :math:`b`. Informativeness is the mean held-out
    R² of the same regression on the test split, each clipped to ``[0, 1]``. Latents with no
    importance do not count in :math:`D`; a factor that no latent explains has completeness 0;
    constant factors are left out.

    scikit-learn is not a dependency, so the regressor is this closed-form ridge rather than the
    gradient-boosted trees of disentanglement_lib: it detects linear (or, with ``degree > 1``,
    polynomial) relations only, and it splits importance equally between duplicated latents.

    Parameters
    ----------
    latents : array-like, shape ``(n, d)``
    factors : array-like, shape ``(n, k)``
    degree : int
        Degree of the polynomial lift of the latents used as regression features.
    alpha : float
        Ridge penalty (on standardized features), ``> 0``; keeps the fit defined for collinear
        latents.
    test_fraction : float
        Fraction of the samples held out for informativeness, in ``(0, 1)``.
    seed : int or numpy.random.Generator, optional
        Randomness of the train/test split.

    Returns
    -------
    DCIResult
    """
    degree = _check_degree(degree)
    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"expected alpha > 0, got {alpha}")
    if not (isinstance(test_fraction, int | float) and 0 < test_fraction < 1):
        raise ValueError(f"expected 0 < test_fraction < 1, got {test_fraction}")
    z = _as_columns(latents, "latents", min_rows=4)
    v = _as_columns(factors, "factors", min_rows=4)
    _check_same_rows(latents=z, factors=v)
    n, d = z.shape
    informative = ~_constant_columns(v)
    k_all = v.shape[1]
    importance = np.zeros((d, k_all))
    info_per_factor = np.zeros(k_all)
    if not informative.any():
        return DCIResult(0.0, 0.0, 0.0, importance, info_per_factor)
    # Rescaling each factor by its largest magnitude changes no score and avoids overflow.
    v = v[:, informative] / np.max(np.abs(v[:, informative]), axis=0)
    k = v.shape[1]

    rng = np.random.default_rng(seed)
    num_test = min(max(round(test_fraction * n), 2), n - 2)
    order = rng.permutation(n)
    test, train = order[:num_test], order[num_test:]
    features = polynomial_lift(z, degree)
    f_train, v_train = features[train], v[train]
    f_mean, v_mean = f_train.mean(axis=0), v_train.mean(axis=0)
    f_std = f_train.std(axis=0)
    v_std = v_train.std(axis=0)
    f_std = np.where(f_std > 0, f_std, 1.0)
    v_std = np.where(v_std > 0, v_std, 1.0)
    coef = _ridge((f_train - f_mean) / f_std, (v_train - v_mean) / v_std, float(alpha))

    # Held-out R², computed after dividing by the largest test magnitude (R² is scale free); a
    # factor that is constant on the test split (up to rounding) gets 0.
    v_test = v[test]
    pred = ((features[test] - f_mean) / f_std) @ coef * v_std + v_mean
    test_scale = np.max(np.abs(v_test), axis=0)
    test_scale = np.where(test_scale > 0, test_scale, 1.0)
    with np.errstate(over="ignore"):
        resid = (((v_test - pred) / test_scale) ** 2).sum(axis=0)
        total = (((v_test - v_test.mean(axis=0)) / test_scale) ** 2).sum(axis=0)
        varies = ~_constant_columns(v_test) & (total > 0)
        ratio = resid / np.where(varies, total, 1.0)
    info = np.where(varies, np.clip(1.0 - ratio, 0.0, 1.0), 0.0)

    imp = np.abs(coef).reshape(d, degree, k).sum(axis=1)
    per_latent = imp.sum(axis=1)
    per_factor = imp.sum(axis=0)
    if per_latent.sum() > 0:
        d_scores = np.array(
            [
                1.0 - _entropy_normalized(imp[i] / per_latent[i], k) if per_latent[i] > 0 else 0.0
                for i in range(d)
            ]
        )
        disentanglement = float(d_scores @ (per_latent / per_latent.sum()))
    else:
        disentanglement = 0.0
    c_scores = np.array(
        [
            1.0 - _entropy_normalized(imp[:, j] / per_factor[j], d) if per_factor[j] > 0 else 0.0
            for j in range(k)
        ]
    )
    importance[:, informative] = imp
    info_per_factor[informative] = info
    return DCIResult(
        disentanglement=float(np.clip(disentanglement, 0.0, 1.0)),
        completeness=float(np.clip(c_scores.mean(), 0.0, 1.0)),
        informativeness=float(info.mean()),
        importance=importance,
        informativeness_per_factor=info_per_factor,
    )
