"""Disentanglement, alignment, sample-fidelity and inverse-problem metrics as pure array functions.

Conventions
-----------
Representations are arrays ``latents`` of shape ``(n, d)``; ground-truth factors or auxiliary
variables are arrays ``factors``/``aux`` of shape ``(n, k)``. A 1-d array is read as one column.
Torch tensors are accepted and converted to float64 numpy arrays.

Columns with zero variance (constant up to rounding) carry no information: every correlation with
them is defined as 0, so no metric returns NaN for a collapsed latent. Factors that are constant
are left out of the averages over factors; if every factor is constant the scores are 0.

Polynomial lifts
----------------
Several metrics compare variables after a *polynomial lift* (:func:`polynomial_lift`), so that
dependence that is invisible to Pearson correlation (``u`` and ``u**2`` for a symmetric ``u``)
is still seen. Because each variable is standardized before it is raised to powers, every
lifted quantity here is invariant to positive affine maps ``x -> a x + b`` (``a > 0``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import linear_sum_assignment
from scipy.stats import rankdata, wasserstein_distance

__all__ = [
    "AlignmentResult",
    "DCIResult",
    "LeakageResult",
    "alignment",
    "auroc",
    "dci",
    "interval_coverage",
    "leakage",
    "mcc",
    "mig",
    "pixel_histogram_distance",
    "polynomial_lift",
    "power_spectrum_error",
    "radial_power_spectrum",
    "radial_profile",
    "radial_profile_error",
    "relative_l2_error",
    "sap",
]

_CONSTANT_SPREAD = 1e-12
"""A column whose range, relative to its largest magnitude, is below this is treated as constant."""


# ---------------------------------------------------------------------------------- helpers
def _to_numpy(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a numeric array, got {type(x).__name__}") from err
    if not np.isfinite(arr).all():
        raise ValueError(f"expected finite values in {name}, got NaN or infinite entries")
    return arr


def _as_columns(x: Any, name: str, min_rows: int = 2) -> np.ndarray:
    """Return ``x`` as a finite float64 array of shape ``(n, columns)``."""
    arr = _to_numpy(x, name)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"expected {name} of shape (n, columns), got shape {arr.shape}")
    if arr.shape[0] < min_rows:
        raise ValueError(f"expected at least {min_rows} rows in {name}, got {arr.shape[0]}")
    if arr.shape[1] < 1:
        raise ValueError(f"expected at least one column in {name}, got shape {arr.shape}")
    return arr


def _check_same_rows(**arrays: np.ndarray) -> None:
    rows = {name: a.shape[0] for name, a in arrays.items()}
    if len(set(rows.values())) != 1:
        raise ValueError(f"expected the same number of rows (samples), got {rows}")


def _check_degree(degree: int) -> int:
    if isinstance(degree, bool) or int(degree) != degree or degree < 1:
        raise ValueError(f"expected degree >= 1 (an integer), got {degree}")
    return int(degree)


def _constant_columns(x: np.ndarray) -> np.ndarray:
    """Boolean mask ``(columns,)`` of columns that are constant up to rounding."""
    scale = np.max(np.abs(x), axis=0)
    safe = np.where(scale > 0, scale, 1.0)
    spread = np.ptp(x / safe, axis=0)
    return spread <= _CONSTANT_SPREAD


def _standardize(x: np.ndarray) -> np.ndarray:
    """Center and scale each column to unit (population) variance; constant columns become 0.

    Columns are first divided by their largest magnitude so that any finite input, however
    large or small, is standardized without overflow.
    """
    constant = _constant_columns(x)
    scale = np.max(np.abs(x), axis=0)
    y = x / np.where(scale > 0, scale, 1.0)
    y = y - y.mean(axis=0)
    std = y.std(axis=0)
    ok = ~constant & (std > 0)
    out = np.zeros_like(y)
    out[:, ok] = y[:, ok] / std[ok]
    return out


def _correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation matrix ``(a.shape[1], b.shape[1])``; 0 for constant columns."""
    corr = _standardize(a).T @ _standardize(b) / a.shape[0]
    return np.clip(corr, -1.0, 1.0)


