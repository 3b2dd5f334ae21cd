"""Tests of the scikit-fem forward problems: layout, validation, adjoint gradients, convergence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skfem import Basis, ElementTriP1, Functional, asm

from pyro_dlatent.inverse.fem import (
    ConductivityProblem,
    SourceProblem,
    default_sensors,
    diffusion,
    simulate_observations,
)
from tests.conftest import assert_close

SENSORS = np.array([[0.2, 0.7], [0.55, 0.3], [0.8, 0.85], [0.35, 0.15]])


def _manufactured(xy: np.ndarray, variable: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``u = sin(pi x) sin(pi y)``, ``log kappa`` and ``f = -div(kappa grad u)`` at ``xy``."""
    x, y = xy[..., 0], xy[..., 1]
    sx, cx, sy, cy = np.sin(np.pi * x), np.cos(np.pi * x), np.sin(np.pi * y), np.cos(np.pi * y)
    exact = sx * sy
    if not variable:
        return exact, np.zeros_like(x), 2.0 * np.pi**2 * exact
    # kappa = exp(x - y / 2): grad kappa = kappa (1, -1/2), f = kappa (-lap u - (u_x - u_y / 2)).
    log_kappa = x - 0.5 * y
    source = np.exp(log_kappa) * (2.0 * np.pi**2 * exact - np.pi * cx * sy + 0.5 * np.pi * sx * cy)
    return exact, log_kappa, source


@Functional
def _squared_error(w):
    x, y = w.x
    return (w.uh - np.sin(np.pi * x) * np.sin(np.pi * y)) ** 2


def _l2_error(size: int, variable: bool) -> tuple[float, np.ndarray, np.ndarray]:
    probe = SourceProblem(size, SENSORS, noise_sd=0.1)
    _, log_kappa, source = _manufactured(probe.node_xy, variable)
    problem = ConductivityProblem(size, SENSORS, noise_sd=0.1, source=source)
    log_kappa = torch.as_tensor(log_kappa)
    solution = problem.solve(log_kappa).numpy()
    quadrature = Basis(problem.mesh, ElementTriP1(), intorder=6)
    uh = quadrature.interpolate(problem.to_mesh(solution))
    error = float(np.sqrt(_squared_error.assemble(quadrature, uh=uh)))
    return error, problem.forward(log_kappa).numpy(), _manufactured(SENSORS, variable)[0]


def test_node_layout_matches_image_grid():
    size = 7
    problem = SourceProblem(size, default_sensors(2), noise_sd=0.1)
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    expected = np.stack([cols, rows], axis=-1) / (size - 1)
    np.testing.assert_allclose(problem.node_xy, expected, atol=1e-12)
    image = np.random.default_rng(0).normal(size=(3, size, size))
    np.testing.assert_array_equal(problem.to_image(problem.to_mesh(image)), image)
    np.testing.assert_allclose(
        problem.mesh.p.T, problem.to_mesh(np.moveaxis(problem.node_xy, -1, 0)).T
    )


def test_default_sensors_interior_grid():
    sensors = default_sensors(3)
    assert sensors.shape == (9, 2)
    np.testing.assert_allclose(sensors[1], [0.5, 0.25])
    assert np.all((sensors > 0) & (sensors < 1))
    with pytest.raises(ValueError, match="num_per_axis"):
        default_sensors(0)


@pytest.mark.parametrize(
    "sensors",
    [
        [[0.5, 1.2]],
        [[-0.1, 0.5]],
        [[np.nan, 0.5]],
        [[0.5, 0.5, 0.5]],
        np.zeros((0, 2)),
    ],
)
@pytest.mark.parametrize("cls", [SourceProblem, ConductivityProblem])
def test_bad_sensors_raise(cls, sensors):
    with pytest.raises(ValueError, match="sensors"):
        cls(6, sensors, 0.1)


def test_bad_constructor_arguments_raise():
    with pytest.raises(ValueError, match="noise_sd"):
        SourceProblem(6, SENSORS, 0.0)
    with pytest.raises(ValueError, match="size"):
        ConductivityProblem(2, SENSORS, 0.1)
    with pytest.raises(ValueError, match="kappa"):
        SourceProblem(6, SENSORS, 0.1, kappa=-1.0)
    with pytest.raises(ValueError, match="source"):
        ConductivityProblem(6, SENSORS, 0.1, source=np.ones((5, 5)))


@pytest.mark.parametrize("cls", [SourceProblem, ConductivityProblem])
def test_bad_fields_raise(cls):
    problem = cls(6, SENSORS, 0.1)
    with pytest.raises(ValueError, match="field"):
        problem.forward(torch.zeros(2, 6, 5))
    with pytest.raises(ValueError, match="field"):
        problem.forward(torch.zeros(36))
    bad = torch.zeros(6, 6)
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        problem.forward(bad)


def test_overflowing_conductivity_raises():
    problem = ConductivityProblem(6, SENSORS, 0.1)
    with pytest.raises(ValueError, match="exp"):
        problem.forward(torch.full((6, 6), 800.0, dtype=torch.float64))


