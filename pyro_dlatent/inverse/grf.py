"""Gaussian-random-field baseline prior: a bi-Laplacian (Matérn SPDE) field built with scikit-fem.

The prior on the nodal field :math:`f \\in \\mathbb{R}^N` (image order, the grid of
:mod:`pyro_dlatent.inverse.fem`) follows the SPDE construction used by hIPPYlib:

.. math::

    f \\sim \\mathcal{N}(m, C), \\qquad C = A^{-1} M_L A^{-1}, \\qquad
    A = \\gamma K + \\delta M + \\beta B,

with the P1 stiffness :math:`K`, the consistent mass :math:`M`, the lumped (row-sum, diagonal)
mass :math:`M_L` as the middle factor, and the boundary mass
:math:`B_{ij} = \\int_{\\partial\\Omega} \\phi_i \\phi_j`. The boundary condition of the SPDE is of
Robin type with :math:`\\beta = \\sqrt{\\gamma\\delta} / 1.42`, the coefficient proposed by Daon and
Stadler (2018, Inverse Problems and Imaging 12:1083) to damp the variance inflation that a pure
Neumann condition causes near the boundary; ``robin=False`` gives the Neumann operator
(:math:`\\beta = 0`). Because :math:`M_L` is diagonal, the precision
:math:`C^{-1} = A M_L^{-1} A` is sparse and a draw costs one sparse solve:
:math:`f = m + A^{-1} M_L^{1/2} w`, :math:`w \\sim \\mathcal{N}(0, I)`.

In the continuum limit (no boundary) the field is Matérn with smoothness :math:`\\nu = 1` in 2-D:
correlation length :math:`\\rho = \\sqrt{8 \\gamma / \\delta}` and marginal variance
:math:`\\sigma^2 = 1 / (4 \\pi \\gamma \\delta)`.

For the linear source problem :math:`d = \\mathcal{A} f + \\varepsilon` of
:class:`~pyro_dlatent.inverse.fem.SourceProblem` the posterior and the marginal likelihood are
Gaussian in closed form (:meth:`GRFPrior.posterior`, :meth:`GRFPrior.log_marginal_likelihood`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyro.distributions as dist
import scipy.linalg
import scipy.optimize
import scipy.sparse as sp
import torch
from skfem import BilinearForm, ElementTriP1, FacetBasis, asm

from pyro_dlatent.inverse.fem import (
    SourceProblem,
    _factorize,
    _nodal_parameter,
    diffusion,
    mass,
    unit_square_basis,
)
from pyro_dlatent.validation import check_positive

__all__ = ["ROBIN_DIVISOR", "GRFPrior", "boundary_mass", "cosine_moments"]

ROBIN_DIVISOR = 1.42
"""Robin coefficient :math:`\\beta = \\sqrt{\\gamma\\delta} / 1.42` (Daon and Stadler, 2018)."""


@BilinearForm
def boundary_mass(u, v, w):
    """Boundary mass form :math:`\\int_{\\partial\\Omega} u v` (assembled on a facet basis)."""
    return u * v


def _as_numpy(array: Any) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().to("cpu", torch.float64).numpy()
    return np.asarray(array, dtype=np.float64)


class GRFPrior:
    """Bi-Laplacian Gaussian random field on the nodal values of the unit-square mesh.

    Parameters
    ----------
    size : int
        Nodes per axis, the same grid as the forward problems (``size >= 3``).
    gamma : float
        Diffusion weight :math:`\\gamma > 0` of :math:`A = \\gamma K + \\delta M + \\beta B`.
    delta : float
        Reaction weight :math:`\\delta > 0`.
    mean : float or array_like of shape (size, size)
        Prior mean :math:`m` in image layout; default 0.
    robin : bool
        Robin boundary term :math:`\\beta = \\sqrt{\\gamma\\delta}/1.42` (default) or Neumann
        (:math:`\\beta = 0`).

    Examples
    --------
    >>> prior = GRFPrior.from_matern(size=17, correlation_length=0.3, variance=1.0)
    >>> prior.sample(4, seed=0).shape
    torch.Size([4, 17, 17])
    """

    def __init__(
        self,
        size: int,
        gamma: float,
        delta: float,
        mean: float | np.ndarray = 0.0,
        robin: bool = True,
    ) -> None:
        self.gamma = check_positive(gamma, "gamma")
        self.delta = check_positive(delta, "delta")
        self.robin = bool(robin)
        self._basis, mesh_of_image = unit_square_basis(size)
        self.size = int(size)
        self.mean = _nodal_parameter("mean", mean, self.size)
        order = mesh_of_image
        mesh = self._basis.mesh
        self._stiffness = asm(diffusion, self._basis, kappa=1.0).tocsr()[order][:, order]
        self._mass = asm(mass, self._basis).tocsr()[order][:, order]
        facets = FacetBasis(mesh, ElementTriP1(), facets=mesh.boundary_facets())
        self._boundary = asm(boundary_mass, facets).tocsr()[order][:, order]
        self._lumped = np.asarray(self._mass.sum(axis=1)).ravel()
        self._operator = self._assemble(self.gamma, self.delta)
        self._factor = _factorize(self._operator)
        self._log_det_operator = float(np.sum(np.log(np.abs(self._factor.U.diagonal()))))
        self._torch_cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, ...]] = {}

    def __getstate__(self) -> dict[str, Any]:
        # SuperLU factors cannot be pickled: a copy sent to another process refactorizes
        state = dict(self.__dict__)
        del state["_factor"]
        state["_torch_cache"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._factor = _factorize(self._operator)

    @classmethod
    def from_matern(
        cls,
        size: int,
        correlation_length: float,
        variance: float,
        mean: float | np.ndarray = 0.0,
        robin: bool = True,
    ) -> GRFPrior:
        """Prior with a chosen Matérn (:math:`\\nu = 1`) correlation length and variance.

        Inverts :math:`\\rho = \\sqrt{8\\gamma/\\delta}` and
        :math:`\\sigma^2 = 1/(4\\pi\\gamma\\delta)`:
        :math:`\\gamma = \\rho / (\\sqrt{32 \\pi}\\, \\sigma)`,
        :math:`\\delta = 8\\gamma / \\rho^2`.
        """
        correlation_length = check_positive(correlation_length, "correlation_length")
        variance = check_positive(variance, "variance")
        gamma = correlation_length / (math.sqrt(32.0 * math.pi * variance))
        delta = 8.0 * gamma / correlation_length**2
        return cls(size, gamma, delta, mean=mean, robin=robin)

    @property
    def correlation_length(self) -> float:
        """Continuum Matérn correlation length :math:`\\sqrt{8\\gamma/\\delta}`."""
        return math.sqrt(8.0 * self.gamma / self.delta)

    @property
    def marginal_variance(self) -> float:
        """Continuum Matérn marginal variance :math:`1 / (4\\pi\\gamma\\delta)`, away from walls."""
        return 1.0 / (4.0 * math.pi * self.gamma * self.delta)

    @property
    def num_nodes(self) -> int:
        """Number of nodal values ``N = size ** 2``."""
        return self.size * self.size

    def _assemble(self, gamma: float, delta: float) -> sp.csc_matrix:
        robin = math.sqrt(gamma * delta) / ROBIN_DIVISOR if self.robin else 0.0
        return (gamma * self._stiffness + delta * self._mass + robin * self._boundary).tocsc()

    def covariance(self) -> torch.Tensor:
        """Dense prior covariance :math:`C = A^{-1} M_L A^{-1}` (image order).

        Costs ``N`` sparse solves and ``N^2`` memory: meant for ``size <= 33`` or so.

        Returns
        -------
        Tensor, shape (N, N), float64
        """
        root = self._factor.solve(np.diag(np.sqrt(self._lumped)))
        return torch.from_numpy(root @ root.T)

    def sample(self, num: int, seed: int | np.random.Generator | None = None) -> torch.Tensor:
        """Independent draws :math:`m + A^{-1} M_L^{1/2} w`, :math:`w \\sim \\mathcal{N}(0, I)`.

        Parameters
        ----------
        num : int
            Number of fields.
        seed : int or numpy.random.Generator, optional
            Seed or generator of :math:`w`.

        Returns
        -------
        Tensor, shape (num, size, size), float64
        """
        if int(num) != num or num < 1:
            raise ValueError(f"expected num >= 1, got {num}")
        rng = np.random.default_rng(seed)
        white = rng.standard_normal((self.num_nodes, int(num)))
        draws = self._factor.solve(np.asfortranarray(np.sqrt(self._lumped)[:, None] * white))
        fields = self.mean.ravel() + draws.T
        return torch.from_numpy(fields.reshape(int(num), self.size, self.size))

    def _torch_operators(self, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        key = (like.device, like.dtype)
        if key not in self._torch_cache:
            coo = self._operator.tocoo()
            indices = torch.as_tensor(np.vstack([coo.row, coo.col]), dtype=torch.long)
            operator = torch.sparse_coo_tensor(
                indices,
                torch.as_tensor(coo.data),
                coo.shape,
                check_invariants=False,
            ).coalesce()
            self._torch_cache[key] = (
                operator.to(device=like.device, dtype=like.dtype),
                torch.as_tensor(self._lumped, dtype=like.dtype, device=like.device),
                torch.as_tensor(self.mean.ravel(), dtype=like.dtype, device=like.device),
            )
        return self._torch_cache[key]

    def log_prob(self, field: torch.Tensor) -> torch.Tensor:
        """Log density, differentiable in ``field``, through the sparse precision.

        .. math::

            \\log p(f) = -\\tfrac12 \\lVert M_L^{-1/2} A (f - m) \\rVert^2 + \\log\\det A
                         - \\tfrac12 \\log\\det M_L - \\tfrac N2 \\log 2\\pi.

        Parameters
        ----------
        field : Tensor, shape (..., size, size)

        Returns
        -------
        Tensor, shape (...)
        """
        if not isinstance(field, torch.Tensor):
            field = torch.as_tensor(np.asarray(field, dtype=np.float64))
        if field.ndim < 2 or tuple(field.shape[-2:]) != (self.size, self.size):
            raise ValueError(
                f"expected field of shape (..., {self.size}, {self.size}), got {tuple(field.shape)}"
            )
        operator, lumped, mean = self._torch_operators(field)
        residual = (field.flatten(-2) - mean).reshape(-1, self.num_nodes)
        whitened = torch.sparse.mm(operator, residual.T).T
        quadratic = (whitened.square() / lumped).sum(-1).reshape(field.shape[:-2])
        constant = (
            self._log_det_operator
            - 0.5 * float(np.sum(np.log(self._lumped)))
            - 0.5 * self.num_nodes * math.log(2.0 * math.pi)
        )
        return constant - 0.5 * quadratic

    def to_distribution(
        self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float64
    ) -> dist.MultivariateNormal:
        """The prior as a Pyro ``MultivariateNormal`` over the flattened field (image order).

        Builds the dense Cholesky factor of :meth:`covariance` (``O(N^3)``): for small grids.

        Returns
        -------
        pyro.distributions.MultivariateNormal
            ``event_shape == (size * size,)``.
        """
        covariance = self.covariance()
        scale_tril = torch.linalg.cholesky(covariance)
        loc = torch.from_numpy(self.mean.ravel())
        return dist.MultivariateNormal(
            loc.to(device=device, dtype=dtype), scale_tril=scale_tril.to(device=device, dtype=dtype)
        )

    def _check_problem(self, problem: SourceProblem) -> None:
        if not isinstance(problem, SourceProblem):
            raise TypeError(
                f"expected a SourceProblem (linear forward map), got {type(problem).__name__}"
            )
        if problem.size != self.size:
            raise ValueError(f"expected problem.size == {self.size}, got {problem.size}")

    def _check_data(self, problem: SourceProblem, data: Any) -> np.ndarray:
        if isinstance(data, Sequence) and len(data) > 0 and not np.isscalar(data[0]):
            array = np.stack([_as_numpy(item) for item in data])
        else:
            array = _as_numpy(data)
        if array.ndim < 1 or array.shape[-1] != problem.num_sensors:
            raise ValueError(
                f"expected data of shape (..., {problem.num_sensors}), got {array.shape}"
            )
        if not np.all(np.isfinite(array)):
            raise ValueError("expected finite data, got non-finite values")
        return array

    def _evidence(
        self, problem: SourceProblem, factor: Any
    ) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, bool]]:
        """Cross covariance :math:`C \\mathcal{A}^T`, data mean and data covariance factor."""
        forward = problem.sensor_operator
        inner = factor.solve(np.asfortranarray(forward.T))
        cross = factor.solve(np.asfortranarray(self._lumped[:, None] * inner))
        data_covariance = inner.T @ (self._lumped[:, None] * inner)
        data_covariance += problem.noise_sd**2 * np.eye(problem.num_sensors)
        data_mean = forward @ self.mean.ravel()
        return cross, data_mean, scipy.linalg.cho_factor(data_covariance, lower=True)

    def posterior(self, problem: SourceProblem, data: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Closed-form Gaussian posterior of the source given sensor data.

        With :math:`d = \\mathcal{A} f + \\varepsilon`,
        :math:`\\varepsilon \\sim \\mathcal{N}(0, \\sigma^2 I)` and
        :math:`S = \\mathcal{A} C \\mathcal{A}^T + \\sigma^2 I`,

        .. math::

            \\mu_{post} = m + C \\mathcal{A}^T S^{-1} (d - \\mathcal{A} m), \\qquad
            C_{post} = C - C \\mathcal{A}^T S^{-1} \\mathcal{A} C.

        Parameters
        ----------
        problem : SourceProblem
            The linear forward problem on the same grid.
        data : Tensor or array_like, shape (m,) or (batch, m)

        Returns
        -------
        mean : Tensor, shape (size, size) or (batch, size, size), float64
            Posterior mean in image layout.
        covariance : Tensor, shape (N, N), float64
            Posterior covariance (image order); the same for every data vector.
        """
        self._check_problem(problem)
        data = self._check_data(problem, data)
        cross, data_mean, data_factor = self._evidence(problem, self._factor)
        gain = scipy.linalg.cho_solve(data_factor, cross.T).T
        mean = self.mean.ravel() + (data - data_mean) @ gain.T
        covariance = self.covariance().numpy() - gain @ cross.T
        covariance = 0.5 * (covariance + covariance.T)
        mean_image = mean.reshape(*data.shape[:-1], self.size, self.size)
        return torch.from_numpy(mean_image), torch.from_numpy(covariance)

    def _log_marginal(
        self, problem: SourceProblem, data: np.ndarray, gamma: float, delta: float
    ) -> np.ndarray:
        if (gamma, delta) == (self.gamma, self.delta):
            factor = self._factor
        else:
            factor = _factorize(self._assemble(gamma, delta))
        _, data_mean, (lower, _) = self._evidence(problem, factor)
        residual = scipy.linalg.solve_triangular(lower, (data - data_mean).T, lower=True)
        log_det = 2.0 * np.sum(np.log(np.diag(lower)))
        num = problem.num_sensors
        return -0.5 * (np.sum(residual**2, axis=0) + log_det + num * math.log(2.0 * math.pi))

    def log_marginal_likelihood(self, problem: SourceProblem, data: Any) -> torch.Tensor:
        """Log evidence of the data under the prior (marginal likelihood).

        .. math::

            \\log p(d \\mid \\gamma, \\delta) = \\log \\mathcal{N}(d;\\, \\mathcal{A} m,\\,
            \\mathcal{A} C \\mathcal{A}^T + \\sigma^2 I).

        Parameters
        ----------
        problem : SourceProblem
        data : Tensor or array_like, shape (m,) or (batch, m)
            Each row comes from an independent field.

        Returns
        -------
        Tensor, shape () or (batch,), float64
        """
        self._check_problem(problem)
        data = self._check_data(problem, data)
        return torch.as_tensor(self._log_marginal(problem, data, self.gamma, self.delta))

    def fit_hyperparameters(
        self,
        problem: SourceProblem,
        data: Any,
        bounds: tuple[float, float] = (1e-6, 1e6),
    ) -> GRFPrior:
        """Maximum-marginal-likelihood :math:`(\\gamma, \\delta)`, started at this prior's values.

        Maximizes :math:`\\sum_b \\log p(d_b \\mid \\gamma, \\delta)` over
        :math:`(\\log\\gamma, \\log\\delta)` with L-BFGS-B; the mean and boundary choice are kept.

        Parameters
        ----------
        problem : SourceProblem
        data : Tensor, array_like of shape (batch, m), or a list of (m,) vectors
            Data vectors from independent fields.
        bounds : (float, float)
            Box for both :math:`\\gamma` and :math:`\\delta`.

        Returns
        -------
        GRFPrior
            A new prior with the fitted hyperparameters.
        """
        self._check_problem(problem)
        data = self._check_data(problem, data).reshape(-1, problem.num_sensors)
        low, high = (check_positive(bound, "bounds") for bound in bounds)
        if not low < high:
            raise ValueError(f"expected bounds low < high, got {bounds}")
        scale = data.shape[0]

        def objective(log_params: np.ndarray) -> float:
            gamma, delta = np.exp(log_params)
            return -float(np.sum(self._log_marginal(problem, data, gamma, delta))) / scale

        start = np.log([self.gamma, self.delta])
        log_bounds = [(math.log(low), math.log(high))] * 2
        result = scipy.optimize.minimize(
            objective, start, method="L-BFGS-B", bounds=log_bounds, options={"ftol": 1e-12}
        )
        gamma, delta = np.exp(result.x)
        return GRFPrior(self.size, gamma, delta, mean=self.mean, robin=self.robin)


