"""Differentiable scikit-fem forward problems for the elliptic equation on the unit square.

Both problems solve

.. math::

    -\\nabla \\cdot (\\kappa \\nabla y) = f \\quad \\text{in } \\Omega = (0, 1)^2,
    \\qquad y = 0 \\quad \\text{on } \\partial\\Omega,

with continuous piecewise-linear (P1) triangles on the structured mesh
``MeshTri.init_tensor(linspace(0, 1, size), linspace(0, 1, size))`` and observe the solution at
sensor points, :math:`d = H y + \\varepsilon` with
:math:`\\varepsilon \\sim \\mathcal{N}(0, \\sigma^2 I)`, where :math:`H` is the scikit-fem probe
(point-evaluation) matrix.

Fields are nodal values in *image layout*: ``field[..., i, j]`` is the value at the node
``(x, y) = (j / (size - 1), i / (size - 1))``, the grid of the ``sources`` simulator. The
permutation between scikit-fem's node order and the image order is computed once from the mesh
coordinates; every matrix is stored permuted into image order so that no call reorders data.

* :class:`SourceProblem` — unknown source :math:`f`, known :math:`\\kappa`: linear,
  :math:`d = H K^{-1} M f`, assembled and factorized once.
* :class:`ConductivityProblem` — unknown :math:`\\log\\kappa`, known :math:`f`: nonlinear, with an
  adjoint gradient.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.linalg import splu
from skfem import Basis, BilinearForm, ElementTriP1, MeshTri, asm, condense
from skfem.helpers import dot, grad
from torch.autograd.function import once_differentiable

from pyro_dlatent.validation import check_positive

__all__ = [
    "MIN_NOISE_SD",
    "ConductivityProblem",
    "SourceProblem",
    "check_noise_sd",
    "default_sensors",
    "diffusion",
    "mass",
    "simulate_observations",
    "unit_square_basis",
]


@BilinearForm
def diffusion(u, v, w):
    """Weighted stiffness form :math:`\\int_\\Omega \\kappa \\nabla u \\cdot \\nabla v`."""
    return w.kappa * dot(grad(u), grad(v))


@BilinearForm
def mass(u, v, w):
    """Mass form :math:`\\int_\\Omega u v`."""
    return u * v


def unit_square_basis(size: int) -> tuple[Basis, np.ndarray]:
    """P1 basis on the structured triangulation of the unit square and its image ordering.

    Parameters
    ----------
    size : int
        Nodes per axis (``size >= 3``), at ``numpy.linspace(0, 1, size)``.

    Returns
    -------
    basis : skfem.CellBasis
        P1 basis on ``MeshTri.init_tensor(xs, xs)``.
    mesh_of_image : numpy.ndarray of int, shape (size * size,)
        ``mesh_of_image[i * size + j]`` is the mesh node at ``(x, y) = (j, i) / (size - 1)``, so
        a nodal vector ``v`` in mesh order is the image ``v[mesh_of_image].reshape(size, size)``.
    """
    size = _check_size(size)
    coordinates = np.linspace(0.0, 1.0, size)
    mesh = MeshTri.init_tensor(coordinates, coordinates)
    basis = Basis(mesh, ElementTriP1())
    column = np.rint(mesh.p[0] * (size - 1)).astype(np.int64)
    row = np.rint(mesh.p[1] * (size - 1)).astype(np.int64)
    image_index = row * size + column
    if not np.array_equal(np.sort(image_index), np.arange(size * size)):
        raise RuntimeError("mesh nodes do not match the image grid")
    mesh_of_image = np.empty(size * size, dtype=np.int64)
    mesh_of_image[image_index] = np.arange(size * size)
    return basis, mesh_of_image


def default_sensors(num_per_axis: int = 5) -> np.ndarray:
    """An interior grid of sensors, ``num_per_axis`` per axis at ``k / (num_per_axis + 1)``.

    Returns
    -------
    numpy.ndarray, shape (num_per_axis ** 2, 2)
        Sensor coordinates ``(x, y)``, ``x`` varying fastest.
    """
    if int(num_per_axis) != num_per_axis or num_per_axis < 1:
        raise ValueError(f"expected num_per_axis >= 1, got {num_per_axis}")
    num_per_axis = int(num_per_axis)
    ticks = np.arange(1, num_per_axis + 1) / (num_per_axis + 1)
    y, x = np.meshgrid(ticks, ticks, indexing="ij")
    return np.stack([x.ravel(), y.ravel()], axis=-1)


def _check_size(size: int) -> int:
    if isinstance(size, bool) or int(size) != size or size < 3:
        raise ValueError(f"expected size >= 3 nodes per axis, got {size}")
    return int(size)


def _check_sensors(sensors: Any) -> np.ndarray:
    array = np.asarray(sensors, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 2 or array.shape[0] < 1:
        raise ValueError(f"expected sensors of shape (m, 2) with m >= 1, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError("expected finite sensors, got non-finite coordinates")
    if np.any(array < 0.0) or np.any(array > 1.0):
        raise ValueError("expected sensors inside the unit square [0, 1]^2, got points outside")
    return array


def _nodal_parameter(name: str, value: Any, size: int) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.shape not in ((), (size, size)):
        raise ValueError(f"expected {name} scalar or of shape ({size}, {size}), got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"expected a finite {name}, got non-finite values")
    return np.array(np.broadcast_to(array, (size, size)))


def _factorize(matrix: sp.spmatrix) -> Any:
    """Sparse LU of a symmetric positive-definite stiffness matrix.

    Minimum-degree ordering of :math:`K + K^T` with symmetric-mode pivoting: on the 64x64 grid
    its factors have about 40% fewer nonzeros than SuperLU's default (COLAMD) ordering, and
    solves are correspondingly faster.
    """
    return splu(sp.csc_matrix(matrix), permc_spec="MMD_AT_PLUS_A", options={"SymmetricMode": True})


MIN_NOISE_SD = 1e-18
"""Smallest noise sd accepted: ``1 / noise_sd**2`` must stay finite in float32."""


def check_noise_sd(value: Any) -> float:
    """``noise_sd`` as a float, or a ``ValueError`` naming it (a positive number >= 1e-18)."""
    value = check_positive(value, "noise_sd")
    if value < MIN_NOISE_SD:
        raise ValueError(
            f"expected noise_sd >= {MIN_NOISE_SD:g} (smaller values overflow 1 / noise_sd**2 in "
            f"float32), got {value:g}"
        )
    return value


class _EllipticProblem:
    """Mesh, image ordering, boundary, mass matrix and sensors shared by both problems."""

    def __init__(self, size: int, sensors: Any, noise_sd: float) -> None:
        self.size = _check_size(size)
        self.sensors = _check_sensors(sensors)
        self.noise_sd = check_noise_sd(noise_sd)
        self.basis, self._mesh_of_image = unit_square_basis(self.size)
        self.mesh = self.basis.mesh
        image_of_mesh = np.argsort(self._mesh_of_image)
        boundary = image_of_mesh[self.basis.get_dofs().flatten()]
        self._interior = np.setdiff1d(np.arange(self.num_nodes), boundary)
        order = self._mesh_of_image
        mass_matrix = asm(mass, self.basis).tocsr()[order][:, order]
        self._mass_interior = mass_matrix[self._interior].tocsr()
        self._mass_interior_transpose = self._mass_interior.T.tocsr()
        self._observation = self.basis.probes(self.sensors.T).toarray()[:, order]
        self._observation_cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    @property
    def num_nodes(self) -> int:
        """Number of mesh nodes, ``size ** 2``."""
        return self.size * self.size

    @property
    def num_sensors(self) -> int:
        """Number of sensors ``m``."""
        return self.sensors.shape[0]

    @property
    def node_xy(self) -> np.ndarray:
        """Node coordinates in image layout, shape ``(size, size, 2)``, ``node_xy[i, j] = (x, y)``.

        ``x = j / (size - 1)`` and ``y = i / (size - 1)``.
        """
        return self.mesh.p[:, self._mesh_of_image].T.reshape(self.size, self.size, 2).copy()

    def to_image(self, nodal: np.ndarray) -> np.ndarray:
        """Reorder a mesh-ordered nodal array ``(..., N)`` into an image ``(..., size, size)``."""
        nodal = np.asarray(nodal)
        return nodal[..., self._mesh_of_image].reshape(*nodal.shape[:-1], self.size, self.size)

    def to_mesh(self, image: np.ndarray) -> np.ndarray:
        """Reorder an image ``(..., size, size)`` into a mesh-ordered nodal array ``(..., N)``."""
        image = np.asarray(image)
        flat = image.reshape(*image.shape[:-2], self.num_nodes)
        nodal = np.empty_like(flat)
        nodal[..., self._mesh_of_image] = flat
        return nodal

    def _check_field(self, field: Any, name: str = "field", finite: bool = True) -> torch.Tensor:
        if not isinstance(field, torch.Tensor):
            field = torch.as_tensor(np.asarray(field, dtype=np.float64))
        if field.ndim < 2 or tuple(field.shape[-2:]) != (self.size, self.size):
            raise ValueError(
                f"expected {name} of shape (..., {self.size}, {self.size}), "
                f"got {tuple(field.shape)}"
            )
        if not field.is_floating_point():
            field = field.to(torch.get_default_dtype())
        if finite and not bool(torch.isfinite(field).all()):
            raise ValueError(f"expected a finite {name}, got non-finite values")
        return field

    def _cached(self, cache: dict, matrix: np.ndarray, like: torch.Tensor) -> torch.Tensor:
        key = (like.device, like.dtype)
        if key not in cache:
            cache[key] = torch.tensor(matrix, dtype=like.dtype, device=like.device)
        return cache[key]

    def observe(self, solution: torch.Tensor) -> torch.Tensor:
        """Point values of a nodal solution at the sensors, :math:`H y`.

        Parameters
        ----------
        solution : Tensor, shape (..., size, size)
            Nodal solution in image layout.

        Returns
        -------
        Tensor, shape (..., m)
        """
        solution = self._check_field(solution, "solution")
        operator = self._cached(self._observation_cache, self._observation, solution)
        return solution.flatten(-2) @ operator.T

    def _scatter_interior(self, interior_values: np.ndarray, batch: int) -> np.ndarray:
        full = np.zeros((batch, self.num_nodes))
        full[:, self._interior] = interior_values.T
        return full


def _check_finite(array: np.ndarray, name: str) -> None:
    if not np.isfinite(array).all():
        raise ValueError(f"expected a finite {name}, got non-finite values")


def _to_numpy_batch(field: torch.Tensor) -> np.ndarray:
    flat = field.detach().to("cpu", torch.float64).reshape(-1, field.shape[-2] * field.shape[-1])
    return flat.numpy()


def _from_numpy(array: np.ndarray, like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(like.device, like.dtype).reshape(shape)


class _SourceSolve(torch.autograd.Function):
    """:math:`f \\mapsto y = K^{-1} M f` with the stored factor; backward :math:`M^T K^{-T} g`."""

    @staticmethod
    def forward(ctx, problem: SourceProblem, field: torch.Tensor) -> torch.Tensor:
        ctx.problem = problem
        source = _to_numpy_batch(field)
        _check_finite(source, "field")
        # scipy's sparse products are fast on C-ordered dense operands, SuperLU wants F order.
        rhs = problem._mass_interior @ np.ascontiguousarray(source.T)
        solution = problem._scatter_interior(problem._factor.solve(rhs), source.shape[0])
        return _from_numpy(solution, field, field.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor) -> tuple[None, torch.Tensor]:
        problem = ctx.problem
        cotangent = _to_numpy_batch(grad_output)[:, problem._interior]
        adjoint = problem._factor.solve(cotangent.T, trans="T")
        grad_field = problem._mass_interior_transpose @ np.ascontiguousarray(adjoint)
        return None, _from_numpy(grad_field.T, grad_output, grad_output.shape)


class SourceProblem(_EllipticProblem):
    """Source identification: unknown nodal source :math:`f`, known conductivity :math:`\\kappa`.

    The discrete problem is :math:`K_{II} y_I = (M f)_I`, :math:`y_B = 0`, with the weighted
    stiffness :math:`K_{ij} = \\int \\kappa \\nabla\\phi_j \\cdot \\nabla\\phi_i` (``kappa``
    interpolated in P1) and the consistent mass :math:`M_{ij} = \\int \\phi_j \\phi_i`, assembled
    and LU-factorized once; the Dirichlet condition is applied by condensation (only the interior
    block :math:`K_{II}` is factorized). The data map is linear, :math:`d = A f` with the dense
    sensor operator

    .. math:: A = H_{:,I} K_{II}^{-1} M_{I,:} \\in \\mathbb{R}^{m \\times N},

    precomputed with ``m`` adjoint solves, so :meth:`forward` is one matrix product.

    Parameters
    ----------
    size : int
        Nodes per axis (``size >= 3``).
    sensors : array_like, shape (m, 2)
        Sensor coordinates ``(x, y)`` inside ``[0, 1]^2``.
    noise_sd : float
        Standard deviation :math:`\\sigma > 0` of the Gaussian observation noise.
    kappa : float or array_like of shape (size, size)
        Positive conductivity, constant or nodal in image layout; default 1.

    Examples
    --------
    >>> problem = SourceProblem(size=17, sensors=default_sensors(5), noise_sd=0.01)
    >>> problem.forward(torch.ones(3, 17, 17)).shape
    torch.Size([3, 25])
    """

    def __init__(
        self, size: int, sensors: Any, noise_sd: float, kappa: float | np.ndarray = 1.0
    ) -> None:
        super().__init__(size, sensors, noise_sd)
        self.kappa = _nodal_parameter("kappa", kappa, self.size)
        if np.any(self.kappa <= 0.0):
            raise ValueError(f"expected kappa > 0, got minimum {self.kappa.min()}")
        kappa_mesh = self.to_mesh(self.kappa)
        stiffness = asm(diffusion, self.basis, kappa=self.basis.interpolate(kappa_mesh))
        boundary = self.basis.get_dofs().flatten()
        stiffness_interior, _, interior_mesh = condense(stiffness, D=boundary)
        if not np.array_equal(np.sort(self._mesh_of_image[self._interior]), interior_mesh):
            raise RuntimeError("interior nodes of the mesh and of the image disagree")
        order = np.searchsorted(interior_mesh, self._mesh_of_image[self._interior])
        self._stiffness_interior = stiffness_interior.tocsr()[order][:, order].tocsc()
        self._factor = _factorize(self._stiffness_interior)
        probes_interior = self._observation[:, self._interior]
        sensitivity = self._factor.solve(np.asfortranarray(probes_interior.T), trans="T")
        self._sensor_operator = np.ascontiguousarray(
            (self._mass_interior_transpose @ sensitivity).T
        )
        self._sensor_operator.flags.writeable = False
        self._operator_cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    @property
    def sensor_operator(self) -> np.ndarray:
        """Dense linear data map :math:`A = H K^{-1} M`, shape ``(m, size * size)``, image order."""
        return self._sensor_operator

    def forward(self, field: torch.Tensor) -> torch.Tensor:
        """Noise-free sensor data :math:`A f`, differentiable, on the field's device and dtype.

        Parameters
        ----------
        field : Tensor, shape (..., size, size)
            Nodal source in image layout.

        Returns
        -------
        Tensor, shape (..., m)
        """
        field = self._check_field(field)
        operator = self._cached(self._operator_cache, self._sensor_operator, field)
        return field.flatten(-2) @ operator.T

    def solve(self, field: torch.Tensor) -> torch.Tensor:
        """Full nodal solution :math:`y = K^{-1} M f` with an adjoint backward.

        All fields of the batch are solved in one call with the stored factor.

        Parameters
        ----------
        field : Tensor, shape (..., size, size)
            Nodal source in image layout.

        Returns
        -------
        Tensor, shape (..., size, size)
            Nodal solution in image layout (zero on the boundary).
        """
        return _SourceSolve.apply(self, self._check_field(field, finite=False))


class _ConductivitySolve(torch.autograd.Function):
    """:math:`\\log\\kappa \\mapsto y = K(\\kappa)^{-1} M f`, with the adjoint gradient.

    For a cotangent :math:`g` of :math:`y`, the adjoint state is
    :math:`\\lambda = K^{-T} g_I` and
    :math:`\\partial J / \\partial \\kappa_k = -\\lambda^T (\\partial K / \\partial \\kappa_k) y`.
    """

    @staticmethod
    def forward(ctx, problem: ConductivityProblem, log_kappa: torch.Tensor) -> torch.Tensor:
        with np.errstate(over="ignore", under="ignore"):
            kappas = np.exp(_to_numpy_batch(log_kappa))
        if not np.all((kappas > 0.0) & np.isfinite(kappas)):
            raise ValueError("expected a field with exp(field) finite and > 0 (|field| < ~700)")
        factors, states = [], []
        for kappa in kappas:
            factor = _factorize(problem.stiffness(kappa))
            factors.append(factor)
            states.append(factor.solve(problem._load_interior))
        interior = np.stack(states, axis=-1)
        ctx.problem, ctx.factors, ctx.kappas, ctx.states = problem, factors, kappas, states
        full = problem._scatter_interior(interior, kappas.shape[0])
        return _from_numpy(full, log_kappa, log_kappa.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor) -> tuple[None, torch.Tensor]:
        problem = ctx.problem
        cotangents = _to_numpy_batch(grad_output)[:, problem._interior]
        grads = np.empty_like(ctx.kappas)
        rows, cols = problem._pattern_rows, problem._pattern_cols
        for index, (factor, state, cotangent) in enumerate(
            zip(ctx.factors, ctx.states, cotangents, strict=True)
        ):
            adjoint = factor.solve(cotangent, trans="T")
            grad_kappa = -(problem._stiffness_derivative.T @ (adjoint[rows] * state[cols]))
            grads[index] = grad_kappa * ctx.kappas[index]
        return None, _from_numpy(grads, grad_output, grad_output.shape)


class ConductivityProblem(_EllipticProblem):
    """Conductivity identification: unknown nodal :math:`\\log\\kappa`, known source :math:`f`.

    With :math:`\\kappa` in P1 the stiffness matrix is linear in the nodal conductivities,

    .. math:: K(\\kappa) = \\sum_k \\kappa_k K^{(k)}, \\qquad
              K^{(k)}_{ij} = \\int \\phi_k \\nabla\\phi_j \\cdot \\nabla\\phi_i,

    so the interior block's sparse entries are ``D @ kappa`` with a sparse ``D`` of shape
    ``(nnz, N)`` built once from the :func:`diffusion` form: assembly is one sparse product (no
    loop over elements), and the adjoint gradient is
    :math:`\\nabla_\\kappa J = -D^T (\\lambda_{r} \\, y_{c})` over the nonzero pattern ``(r, c)``.
    Each field of a batch is factorized and solved in turn (the problem is nonlinear).

    Parameters
    ----------
    size : int
        Nodes per axis (``size >= 3``).
    sensors : array_like, shape (m, 2)
        Sensor coordinates ``(x, y)`` inside ``[0, 1]^2``.
    noise_sd : float
        Standard deviation :math:`\\sigma > 0` of the Gaussian observation noise.
    source : float or array_like of shape (size, size)
        Known source :math:`f`, constant or nodal in image layout; default 1.
    """

    def __init__(
        self, size: int, sensors: Any, noise_sd: float, source: float | np.ndarray = 1.0
    ) -> None:
        super().__init__(size, sensors, noise_sd)
        self.source = _nodal_parameter("source", source, self.size)
        self._load_interior = self._mass_interior @ self.source.ravel()
        self._build_stiffness_structure()

    def _build_stiffness_structure(self) -> None:
        basis = self.basis
        num_elements = self.mesh.t.shape[1]
        image_of_mesh = np.argsort(self._mesh_of_image)
        position = np.full(self.num_nodes, -1)
        position[self._interior] = np.arange(self._interior.size)
        local_derivatives = []
        for local in range(len(basis.basis)):
            coo = diffusion.coo_data(basis, kappa=basis.basis[local][0])
            local_derivatives.append(coo.data)
        rows = position[image_of_mesh[coo.indices[0]]]
        cols = position[image_of_mesh[coo.indices[1]]]
        element = np.broadcast_to(np.arange(num_elements), (*coo.local_shape, num_elements))
        element = element.ravel()
        keep = (rows >= 0) & (cols >= 0)
        num_interior = self._interior.size
        keys, entry = np.unique(cols[keep] * num_interior + rows[keep], return_inverse=True)
        self._pattern_rows = keys % num_interior
        self._pattern_cols = keys // num_interior
        self._indptr = np.concatenate(
            [[0], np.cumsum(np.bincount(self._pattern_cols, minlength=num_interior))]
        )
        entries, nodes, values = [], [], []
        for local, data in enumerate(local_derivatives):
            entries.append(entry)
            nodes.append(image_of_mesh[basis.element_dofs[local, element[keep]]])
            values.append(data[keep])
        self._stiffness_derivative = sp.csr_matrix(
            (np.concatenate(values), (np.concatenate(entries), np.concatenate(nodes))),
            shape=(keys.size, self.num_nodes),
        )

    def stiffness(self, kappa: np.ndarray) -> sp.csc_matrix:
        """Interior stiffness block :math:`K_{II}(\\kappa)` for nodal ``kappa``.

        Parameters
        ----------
        kappa : numpy.ndarray, shape (size, size) or (size * size,)
            Positive nodal conductivity in image layout.

        Returns
        -------
        scipy.sparse.csc_matrix, shape (n_interior, n_interior)
            Rows and columns ordered as the interior nodes in image order.
        """
        data = self._stiffness_derivative @ np.asarray(kappa, dtype=np.float64).ravel()
        n = self._interior.size
        return sp.csc_matrix((data, self._pattern_rows, self._indptr), shape=(n, n))

    def solve(self, log_kappa: torch.Tensor) -> torch.Tensor:
        """Full nodal solution :math:`y(\\kappa)`, differentiable through the adjoint method.

        Parameters
        ----------
        log_kappa : Tensor, shape (..., size, size)
            Nodal log-conductivity in image layout.

        Returns
        -------
        Tensor, shape (..., size, size)
            Nodal solution in image layout (zero on the boundary).
        """
        return _ConductivitySolve.apply(self, self._check_field(log_kappa, "field"))

    def forward(self, log_kappa: torch.Tensor) -> torch.Tensor:
        """Noise-free sensor data :math:`H y(\\exp(\\log\\kappa))`.

        Parameters
        ----------
        log_kappa : Tensor, shape (..., size, size)
            Nodal log-conductivity in image layout.

        Returns
        -------
        Tensor, shape (..., m)
        """
        return self.observe(self.solve(log_kappa))


def simulate_observations(
    problem: SourceProblem | ConductivityProblem,
    field: torch.Tensor,
    seed: int | np.random.Generator | None = None,
) -> torch.Tensor:
    """Noisy sensor data :math:`d = \\mathcal{G}(\\text{field}) + \\sigma \\varepsilon`.

    Parameters
    ----------
    problem : SourceProblem or ConductivityProblem
        The forward problem; its ``noise_sd`` is :math:`\\sigma`.
    field : Tensor or array_like, shape (..., size, size)
        The source (source problem) or log-conductivity (conductivity problem).
    seed : int or numpy.random.Generator, optional
        Seed or generator of the noise :math:`\\varepsilon \\sim \\mathcal{N}(0, I)`.

    Returns
    -------
    Tensor, shape (..., m)
        On the field's device and dtype (float64 for array input).
    """
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        clean = problem.forward(field)
    noise = rng.standard_normal(tuple(clean.shape))
    return clean + problem.noise_sd * torch.as_tensor(noise, dtype=clean.dtype, device=clean.device)