def _orthonormal_basis(x: np.ndarray) -> np.ndarray:
    """Orthonormal basis ``(n, rank)`` of the span of the standardized columns of ``x``."""
    xs = _standardize(x)
    u, s, _ = np.linalg.svd(xs, full_matrices=False)
    if s.size == 0 or s[0] == 0:
        return u[:, :0]
    tol = s[0] * max(xs.shape) * np.finfo(np.float64).eps
    return u[:, s > tol]


def _first_canonical_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Largest canonical correlation between the column spans of ``a`` and ``b``."""
    qa, qb = _orthonormal_basis(a), _orthonormal_basis(b)
    if qa.shape[1] == 0 or qb.shape[1] == 0:
        return 0.0
    return float(np.clip(np.linalg.svd(qa.T @ qb, compute_uv=False)[0], 0.0, 1.0))


def _multiple_r2(target: np.ndarray, predictors: np.ndarray) -> float:
    """In-sample R² of a least-squares fit of ``target (n,)`` on ``[1, predictors]``."""
    q = _orthonormal_basis(predictors)
    t = _standardize(target[:, None])[:, 0]
    if q.shape[1] == 0 or not t.any():
        return 0.0
    coef = q.T @ t
    return float(np.clip(coef @ coef / (t @ t), 0.0, 1.0))


def _names(names: Sequence[str] | None, count: int, prefix: str) -> list[str]:
    if names is None:
        return [f"{prefix}_{j}" for j in range(count)]
    names = [str(n) for n in names]
    if len(names) != count:
        raise ValueError(f"expected {count} names (one per column), got {len(names)}")
    if len(set(names)) != len(names):
        raise ValueError(f"expected unique names, got {names}")
    return names


def _entropy_normalized(p: np.ndarray, base: int) -> float:
    """Entropy of the distribution ``p`` in units of ``log(base)``; 0 when ``base <= 1``."""
    if base <= 1:
        return 0.0
    p = p[p > 0]
    return float(-(p * np.log(p)).sum() / math.log(base))


# ---------------------------------------------------------------------------------- lifts
def polynomial_lift(x: ArrayLike, degree: int = 2) -> np.ndarray:
    """Standardized polynomial features ``[x, x^2, ..., x^K]`` of each column.

    Each column ``x_i`` is first standardized to :math:`s_i = (x_i - \\bar x_i)/\\sigma_i`, then
    raised to the powers :math:`p = 1, \\dots, K` and each power is standardized again:

    .. math:: L(x)_{i K + p - 1} = \\operatorname{std}\\big(s_i^{\\,p}\\big),
        \\qquad \\operatorname{std}(y) = (y - \\bar y) / \\sigma_y .

    Standardizing before taking powers keeps the features well conditioned and makes the lift
    invariant to positive affine maps of each column. Columns with zero variance (and powers
    that happen to be constant, such as :math:`s^2` for a variable taking two symmetric values)
    are returned as zeros.

    Parameters
    ----------
    x : array-like, shape ``(n,)`` or ``(n, d)``
        Samples in rows.
    degree : int
        Highest power :math:`K \\ge 1`.

    Returns
    -------
    numpy.ndarray, shape ``(n, d * degree)``
        Variable-major: columns ``i * K .. i * K + K - 1`` hold the powers ``1..K`` of column
        ``i`` (the layout of :func:`pyro_dlatent.penalties.polynomial_lift` reshaped to
        ``(n, d * K)``).

    Examples
    --------
    >>> polynomial_lift([-1.0, 0.0, 1.0], degree=2).round(3).tolist()
    [[-1.225, 0.707], [0.0, -1.414], [1.225, 0.707]]
    """
    degree = _check_degree(degree)
    s = _standardize(_as_columns(x, "x"))
    powers = s[:, :, None] ** np.arange(1, degree + 1)
    return _standardize(powers.reshape(s.shape[0], -1))


# ---------------------------------------------------------------------------------- alignment
@dataclass
class AlignmentResult:
    """How well each guided latent coordinate tracks its auxiliary variable.

    Attributes
    ----------
    names : list of str
        Auxiliary names, in column order.
    degree : int
        Degree of the polynomial lift.
    pearson_r : numpy.ndarray, shape ``(m,)``
        :math:`r_j = \\operatorname{corr}(z_j, u_j)`.
    r2_linear : numpy.ndarray, shape ``(m,)``
        R² of the least-squares line of :math:`u_j` on :math:`z_j`, equal to :math:`r_j^2`.
    r2_poly : numpy.ndarray, shape ``(m,)``
        R² of the least-squares fit of :math:`u_j` on :math:`[1, z_j, \\dots, z_j^K]`.
    poly_corr : numpy.ndarray, shape ``(m,)``
        First canonical correlation between the lifts :math:`L(z_j)` and :math:`L(u_j)`.
    cross_correlation : numpy.ndarray, shape ``(m, m)``
        Signed :math:`\\operatorname{corr}(z_j, u_k)`; row ``j`` is latent ``j``.
    """

    names: list[str]
    degree: int
    pearson_r: np.ndarray
    r2_linear: np.ndarray
    r2_poly: np.ndarray
    poly_corr: np.ndarray
    cross_correlation: np.ndarray

    @property
    def off_diagonal(self) -> np.ndarray:
        """:math:`|\\operatorname{corr}(z_j, u_k)|` for :math:`j \\ne k`, flattened."""
        m = len(self.names)
        return np.abs(self.cross_correlation[~np.eye(m, dtype=bool)])

    @property
    def max_off_diagonal(self) -> float:
        """Largest :math:`|\\operatorname{corr}(z_j, u_k)|` over :math:`j \\ne k` (0 if m = 1)."""
        off = self.off_diagonal
        return float(off.max()) if off.size else 0.0

    @property
    def mean_off_diagonal(self) -> float:
        """Mean :math:`|\\operatorname{corr}(z_j, u_k)|` over :math:`j \\ne k` (0 if m = 1)."""
        off = self.off_diagonal
        return float(off.mean()) if off.size else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary: one entry per variable plus the cross terms."""
        return {
            "degree": self.degree,
            "variables": {
                name: {
                    "pearson_r": float(self.pearson_r[j]),
                    "r2_linear": float(self.r2_linear[j]),
                    "r2_poly": float(self.r2_poly[j]),
                    "poly_corr": float(self.poly_corr[j]),
                }
                for j, name in enumerate(self.names)
            },
            "mean_pearson_r": float(self.pearson_r.mean()),
            "max_off_diagonal": self.max_off_diagonal,
            "mean_off_diagonal": self.mean_off_diagonal,
            "cross_correlation": self.cross_correlation.tolist(),
        }