def cosine_moments(images: Any, num_modes: int = 2) -> dict[str, np.ndarray]:
    r"""Projections of nodal fields on the separable cosines of the unit square.

    .. math:: c_{kl} = \int_0^1\!\!\int_0^1 f(x, y) \cos(k \pi x) \cos(l \pi y)\, dx\, dy,
        \qquad 0 \le k, l < \text{num\_modes},

    by the trapezoid rule on the node grid: ``c00`` is the field's mean, ``c10`` / ``c01`` its
    first horizontal / vertical gradient modes, ``c11`` the saddle mode. Smooth linear
    functionals of a GRF draw, they are Gaussian under :class:`GRFPrior` and well identified by a
    few sensors: named auxiliaries for a generator trained on GRF draws.

    Parameters
    ----------
    images : array-like, shape ``(n, size, size)``
        Nodal fields in image order (``image[..., i, j]`` at ``(x, y) = (t[j], t[i])``).
    num_modes : int, default 2
        Cosines per axis.

    Returns
    -------
    dict of str to numpy.ndarray, shape ``(n,)``
        ``c{k}{l}`` for every ``k, l < num_modes``.
    """
    images = np.asarray(images)
    size = images.shape[-1]
    x = np.linspace(0.0, 1.0, size)
    weights = np.full(size, 1.0 / (size - 1))
    weights[[0, -1]] *= 0.5
    out = {}
    for k in range(num_modes):
        for m in range(num_modes):
            basis = np.outer(weights * np.cos(m * np.pi * x), weights * np.cos(k * np.pi * x))
            out[f"c{k}{m}"] = np.einsum("nij,ij->n", images, basis)
    return out
