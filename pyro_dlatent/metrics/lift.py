"""Polynomial lifts: standardized powers of each variable, compared by several metrics.

Several metrics compare variables after a *polynomial lift* (:func:`polynomial_lift`), so that
dependence that is invisible to Pearson correlation (``u`` and ``u**2`` for a symmetric ``u``)
is still seen. Because each variable is standardized before it is raised to powers, every
lifted quantity here is invariant to positive affine maps ``x -> a x + b`` (``a > 0``).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from pyro_dlatent.metrics._arrays import _as_columns, _check_degree, _standardize

__all__ = ["polynomial_lift"]


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
