"""Time the differentiable FEM solves against bare scipy baselines with the same factorization.

Run ``python benchmarks/timing/bench_fem.py [--size 64] [--sensors-per-axis 5]
[--output bench_fem.json]``.
Every timing is the best of ``--repeats`` interleaved blocks of calls after one warm-up call
(``_timing.measure_interleaved``); ratios compare a torch path with the bare scipy computation it
wraps (same LU options, built independently from scikit-fem in its own node order). Each group
is printed with its speedups against its bare baseline (medians), then the ratios of the best
times, torch path over baseline, which the targets are stated in:

(a) assembling stiffness and mass with scikit-fem and factorizing, and building a
    :class:`SourceProblem` (the same plus the dense sensor operator, ``m`` adjoint solves);
(b) one bare factorized forward solve ``K^-1 (M f)`` plus adjoint solve ``M^T K^-T g``;
(c) ``SourceProblem.solve`` forward + backward through torch, for 1 and for a batch of RHS;
(d) ``SourceProblem.forward`` (dense sensor operator) forward + backward vs bare numpy products;
(e) one ``ConductivityProblem.forward`` + backward vs a bare scikit-fem assemble, LU, solve and
    adjoint solve;
(f) the target (<= 1.3x): one Gaussian log-likelihood + gradient evaluation through the
    package against bare scipy, for the source problem (package: the dense sensor operator;
    bare: a factorized forward + adjoint solve, and also bare numpy products with the same
    operator) and for the conductivity problem (both re-assemble ``K(kappa)`` with the same
    linear assembly map, factorize, solve forward and adjoint; the bare one in plain scipy).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from _timing import Timing, measure_interleaved, print_ratios
from scipy.sparse.linalg import splu
from skfem import asm, condense

from pyro_dlatent.inverse.fem import (
    ConductivityProblem,
    SourceProblem,
    default_sensors,
    diffusion,
    mass,
)

__all__ = ["main", "run"]


def _interleaved(
    functions: dict[str, Callable[[], object]], repeats: int, number: int
) -> dict[str, Timing]:
    """Each function timed over ``repeats`` interleaved blocks of ``number`` calls.

    Interleaving the baseline and the wrapped call and keeping the best block is the usual
    defence against other processes sharing the CPU.
    """
    return dict(measure_interleaved(functions, repeat=repeats, warmup=1, number=number))


_GROUPS = (
    ("assembly and factorization", "assemble_factorize", ["source_problem_setup"]),
    *(
        (
            f"solve with adjoint, {count} right-hand side(s)",
            f"bare_solve_adjoint_{count}",
            [f"torch_solve_backward_{count}", f"torch_operator_{count}"],
        )
        for count in ("1", "batch")
    ),
    *(
        (
            f"sensor operator, {count} right-hand side(s)",
            f"bare_operator_{count}",
            [f"torch_operator_{count}"],
        )
        for count in ("1", "batch")
    ),
    ("conductivity forward and backward", "bare_conductivity", ["torch_conductivity"]),
    ("source log-likelihood, solve", "bare_source_likelihood_solve", ["torch_source_likelihood"]),
    (
        "source log-likelihood, operator",
        "bare_source_likelihood_operator",
        ["torch_source_likelihood"],
    ),
    (
        "conductivity log-likelihood",
        "bare_conductivity_likelihood",
        ["torch_conductivity_likelihood"],
    ),
)
"""Printed groups: a title, the baseline and the torch paths compared with it."""


def _print_groups(timings: dict[str, Timing], batch: int) -> None:
    for title, baseline, others in _GROUPS:
        names = [n.replace("batch", str(batch)) for n in (baseline, *others)]
        print(title.replace("batch", str(batch)) + ":")
        print_ratios([(name, timings[name]) for name in names], baseline=names[0])


def _factorize(matrix: sp.spmatrix) -> object:
    return splu(sp.csc_matrix(matrix), permc_spec="MMD_AT_PLUS_A", options={"SymmetricMode": True})


def run(size: int = 64, sensors_per_axis: int = 5, batch: int = 64, repeats: int = 20) -> dict:
    """Run every timing, print each group's speedups, return the times (ms) and the ratios."""
    sensors = default_sensors(sensors_per_axis)
    rng = np.random.default_rng(0)
    problem = SourceProblem(size, sensors, noise_sd=0.01)
    conductivity = ConductivityProblem(size, sensors, noise_sd=0.01, source=1.0)
    print(f"size {size}x{size}, {problem.num_sensors} sensors", flush=True)

    # Bare scipy baseline in scikit-fem's node order: condensed K_II, M_I, H_I, same LU options.
    basis = problem.basis
    boundary = basis.get_dofs().flatten()
    interior = basis.complement_dofs(boundary)
    mass_matrix = asm(mass, basis).tocsr()
    mass_interior = mass_matrix[interior]
    mass_interior_t = mass_interior.T.tocsr()
    probes_interior = basis.probes(sensors.T).tocsr()[:, interior]

    def assemble_and_factorize() -> object:
        stiffness = asm(diffusion, basis, kappa=1.0)
        asm(mass, basis)
        return _factorize(condense(stiffness, D=boundary, expand=False))

    timings = _interleaved(
        {
            "assemble_factorize": assemble_and_factorize,
            "source_problem_setup": lambda: SourceProblem(size, sensors, noise_sd=0.01),
        },
        repeats=max(3, repeats // 4),
        number=1,
    )
    factor = assemble_and_factorize()
    sensor_operator = problem.sensor_operator
    for count in (1, batch):
        source = rng.standard_normal((size * size, count))
        cotangent = rng.standard_normal((interior.size, count))
        field = torch.as_tensor(source.T.reshape(count, size, size)).requires_grad_()
        solution_cotangent = torch.as_tensor(rng.standard_normal((count, size, size)))
        data_cotangent = torch.as_tensor(rng.standard_normal((count, problem.num_sensors)))

        def bare_solve(source=source, cotangent=cotangent) -> object:
            factor.solve(mass_interior @ source)
            return mass_interior_t @ factor.solve(cotangent, trans="T")

        def torch_solve(field=field, cotangent=solution_cotangent) -> object:
            return torch.autograd.grad(problem.solve(field), field, cotangent)

        def bare_operator(source=source, cotangent=data_cotangent.numpy()) -> object:
            sensor_operator @ source
            return sensor_operator.T @ cotangent.T

        def torch_operator(field=field, cotangent=data_cotangent) -> object:
            return torch.autograd.grad(problem.forward(field), field, cotangent)

        number = 20 if count == 1 else 2
        measured = _interleaved(
            {
                f"bare_solve_adjoint_{count}": bare_solve,
                f"torch_solve_backward_{count}": torch_solve,
                f"bare_operator_{count}": bare_operator,
                f"torch_operator_{count}": torch_operator,
            },
            repeats=repeats,
            number=number,
        )
        timings.update(measured)

    load = mass_matrix @ np.ones(size * size)
    log_kappa_image = 0.5 * rng.standard_normal((size, size))
    kappa_mesh = problem.to_mesh(np.exp(log_kappa_image))
    data_cotangent = rng.standard_normal(problem.num_sensors)

    def bare_conductivity() -> object:
        stiffness = asm(diffusion, basis, kappa=basis.interpolate(kappa_mesh))
        reduced, reduced_load = condense(stiffness, load, D=boundary, expand=False)
        lu = _factorize(reduced)
        probes_interior @ lu.solve(reduced_load)
        return lu.solve(probes_interior.T @ data_cotangent, trans="T")

    log_kappa = torch.as_tensor(log_kappa_image).requires_grad_()
    cotangent = torch.as_tensor(data_cotangent)

    def torch_conductivity() -> object:
        return torch.autograd.grad(conductivity.forward(log_kappa), log_kappa, cotangent)

    timings.update(
        _interleaved(
            {"bare_conductivity": bare_conductivity, "torch_conductivity": torch_conductivity},
            repeats=repeats,
            number=2,
        )
    )

    # One log-likelihood + gradient evaluation, l(f) = -|(d - F(f)) / sigma|^2 / 2, per problem.
    sigma = 0.01
    data = rng.standard_normal(problem.num_sensors)
    data_t = torch.as_tensor(data)
    source_image = rng.standard_normal((size, size))
    source_field = torch.as_tensor(source_image).requires_grad_()
    source_flat = source_image.ravel()  # image order, as the sensor operator and mesh nodes

    def bare_source_likelihood() -> object:
        # Factorized forward solve K^-1 M f, sensor values, adjoint solve K^-T H^T r, M^T.
        state = factor.solve(mass_interior @ problem.to_mesh(source_image).ravel())
        residual = (data - probes_interior @ state) / sigma
        adjoint = factor.solve(probes_interior.T @ (residual / sigma), trans="T")
        return -0.5 * residual @ residual, mass_interior_t @ adjoint

    def torch_source_likelihood() -> object:
        residual = (data_t - problem.forward(source_field)) / sigma
        value = -0.5 * residual.square().sum()
        return value, torch.autograd.grad(value, source_field)

    def bare_operator_likelihood() -> object:
        residual = (data - sensor_operator @ source_flat) / sigma
        return -0.5 * residual @ residual, sensor_operator.T @ (residual / sigma)

    derivative = conductivity._stiffness_derivative
    pattern_rows, pattern_cols = conductivity._pattern_rows, conductivity._pattern_cols
    indptr = conductivity._indptr
    n_interior = interior.size
    kappa_image = np.exp(log_kappa_image).ravel()
    load_interior = conductivity._load_interior
    observation = conductivity._observation

    def bare_conductivity_likelihood() -> object:
        # Cheapest assembly of the same P1 stiffness: the precomputed linear map kappa -> K_II
        # entries (one sparse product), then LU, forward solve, adjoint solve, gradient.
        values = derivative @ kappa_image
        lu = _factorize(sp.csc_matrix((values, pattern_rows, indptr), shape=(n_interior,) * 2))
        state = lu.solve(load_interior)
        full = np.zeros(size * size)
        full[conductivity._interior] = state
        residual = (data - observation @ full) / sigma
        cotangent = observation.T @ (residual / sigma)
        adjoint = lu.solve(cotangent[conductivity._interior], trans="T")
        grad = (derivative.T @ (adjoint[pattern_rows] * state[pattern_cols])) * kappa_image
        return -0.5 * residual @ residual, grad

    def torch_conductivity_likelihood() -> object:
        residual = (data_t - conductivity.forward(log_kappa)) / sigma
        value = -0.5 * residual.square().sum()
        return value, torch.autograd.grad(value, log_kappa)

    # The two likelihood implementations must agree before they are timed.
    for bare_fn, torch_fn in (
        (bare_conductivity_likelihood, torch_conductivity_likelihood),
        (bare_operator_likelihood, torch_source_likelihood),
        (bare_source_likelihood, torch_source_likelihood),
    ):
        (bare_value, _), (torch_value, _) = bare_fn(), torch_fn()
        if not np.isclose(bare_value, float(torch_value), rtol=1e-8):
            raise RuntimeError(f"{bare_fn.__name__} and {torch_fn.__name__} disagree")
    timings.update(
        _interleaved(
            {
                "bare_source_likelihood_solve": bare_source_likelihood,
                "bare_source_likelihood_operator": bare_operator_likelihood,
                "torch_source_likelihood": torch_source_likelihood,
                "bare_conductivity_likelihood": bare_conductivity_likelihood,
                "torch_conductivity_likelihood": torch_conductivity_likelihood,
            },
            repeats=repeats,
            number=4,
        )
    )

    _print_groups(timings, batch)
    best_ms = {name: 1e3 * timing.best for name, timing in timings.items()}
    median_ms = {name: 1e3 * timing.median for name, timing in timings.items()}
    timings = best_ms
    ratios = {
        "likelihood_source_vs_bare_solve": timings["torch_source_likelihood"]
        / timings["bare_source_likelihood_solve"],
        "likelihood_source_vs_bare_operator": timings["torch_source_likelihood"]
        / timings["bare_source_likelihood_operator"],
        "likelihood_conductivity_vs_bare": timings["torch_conductivity_likelihood"]
        / timings["bare_conductivity_likelihood"],
    }
    for count in (1, batch):
        ratios[f"solve_{count}"] = (
            timings[f"torch_solve_backward_{count}"] / timings[f"bare_solve_adjoint_{count}"]
        )
        ratios[f"operator_{count}_vs_bare_solve_{count}"] = (
            timings[f"torch_operator_{count}"] / timings[f"bare_solve_adjoint_{count}"]
        )
        ratios[f"operator_{count}_vs_bare_operator_{count}"] = (
            timings[f"torch_operator_{count}"] / timings[f"bare_operator_{count}"]
        )
    ratios["conductivity"] = timings["torch_conductivity"] / timings["bare_conductivity"]
    return {
        "size": size,
        "num_sensors": problem.num_sensors,
        "batch": batch,
        "torch_threads": torch.get_num_threads(),
        "timings_ms": timings,
        "median_timings_ms": median_ms,
        "ratios": ratios,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--sensors-per-axis", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = run(args.size, args.sensors_per_axis, args.batch, args.repeats)
    batch = report["batch"]
    per_rhs = report["timings_ms"][f"torch_solve_backward_{batch}"] / batch
    print(f"  {'torch_solve_backward per RHS':<32s} {per_rhs:9.3f} ms (batch {batch})")
    print("ratios of the best times (torch path / bare scipy or numpy baseline; target <= 1.3):")
    for name, value in report["ratios"].items():
        print(f"  {name:<32s} {value:9.2f}x")
    if args.output is not None:
        args.output.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
