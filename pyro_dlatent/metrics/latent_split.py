"""How the guided/residual latent split relates to the auxiliaries: alignment and leakage.

:func:`alignment` scores how well each guided coordinate tracks its auxiliary variable;
:func:`leakage` scores how much the residual block still knows about the auxiliaries. Both
compare polynomial lifts (:mod:`pyro_dlatent.metrics.lift`), so they see nonlinear dependence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from pyro_dlatent.metrics._arrays import (
    _as_columns,
    _check_degree,
    _check_same_rows,
    _correlation,
    _standardize,
)
from pyro_dlatent.metrics.lift import polynomial_lift

__all__ = ["AlignmentResult", "LeakageResult", "alignment", "leakage"]


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