def test_source_solve_gradcheck():
    problem = SourceProblem(7, SENSORS, 0.1, kappa=np.linspace(0.5, 2.0, 49).reshape(7, 7))
    field = torch.randn(2, 7, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(problem.solve, (field,))
    assert torch.autograd.gradcheck(problem.forward, (field,))


def test_conductivity_gradcheck():
    source = np.random.default_rng(1).normal(size=(6, 6))
    problem = ConductivityProblem(6, SENSORS, 0.1, source=source)
    log_kappa = (0.5 * torch.randn(2, 6, 6, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(problem.solve, (log_kappa,))
    assert torch.autograd.gradcheck(problem.forward, (log_kappa[0],))


def test_source_problem_is_linear_and_consistent():
    problem = SourceProblem(9, SENSORS, 0.1)
    first, second = torch.randn(2, 9, 9, dtype=torch.float64)
    combined = problem.forward(2.0 * first - 3.0 * second)
    assert_close(combined, 2.0 * problem.forward(first) - 3.0 * problem.forward(second), atol=1e-12)
    batch = torch.stack([first, second])
    solution = problem.solve(batch)
    assert_close(solution[1], problem.solve(second), atol=1e-12)
    assert_close(problem.observe(solution), problem.forward(batch), atol=1e-12)
    assert torch.all(solution[:, 0] == 0) and torch.all(solution[:, :, -1] == 0)


def test_problems_agree_for_unit_and_variable_kappa():
    rng = np.random.default_rng(2)
    source = rng.normal(size=(8, 8))
    log_kappa = 0.4 * rng.normal(size=(8, 8))
    conductivity = ConductivityProblem(8, SENSORS, 0.1, source=source)
    for log_k in (np.zeros((8, 8)), log_kappa):
        linear = SourceProblem(8, SENSORS, 0.1, kappa=np.exp(log_k))
        expected = linear.forward(torch.as_tensor(source))
        assert_close(conductivity.forward(torch.as_tensor(log_k)), expected, atol=1e-12)


def test_conductivity_stiffness_matches_skfem_assembly():
    size = 7
    problem = ConductivityProblem(size, SENSORS, 0.1)
    kappa = np.exp(np.random.default_rng(3).normal(size=(size, size)))
    nodal_kappa = problem.basis.interpolate(problem.to_mesh(kappa))
    reference = asm(diffusion, problem.basis, kappa=nodal_kappa)
    xy = problem.node_xy.reshape(-1, 2)
    interior = np.flatnonzero(np.all((xy > 0) & (xy < 1), axis=1))
    rng = np.random.default_rng(4)
    left, right = np.zeros((2, size * size))
    left[interior], right[interior] = rng.normal(size=(2, interior.size))
    expected = problem.to_mesh(left) @ reference @ problem.to_mesh(right)
    actual = left[interior] @ problem.stiffness(kappa) @ right[interior]
    np.testing.assert_allclose(actual, expected, rtol=1e-12)


@pytest.mark.parametrize("variable", [False, True])
def test_manufactured_solution_converges_at_rate_two(variable):
    sizes = [9, 17, 33, 65]
    results = [_l2_error(size, variable) for size in sizes]
    errors = np.array([error for error, _, _ in results])
    rates = np.log2(errors[:-1] / errors[1:])
    assert np.all(np.abs(rates - 2.0) < 0.1), rates
    # Point values converge too: sensors at asymmetric points catch a transposed layout.
    _, observed, exact = results[-1]
    np.testing.assert_allclose(observed, exact, atol=2e-3)


def test_outputs_follow_input_dtype():
    problem = SourceProblem(6, SENSORS, 0.1)
    field = torch.randn(3, 6, 6, requires_grad=True)
    data = problem.forward(field)
    assert data.dtype == torch.float32 and data.shape == (3, 4)
    solution = problem.solve(field)
    assert solution.dtype == torch.float32 and solution.shape == (3, 6, 6)
    (data.sum() + solution.sum()).backward()
    assert field.grad is not None and field.grad.dtype == torch.float32
    conductivity = ConductivityProblem(6, SENSORS, 0.1)
    log_kappa = torch.zeros(6, 6, requires_grad=True)
    conductivity.forward(log_kappa).sum().backward()
    assert log_kappa.grad.dtype == torch.float32 and log_kappa.grad.abs().sum() > 0


def test_simulate_observations_noise():
    problem = SourceProblem(6, SENSORS, noise_sd=0.1)
    field = torch.randn(6, 6, dtype=torch.float64)
    assert_close(simulate_observations(problem, field, 5), simulate_observations(problem, field, 5))
    many = field.expand(5000, 6, 6)
    residual = simulate_observations(problem, many, seed=6) - problem.forward(field)
    assert residual.shape == (5000, 4)
    # n = 20000 standard-normal residuals scaled by 0.1: the sample sd has standard error
    # 0.1 / sqrt(2 n) = 5e-4 and the sample mean 0.1 / sqrt(n) = 7e-4; allow 5 standard errors.
    assert abs(residual.std().item() - 0.1) < 5 * 0.1 / np.sqrt(2 * residual.numel())
    assert abs(residual.mean().item()) < 5 * 0.1 / np.sqrt(residual.numel())