def alignment(
    latents_aux: ArrayLike,
    aux: ArrayLike,
    degree: int = 2,
    *,
    names: Sequence[str] | None = None,
) -> AlignmentResult:
    """Per-variable agreement between the guided latent block and the auxiliaries.

    Guided coordinate :math:`z_j` is paired with auxiliary :math:`u_j`. For each pair:

    - Pearson :math:`r_j = \\operatorname{corr}(z_j, u_j)`;
    - linear :math:`R^2_j = r_j^2`, the R² of the least-squares line of :math:`u_j` on :math:`z_j`;
    - polynomial :math:`R^2_{j,K}`, the R² of the least-squares fit of :math:`u_j` on
      :math:`[1, z_j, z_j^2, \\dots, z_j^K]` (how much of :math:`u_j` a degree-:math:`K`
      polynomial read-out of :math:`z_j` explains);
    - the polynomial-lifted correlation, the first canonical correlation of the lifts
      :math:`L(z_j)` and :math:`L(u_j)` (:func:`polynomial_lift`),

      .. math:: \\rho_{j,K} = \\max_{a, b \\in \\mathbb{R}^K}
          \\operatorname{corr}\\big(L(z_j)\\, a,\\; L(u_j)\\, b\\big) \\in [0, 1],

      the largest correlation between any polynomial of degree :math:`\\le K` in :math:`z_j`
      and any polynomial of degree :math:`\\le K` in :math:`u_j`. For jointly Gaussian
      variables with correlation :math:`\\rho` it equals :math:`|\\rho|`; it reaches 1 when one
      variable is a polynomial of degree :math:`\\le K` in the other.

    The cross terms :math:`\\operatorname{corr}(z_j, u_k)`, :math:`j \\ne k`, measure how much a
    guided coordinate also tracks another auxiliary. All quantities are invariant to positive
    affine maps of each latent coordinate.

    Parameters
    ----------
    latents_aux : array-like, shape ``(n, m)``
        Guided latent coordinates (e.g. posterior means of ``z_aux``).
    aux : array-like, shape ``(n, m)``
        Auxiliary variables, column ``j`` paired with latent ``j``.
    degree : int
        Degree :math:`K` of the polynomial lift.
    names : sequence of str, optional
        Names of the auxiliaries (keys of :meth:`AlignmentResult.to_dict`); default
        ``aux_0, aux_1, ...``.

    Returns
    -------
    AlignmentResult
    """
    degree = _check_degree(degree)
    z = _as_columns(latents_aux, "latents_aux")
    u = _as_columns(aux, "aux")
    _check_same_rows(latents_aux=z, aux=u)
    if z.shape[1] != u.shape[1]:
        raise ValueError(
            f"expected latents_aux and aux with the same number of columns, "
            f"got {z.shape[1]} and {u.shape[1]}"
        )
    labels = _names(names, u.shape[1], "aux")
    cross = _correlation(z, u)
    pearson = np.diag(cross).copy()
    r2_poly = np.empty_like(pearson)
    poly_corr = np.empty_like(pearson)
    for j in range(u.shape[1]):
        lifted_z = polynomial_lift(z[:, j], degree)
        r2_poly[j] = _multiple_r2(u[:, j], lifted_z)
        poly_corr[j] = _first_canonical_correlation(lifted_z, polynomial_lift(u[:, j], degree))
    return AlignmentResult(
        names=labels,
        degree=degree,
        pearson_r=pearson,
        r2_linear=pearson**2,
        r2_poly=r2_poly,
        poly_corr=poly_corr,
        cross_correlation=cross,
    )


