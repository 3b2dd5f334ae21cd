"""The approximation-error likelihood: a generator's error folded into the sensor noise.

A trained generator cannot represent every field: with the truth written as
:math:`f = G(z) + r`, the part :math:`r` it misses reaches the sensors as :math:`A r`. Treating
that as Gaussian noise of covariance :math:`E` (Kaipio & Somersalo, *Statistical and
Computational Inverse Problems*, 2005) gives the likelihood

.. math:: d \\mid z \\sim \\mathcal{N}\\bigl(A\\, G(z),\\; \\sigma^2 I + E\\bigr),

which :class:`ModelErrorProblem` exposes as a whitened problem that any inference routine of
:mod:`pyro_dlatent.inverse` accepts in place of the source problem.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["ModelErrorProblem"]


class ModelErrorProblem:
    """A linear problem whose data carry a generator's approximation error as extra noise.

    With :math:`\\sigma^2 I + E = L L^\\top` the likelihood above is the whitened problem
    :math:`L^{-1} d \\sim \\mathcal N(L^{-1} A\\, G(z), I)`, which is what this class exposes
    (``noise_sd = 1``); :meth:`whiten` maps raw data to it. ``size``, ``sensors`` and ``node_xy``
    are the wrapped problem's.

    Parameters
    ----------
    problem : SourceProblem
        A linear problem: its ``sensor_operator`` ``A`` (``(m, size**2)``) and ``noise_sd``.
    error_covariance : array-like, shape ``(m, m)``
        ``E``, the second moment of the generator's error at the sensors (symmetrized here).
    """

    def __init__(self, problem: Any, error_covariance: Any) -> None:
        error = np.asarray(error_covariance, dtype=np.float64)
        m = problem.num_sensors
        if error.shape != (m, m):
            raise ValueError(f"expected error_covariance of shape ({m}, {m}), got {error.shape}")
        total = problem.noise_sd**2 * np.eye(m) + 0.5 * (error + error.T)
        self._whitener = np.linalg.inv(np.linalg.cholesky(total))
        self._operator = self._whitener @ problem.sensor_operator
        self.problem = problem
        self.size = problem.size
        self.num_sensors = m
        self.noise_sd = 1.0
        self.sensors = problem.sensors
        self.node_xy = problem.node_xy

    def whiten(self, data: torch.Tensor) -> torch.Tensor:
        """Raw sensor data ``(..., m)`` to the whitened data of this problem, ``(..., m)``."""
        whitener = torch.as_tensor(self._whitener, dtype=data.dtype, device=data.device)
        return data @ whitener.T

    def forward(self, field: torch.Tensor) -> torch.Tensor:
        """Whitened noise-free data :math:`L^{-1} A f`, ``(..., m)``, of fields ``(..., H, W)``."""
        operator = torch.as_tensor(self._operator, dtype=field.dtype, device=field.device)
        return field.flatten(-2) @ operator.T
