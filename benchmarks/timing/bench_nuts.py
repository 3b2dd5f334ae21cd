"""NUTS cost per gradient against the bare potential's forward+backward (deep prior, FEM source).

Setup: a 10-d latent (4 guided + 6 residual coordinates), a small frozen MLP
generator to a 64x64 nodal field, the scikit-fem source problem with 25 sensors. One run times

- ``bare``: the log density written directly in torch on a flat latent vector, forward and
  backward (no Pyro);
- ``kernel_floor``: NUTS on a quadratic potential of the same dimension, i.e. Pyro's own
  per-gradient bookkeeping (leapfrog updates, tree building, adaptation);
- ``package_floor``: the same quadratic under the package's kernel (``_RecordingNUTS``: Pyro's
  NUTS with a lean single-site trajectory and per-draw statistics);
- Pyro's stock NUTS on the deep-prior model with four potentials: Pyro's default trace-based
  one (``initialize_model``, what ``NUTS(model)`` uses), :class:`LatentPotential` through the
  model's sites (one packed site, log joint accumulated by a messenger), its fast path
  (``InverseProblemModel.log_joint``), and the fast path traced with ``torch.jit.trace``;
- ``package`` and ``package_jit``: what ``infer(..., method="nuts")`` runs (its kernel on the
  fast potential, eager or traced; traced is the default where the trace checks out).

For each, milliseconds per gradient inside NUTS (CPU time of warmup plus sampling, one thread,
divided by potential evaluations), the ratio to ``bare`` (the target is <= 1.5) and the ratio
to the same potential's own forward+backward outside NUTS (what the sampler adds). ``bare``
and the potential are timed just before and after each NUTS run, so slow drifts in machine
load cancel. At the end every variant's time per gradient is printed with its speedup against
``bare`` (``_timing.print_ratios``; ``bare``'s row pools all its timings).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from _timing import Timing, measure, print_ratios
from pyro.infer import MCMC, NUTS
from pyro.infer.mcmc.util import initialize_model
from pyro.ops.integrator import potential_grad

from pyro_dlatent.inverse._pyro_nuts import _RecordingNUTS
from pyro_dlatent.inverse.fem import SourceProblem, default_sensors, simulate_observations
from pyro_dlatent.inverse.potential import LatentPotential
from pyro_dlatent.inverse.prior import DeepPrior, InverseProblemModel
from pyro_dlatent.latent import AuxScaler

__all__ = ["MLPGenerator", "bench", "main"]


class MLPGenerator(torch.nn.Module):
    """A small frozen MLP ``G(z_aux, z_rec) -> (batch, size, size)`` with a fitted scaler."""

    def __init__(
        self, aux_dim: int = 4, residual_dim: int = 6, size: int = 64, hidden: int = 128, seed=0
    ):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.aux_dim, self.residual_dim, self.image_size = aux_dim, residual_dim, size
        self.net = torch.nn.Sequential(
            torch.nn.Linear(aux_dim + residual_dim, hidden),
            torch.nn.Tanh(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.Tanh(),
            torch.nn.Linear(hidden, size * size),
        )
        with torch.no_grad():
            for param in self.net.parameters():
                param.copy_(torch.randn(param.shape, generator=gen) / param.shape[-1] ** 0.5)
        names = ["x0", "y0", "log_amplitude", "width"][:aux_dim]
        names += [f"aux{j}" for j in range(len(names), aux_dim)]
        self.scaler = AuxScaler(names)
        self.scaler.fit(np.random.default_rng(seed).normal(size=(100, aux_dim)))
        self.requires_grad_(False)

    def forward(self, z_aux: torch.Tensor, z_rec: torch.Tensor) -> torch.Tensor:
        latent = torch.cat([z_aux, z_rec], dim=-1)
        return self.net(latent).reshape(-1, self.image_size, self.image_size)


def _bare_log_density(prior: DeepPrior, model: InverseProblemModel, problem: SourceProblem):
    """The same log density as the model, hand-written on theta = (u, z_aux, z_rec)."""
    k, r = prior.latent.aux_dim, prior.latent.residual_dim
    mean = torch.as_tensor(prior.scaler.mean, dtype=torch.float32)
    std = torch.as_tensor(prior.scaler.std, dtype=torch.float32)
    tau = prior.tau
    operator = torch.tensor(problem.sensor_operator, dtype=torch.float32)
    data = model.observations
    sigma = problem.noise_sd
    net = prior.generator.net

    def log_density(theta: torch.Tensor) -> torch.Tensor:
        u, z_aux, z_rec = theta[:k], theta[k : 2 * k], theta[2 * k : 2 * k + r]
        u_std = (u - mean) / std
        field = net(torch.cat([z_aux, z_rec]))
        residual = (data - operator @ field) / sigma
        return -0.5 * (
            u_std.square().sum()
            + ((z_aux - u_std) / tau).square().sum()
            + z_rec.square().sum()
            + residual.square().sum()
        )

    return log_density


def _time_per_call(fn: Any, repeats: int) -> float:
    """Best-of-five mean CPU seconds per call, after ten warm-up calls.

    CPU time of this (single-threaded) process, not wall time: on a shared machine other
    processes' load then only enters through caches, and the minimum of five batches is the
    least disturbed.
    """
    return measure(fn, repeat=5, warmup=10, number=repeats, clock=time.process_time).best


class _Counting:
    def __init__(self, potential: Any) -> None:
        self.potential = potential
        self.calls = 0

    def __call__(self, params: dict) -> torch.Tensor:
        self.calls += 1
        return self.potential(params)


class _Quadratic:
    """``U(theta) = |theta / s|^2 / 2`` as a flat potential (``site``, ``energy``, dict call)."""

    site = "theta"

    def __init__(self, scales: torch.Tensor) -> None:
        self.scales = scales

    def energy(self, theta: torch.Tensor) -> torch.Tensor:
        return 0.5 * (theta / self.scales).square().sum()

    def __call__(self, params: dict) -> torch.Tensor:
        return self.energy(params[self.site])


def _nuts_ms_per_gradient(
    potential: Any,
    initial: dict,
    num_warmup: int,
    num_samples: int,
    seed: int,
    max_tree_depth: int,
    package: bool = False,
) -> dict[str, float]:
    """Run NUTS once and time it per potential-gradient evaluation.

    ``package``: the kernel ``infer(..., method="nuts")`` runs (:class:`_RecordingNUTS`, lean
    single-site trajectory and per-draw statistics) instead of Pyro's stock :class:`NUTS`.
    """
    pyro.set_rng_seed(seed)
    if package:
        kernel = _RecordingNUTS(potential_fn=potential, max_tree_depth=max_tree_depth)
    else:
        counting = _Counting(potential)
        kernel = NUTS(potential_fn=counting, max_tree_depth=max_tree_depth)
    mcmc = MCMC(
        kernel,
        num_samples=num_samples,
        warmup_steps=num_warmup,
        initial_params=initial,
        transforms={},
        disable_progbar=True,
    )
    start, wall = time.process_time(), time.perf_counter()
    mcmc.run()
    seconds = time.process_time() - start
    calls = kernel.potential_fn.calls
    return {
        "seconds": seconds,
        "wall_seconds": time.perf_counter() - wall,
        "gradients": calls,
        "gradients_per_transition": calls / (num_warmup + num_samples),
        "ms_per_gradient": 1e3 * seconds / calls,
        "gradients_per_second": calls / seconds,
    }


def bench(
    *,
    hidden: int = 128,
    size: int = 64,
    noise_sd: float = 1e-2,
    num_warmup: int = 100,
    num_samples: int = 100,
    max_tree_depth: int = 7,
    repeats: int = 200,
    seed: int = 0,
    only: tuple[str, ...] = (),
    report: Any = print,
) -> dict[str, Any]:
    """Time NUTS per gradient for each potential; see the module docstring.

    ``max_tree_depth`` caps a transition at ``2^depth - 1`` gradients so that every
    configuration runs a comparable, bounded number of them.
    """
    torch.set_num_threads(1)
    pyro.enable_validation(False)
    generator = MLPGenerator(size=size, hidden=hidden, seed=seed)
    prior = DeepPrior(generator, tau=0.1)
    problem = SourceProblem(size, default_sensors(5), noise_sd=noise_sd)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        truth = generator(torch.randn(1, 4, generator=gen), torch.randn(1, 6, generator=gen))[0]
    data = simulate_observations(problem, truth, seed=seed + 2)
    model = InverseProblemModel(problem, prior, data)

    pyro.set_rng_seed(seed)
    fast, theta0 = LatentPotential.from_model(model)
    messenger = LatentPotential(model, fast.transforms, fast.shapes, fast=False)
    traced = LatentPotential(model, fast.transforms, fast.shapes)
    traced.compile(theta0[0])
    bare_log_density = _bare_log_density(prior, model, problem)
    start = {"theta": theta0[0]}
    grads = []
    for fn in (bare_log_density, fast.log_density):
        theta = theta0[0].clone().requires_grad_(True)
        grads.append(torch.autograd.grad(fn(theta), theta)[0])
    if not torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-3 * grads[1].abs().max()):
        raise RuntimeError("the bare log density and the model's disagree")

    def bare() -> None:
        theta = theta0[0].clone().requires_grad_(True)
        torch.autograd.grad(-bare_log_density(theta), theta)

    _, pyro_potential, _, _ = initialize_model(model)
    pyro_start = fast.unpack(theta0[0])
    scales = torch.linspace(0.5, 2.0, fast.dim)

    quadratic = _Quadratic(scales)
    zero = {"theta": torch.zeros(fast.dim)}

    # (potential, initial point, whether the package's kernel runs it)
    runs = {
        "kernel_floor": (quadratic, zero, False),
        "package_floor": (quadratic, zero, True),
        "pyro_trace": (pyro_potential, pyro_start, False),
        "latent_messenger": (messenger, start, False),
        "latent_fast": (fast, start, False),
        "latent_fast_jit": (traced, start, False),
        "package": (fast, start, True),
        "package_jit": (traced, start, True),
    }
    if only:
        runs = {k: v for k, v in runs.items() if k in only}
    results: dict[str, Any] = {"nuts": {}}
    bare_seconds: list[float] = []
    for name, (potential, initial, package) in runs.items():
        # The machine is shared: time the bare potential and this potential right before and
        # after the NUTS run, and compare with their mean, so that load drift cancels.
        before = [
            _time_per_call(bare, repeats),
            _time_per_call(_grad_call(potential, initial), repeats),
        ]
        run = _nuts_ms_per_gradient(
            potential, initial, num_warmup, num_samples, seed, max_tree_depth, package
        )
        after = [
            _time_per_call(bare, repeats),
            _time_per_call(_grad_call(potential, initial), repeats),
        ]
        bare_seconds += [before[0], after[0]]
        run["bare_ms"] = 1e3 * (before[0] + after[0]) / 2
        run["potential_ms"] = 1e3 * (before[1] + after[1]) / 2
        run["overhead_vs_bare"] = run["ms_per_gradient"] / run["bare_ms"]
        run["overhead_vs_potential"] = run["ms_per_gradient"] / run["potential_ms"]
        results["nuts"][name] = run
        report(
            f"NUTS {name:>17}: {run['ms_per_gradient']:.3f} ms/gradient "
            f"({run['gradients_per_second']:.0f}/s, {run['gradients_per_transition']:.0f} per "
            f"transition); potential alone {run['potential_ms']:.3f} ms, bare "
            f"{run['bare_ms']:.3f} ms: {run['overhead_vs_bare']:.2f}x bare, "
            f"{run['overhead_vs_potential']:.2f}x its own potential"
        )
    nuts = results["nuts"]
    if nuts:
        report("NUTS CPU time per gradient:")
        rows = [("bare", Timing.from_values(bare_seconds))]
        rows += [
            (name, Timing.from_values([run["ms_per_gradient"] / 1e3])) for name, run in nuts.items()
        ]
        print_ratios(rows, baseline="bare")
    for name in ("package_jit", "package"):
        if name in nuts:
            run = nuts[name]
            report(
                f"package NUTS path ({name}): {run['ms_per_gradient']:.3f} ms per gradient "
                f"against the bare potential's forward+backward {run['bare_ms']:.3f} ms: "
                f"{run['overhead_vs_bare']:.2f}x (target <= 1.5)"
            )
            break
    return results


def _grad_call(potential: Any, initial: dict) -> Any:
    return lambda: potential_grad(potential, initial)


def main(argv: list[str] | None = None) -> dict:
    """Command-line entry point; returns the results it prints."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=128, help="MLP hidden width")
    parser.add_argument("--size", type=int, default=64, help="mesh nodes per axis")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--max-tree-depth", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", default=(), help="run only these variants")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    results = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "hidden": args.hidden,
        "size": args.size,
        **bench(
            hidden=args.hidden,
            size=args.size,
            num_warmup=args.warmup,
            num_samples=args.samples,
            max_tree_depth=args.max_tree_depth,
            seed=args.seed,
            only=tuple(args.only),
            report=lambda line: print(line, flush=True),
        ),
    }
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