# ---------------------------------------------------------------------------------- leakage
@dataclass
class LeakageResult:
    """Correlation between the lifted residual block and the lifted auxiliaries.

    Attributes
    ----------
    degree : int
        Degree of the polynomial lift.
    names : list of str
        Auxiliary names.
    matrix : numpy.ndarray, shape ``(r * degree, m * degree)``
        :math:`|\\operatorname{corr}(L(z_{rec})_a, L(u)_b)|`; rows and columns are ordered as in
        :func:`polynomial_lift` (variable-major) and labelled by :attr:`row_labels` and
        :attr:`column_labels`.
    """

    degree: int
    names: list[str]
    matrix: np.ndarray
    residual_dim: int = field(init=False)

    def __post_init__(self) -> None:
        self.residual_dim = self.matrix.shape[0] // self.degree

    @property
    def max_abs_corr(self) -> float:
        """Largest entry of :attr:`matrix`: the leakage score, in ``[0, 1]``."""
        return float(self.matrix.max())

    @property
    def mean_abs_corr(self) -> float:
        """Mean entry of :attr:`matrix` (the quantity the decorrelation penalty targets)."""
        return float(self.matrix.mean())

    @property
    def by_pair(self) -> np.ndarray:
        """Shape ``(r, m)``: largest entry over powers for each (residual, auxiliary) pair."""
        r, m, k = self.residual_dim, len(self.names), self.degree
        return self.matrix.reshape(r, k, m, k).max(axis=(1, 3))

    @property
    def row_labels(self) -> list[str]:
        """Labels ``z_rec[i]^p`` of the rows of :attr:`matrix`."""
        return [
            f"z_rec[{i}]^{p}" for i in range(self.residual_dim) for p in range(1, self.degree + 1)
        ]

    @property
    def column_labels(self) -> list[str]:
        """Labels ``name^p`` of the columns of :attr:`matrix`."""
        return [f"{n}^{p}" for n in self.names for p in range(1, self.degree + 1)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary with the full matrix and its labels."""
        return {
            "degree": self.degree,
            "max_abs_corr": self.max_abs_corr,
            "mean_abs_corr": self.mean_abs_corr,
            "by_pair": {name: self.by_pair[:, j].tolist() for j, name in enumerate(self.names)},
            "row_labels": self.row_labels,
            "column_labels": self.column_labels,
            "matrix": self.matrix.tolist(),
        }


def leakage(
    latents_rec: ArrayLike,
    aux: ArrayLike,
    degree: int = 2,
    *,
    names: Sequence[str] | None = None,
) -> LeakageResult:
    """How much the residual latent block still knows about the auxiliaries.

    .. math:: \\ell_K = \\max_{a, b} \\big|\\operatorname{corr}\\big(L(z_{rec})_a,
        L(u)_b\\big)\\big|,

    with :math:`L` the polynomial lift of degree :math:`K` (:func:`polynomial_lift`). With
    :math:`K \\ge 2` this sees dependence such as :math:`z_{rec} \\approx u^2` that Pearson
    correlation misses. For a residual block independent of :math:`u`, every entry is of order
    :math:`1/\\sqrt{n}`.

    Parameters
    ----------
    latents_rec : array-like, shape ``(n, r)``
        Residual latent coordinates.
    aux : array-like, shape ``(n, m)``
        Auxiliary variables.
    degree : int
        Degree :math:`K` of the polynomial lift.
    names : sequence of str, optional
        Names of the auxiliaries; default ``aux_0, aux_1, ...``.

    Returns
    -------
    LeakageResult
        ``.max_abs_corr`` is :math:`\\ell_K`; ``.matrix`` shows where it leaks.
    """
    degree = _check_degree(degree)
    z = _as_columns(latents_rec, "latents_rec")
    u = _as_columns(aux, "aux")
    _check_same_rows(latents_rec=z, aux=u)
    labels = _names(names, u.shape[1], "aux")
    matrix = np.abs(_correlation(polynomial_lift(z, degree), polynomial_lift(u, degree)))
    return LeakageResult(degree=degree, names=labels, matrix=matrix)


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


# ---------------------------------------------------------------------------------- fidelity
def _as_images(images: Any, name: str) -> np.ndarray:
    """Return ``images`` as ``(num_images, h, w)`` float64, flattening leading dimensions."""
    arr = _to_numpy(images, name)
    if arr.ndim < 2:
        raise ValueError(f"expected {name} of shape (..., h, w), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"expected non-empty {name}, got shape {arr.shape}")
    return arr.reshape(-1, *arr.shape[-2:])


def _annulus_average(
    values: np.ndarray, radius: np.ndarray, bins: np.ndarray, num_bins: int
) -> tuple[np.ndarray, np.ndarray]:
    """Mean radius ``(b,)`` and per-image mean value ``(num_images, b)`` in each non-empty bin."""
    keep = (bins >= 0) & (bins < num_bins)
    idx = bins[keep]
    counts = np.bincount(idx, minlength=num_bins)
    nonempty = counts > 0
    mean_radius = np.bincount(idx, weights=radius[keep], minlength=num_bins)[nonempty]
    mean_radius = mean_radius / counts[nonempty]
    flat = values[:, keep]
    sums = np.stack([np.bincount(idx, weights=row, minlength=num_bins) for row in flat])
    return mean_radius, sums[:, nonempty] / counts[nonempty]


def radial_power_spectrum(
    images: ArrayLike, *, average: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Azimuthally averaged power spectrum.

    For an image :math:`x` of shape ``(h, w)`` with discrete Fourier transform :math:`\\hat x`,
    the power :math:`P(\\mathbf k) = |\\hat x(\\mathbf k)|^2 / (h w)` (so white noise of variance
    :math:`\\sigma^2` has :math:`E\\,P = \\sigma^2` at every :math:`\\mathbf k \\ne 0`) is averaged
    over annuli of width :math:`\\Delta k = 1/\\min(h, w)` cycles per pixel, centred on
    multiples of :math:`\\Delta k`, up to the Nyquist frequency of the shorter side.

    Parameters
    ----------
    images : array-like, shape ``(..., h, w)``
        One image or a batch; leading dimensions are flattened.
    average : bool
        Return the mean spectrum over images (default) or one spectrum per image.

    Returns
    -------
    wavenumbers : numpy.ndarray, shape ``(b,)``
        Mean :math:`|\\mathbf k|` of the modes in each annulus, in cycles per pixel
        (the first is 0, the mean level).
    power : numpy.ndarray, shape ``(b,)`` or ``(num_images, b)``
    """
    x = _as_images(images, "images")
    _, h, w = x.shape
    power = np.abs(np.fft.fft2(x)) ** 2 / (h * w)
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij"))
    step = 1.0 / min(h, w)
    bins = np.rint(k / step).astype(np.int64)
    wavenumbers, spectra = _annulus_average(
        power.reshape(len(x), -1), k.ravel(), bins.ravel(), min(h, w) // 2 + 1
    )
    return wavenumbers, spectra.mean(axis=0) if average else spectra


def _mean_relative_error(generated: np.ndarray, reference: np.ndarray) -> float:
    """Mean of ``|g - r| / |r|`` over bins; bins where both are 0 count 0, ``r = 0 != g`` is inf."""
    diff = np.abs(generated - reference)
    ref = np.abs(reference)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(diff == 0, 0.0, diff / ref)
    return float(rel.mean())


def _check_same_image_shape(generated: np.ndarray, reference: np.ndarray) -> None:
    if generated.shape[1:] != reference.shape[1:]:
        raise ValueError(
            "expected generated and reference images of the same (h, w), got "
            f"{generated.shape[1:]} and {reference.shape[1:]}"
        )


def power_spectrum_error(generated: ArrayLike, reference: ArrayLike) -> float:
    """Mean relative error between the mean radial power spectra of two image sets.

    .. math:: \\epsilon_P = \\frac{1}{b} \\sum_{j=1}^{b}
        \\frac{|\\bar P_{gen}(k_j) - \\bar P_{ref}(k_j)|}{\\bar P_{ref}(k_j)},

    with :math:`\\bar P` the mean spectra of :func:`radial_power_spectrum`. A bin where the
    reference has zero power counts 0 if the generated power is 0 too, and makes the error
    infinite otherwise.

    Parameters
    ----------
    generated : array-like, shape ``(..., h, w)``
    reference : array-like, shape ``(..., h, w)``
        Sets of any sizes, with the same image shape.

    Returns
    -------
    float
        0 for identical spectra.
    """
    gen = _as_images(generated, "generated")
    ref = _as_images(reference, "reference")
    _check_same_image_shape(gen, ref)
    return _mean_relative_error(radial_power_spectrum(gen)[1], radial_power_spectrum(ref)[1])


def pixel_histogram_distance(generated: ArrayLike, reference: ArrayLike) -> float:
    """1-Wasserstein distance between the pixel-value distributions of two image sets.

    .. math:: W_1 = \\int |F_{gen}(t) - F_{ref}(t)|\\, dt,

    with :math:`F` the empirical distribution functions of all pixel values of each set
    (:func:`scipy.stats.wasserstein_distance`). In the units of the pixel values; shifting every
    pixel by :math:`c` gives :math:`|c|`.

    Parameters
    ----------
    generated : array-like, any shape
    reference : array-like, any shape

    Returns
    -------
    float
    """
    gen = _to_numpy(generated, "generated").ravel()
    ref = _to_numpy(reference, "reference").ravel()
    if gen.size == 0 or ref.size == 0:
        raise ValueError("expected non-empty generated and reference arrays")
    return float(wasserstein_distance(gen, ref))


def radial_profile(
    images: ArrayLike,
    center: tuple[float, float] | None = None,
    *,
    max_radius: float | None = None,
    average: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Azimuthally averaged pixel values in annuli of unit width around a center.

    Pixel :math:`(i, j)` lies at radius :math:`r_{ij} = \\sqrt{(i - c_y)^2 + (j - c_x)^2}` (pixel
    units) and belongs to annulus :math:`\\lfloor r_{ij} \\rfloor`; the profile is the mean value
    in each non-empty annulus with :math:`r < r_{max}`.

    Parameters
    ----------
    images : array-like, shape ``(..., h, w)``
        One image or a batch; leading dimensions are flattened.
    center : (float, float), optional
        ``(c_y, c_x)`` in pixel coordinates; default the image center ``((h-1)/2, (w-1)/2)``.
    max_radius : float, optional
        Outer radius :math:`r_{max}` (pixels); default ``min(h, w) / 2``, the largest circle
        inside the image.
    average : bool
        Return the mean profile over images (default) or one profile per image.

    Returns
    -------
    radii : numpy.ndarray, shape ``(b,)``
        Mean pixel radius in each annulus.
    profile : numpy.ndarray, shape ``(b,)`` or ``(num_images, b)``
    """
    x = _as_images(images, "images")
    _, h, w = x.shape
    cy, cx = ((h - 1) / 2, (w - 1) / 2) if center is None else map(float, center)
    if not (math.isfinite(cy) and math.isfinite(cx)):
        raise ValueError(f"expected a finite center, got {center}")
    r_max = min(h, w) / 2 if max_radius is None else float(max_radius)
    if not (math.isfinite(r_max) and r_max > 0):
        raise ValueError(f"expected max_radius > 0, got {max_radius}")
    yy, xx = np.meshgrid(np.arange(h) - cy, np.arange(w) - cx, indexing="ij")
    radius = np.hypot(yy, xx).ravel()
    bins = np.where(radius < r_max, np.floor(radius), -1).astype(np.int64)
    radii, profiles = _annulus_average(x.reshape(len(x), -1), radius, bins, math.ceil(r_max) + 1)
    if radii.size == 0:
        raise ValueError(f"no pixel lies within max_radius={r_max} of center {(cy, cx)}")
    return radii, profiles.mean(axis=0) if average else profiles


def radial_profile_error(
    generated: ArrayLike,
    reference: ArrayLike,
    center: tuple[float, float] | None = None,
    *,
    max_radius: float | None = None,
) -> float:
    """Mean relative error between the mean radial profiles of two image sets.

    .. math:: \\epsilon_r = \\frac{1}{b} \\sum_{j=1}^{b}
        \\frac{|\\bar p_{gen}(r_j) - \\bar p_{ref}(r_j)|}{|\\bar p_{ref}(r_j)|},

    with :math:`\\bar p` the mean profiles of :func:`radial_profile` (same center and radius);
    zero reference bins are handled as in :func:`power_spectrum_error`. Meant for positive
    maps (e.g. Compton-y).

    Parameters
    ----------
    generated, reference : array-like, shape ``(..., h, w)``
    center : (float, float), optional
        See :func:`radial_profile`.
    max_radius : float, optional
        See :func:`radial_profile`.

    Returns
    -------
    float
    """
    gen = _as_images(generated, "generated")
    ref = _as_images(reference, "reference")
    _check_same_image_shape(gen, ref)
    _, p_gen = radial_profile(gen, center, max_radius=max_radius)
    _, p_ref = radial_profile(ref, center, max_radius=max_radius)
    return _mean_relative_error(p_gen, p_ref)


# ------------------------------------------------------------------------------ inverse problems
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


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve of ``scores`` for the binary ``labels`` (higher = positive).

    Computed from ranks as the Mann–Whitney statistic :math:`U / (n_+ n_-)`, ties averaged:
    the probability that a random positive scores above a random negative.

    Parameters
    ----------
    scores : array-like, shape ``(n,)``
    labels : array-like of bool, shape ``(n,)``, with at least one positive and one negative
    """
    scores = _to_numpy(scores, "scores").ravel()
    labels = np.asarray(labels).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels must have the shape of scores {scores.shape}, got {labels.shape}")
    labels = labels.astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("labels must contain both classes")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
