"""Science checks of the deep prior for the elliptic inverse problems (issue 4, point 6).

One script, one subcommand per experiment; each writes a JSON of its numbers (``--out``) and,
where it draws figures, PNG files next to the JSON. All experiments share one setup: the
scikit-fem problems on a 32x32 node grid (the ``sources`` image grid), 25 sensors on a 5x5
lattice (:func:`~pyro_dlatent.inverse.default_sensors`), and Gaussian sensor noise with a fixed
standard deviation ``NOISE_SD = 1e-3`` for the source problem: the clean data of ``sources``
fields span about 0.115 between their 1st and 99th percentiles (kappa = 1), so the noise is
about 1% of the data range.

Subcommands
-----------
``train``
    Train an Aux-VAE on ``sources`` fields (or, with ``--grf``, on draws of a Matérn GRF with
    low-order cosine moments as auxiliaries) and ``.save()`` it to ``--model``.
``misspec``
    Held-out ``sources`` truths: deep prior (MAP field) against the GRF prior whose
    ``(gamma, delta)`` are fitted by maximum marginal likelihood on training observations and
    whose constant mean is the training fields' mean (closed-form posterior mean).
``wellspec``
    GRF truths: deep prior trained on draws of the same GRF against the oracle GRF posterior.
``coverage``
    90% central-interval coverage of ``x0, y0, amplitude, width`` with SVI over many problems,
    and NUTS (R-hat, divergences, coverage) on a few.
``conductivity``
    ``log kappa = 0.1 G(z)`` with a known unit source: SVI posterior mean and sd fields,
    relative L2 error, figures.

Usage (one thread; each step a few minutes on one core)::

    OMP_NUM_THREADS=1 python benchmarks/deep_prior_science.py train --model SCRATCH/sources.pt
    OMP_NUM_THREADS=1 python benchmarks/deep_prior_science.py misspec --model SCRATCH/sources.pt \
        --out results/misspec.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyro.distributions as dist
import torch

from pyro_dlatent.data import from_arrays, simulate
from pyro_dlatent.inverse import (
    ConductivityProblem,
    DeepPrior,
    GRFPrior,
    SourceProblem,
    default_sensors,
    infer,
    simulate_observations,
)
from pyro_dlatent.metrics import relative_l2_error
from pyro_dlatent.models.auxvae import AuxVAE

__all__ = [
    "COND_SCALE",
    "GRF_CORRELATION_LENGTH",
    "GRF_VARIANCE",
    "NAMED",
    "NOISE_SD",
    "SIZE",
    "ScaledGenerator",
    "conductivity",
    "coverage",
    "grf_dataset",
    "interval_hits",
    "main",
    "misspec",
    "source_u_prior",
    "train",
    "wellspec",
]

SIZE = 32
"""Nodes per axis (the ``sources`` image grid)."""
NOISE_SD = 1e-3
"""Sensor noise sd of the source problem, about 1% of the clean data's 1-99% range."""
GRF_CORRELATION_LENGTH = 0.3
"""Matérn correlation length of the well-specified GRF."""
GRF_VARIANCE = 1.0
"""Marginal variance of the well-specified GRF."""
COND_SCALE = 0.1
"""log kappa = COND_SCALE * sources field: kappa in about [0.9, 2.6]."""
NAMED = ("x0", "y0", "log_amplitude", "width")
"""The ``sources`` auxiliaries, in latent order."""


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def source_problem(noise_sd: float = NOISE_SD) -> SourceProblem:
    """The source problem of every experiment (unit conductivity, 5x5 sensors)."""
    return SourceProblem(SIZE, default_sensors(5), noise_sd=noise_sd)


def source_u_prior() -> dict[str, dist.Distribution]:
    """The exact prior the ``sources`` simulator draws its auxiliaries from (default ranges)."""
    return {
        "x0": dist.Uniform(0.2, 0.8),
        "y0": dist.Uniform(0.2, 0.8),
        "log_amplitude": dist.Uniform(0.0, math.log(10.0)),
        "width": dist.Uniform(0.05, 0.15),
    }


# --------------------------------------------------------------------------- data and training
def grf_dataset(num: int, seed: int, num_modes: int = 2) -> Any:
    """Draws of the well-specified GRF with low-order cosine moments as auxiliaries.

    The auxiliaries are the field's projections on the separable cosines
    ``phi_kl(x, y) = cos(k pi x) cos(l pi y)`` for ``0 <= k, l < num_modes`` (trapezoid rule on
    the node grid): ``c00`` is the field's mean, ``c10``/``c01`` its first horizontal/vertical
    gradient modes, ``c11`` the saddle mode. They are smooth linear functionals, so they are
    well identified by 25 sensors and Gaussian under the prior.
    """
    grf = GRFPrior.from_matern(SIZE, correlation_length=GRF_CORRELATION_LENGTH, variance=1.0)
    images = grf.sample(num, seed=seed).numpy()
    return from_arrays(images, cosine_moments(images, num_modes))


def cosine_moments(images: np.ndarray, num_modes: int = 2) -> dict[str, np.ndarray]:
    """Cosine moments ``c_kl = int f cos(k pi x) cos(l pi y)`` of images ``(n, H, W)``."""
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


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train and save an Aux-VAE on ``sources`` (default) or GRF draws (``--grf``)."""
    torch.set_num_threads(1)
    if args.grf:
        ds = grf_dataset(args.num, seed=args.seed)
    else:
        ds = simulate("sources", args.num, size=SIZE, seed=args.seed)
    vae = AuxVAE.from_dataset(ds, residual_dim=args.residual_dim, seed=args.seed)
    start = time.perf_counter()
    history = vae.fit(ds, epochs=args.epochs, batch_size=128, seed=args.seed, progress=False)
    elapsed = time.perf_counter() - start
    path = vae.save(args.model)
    last = history[-1]
    _log(f"trained in {elapsed:.0f} s, last record {last}")
    return {
        "model": str(path.name),
        "num": args.num,
        "epochs": args.epochs,
        "residual_dim": args.residual_dim,
        "grf": bool(args.grf),
        "train_s": elapsed,
        "last_epoch": {k: v for k, v in last.items() if isinstance(v, int | float)},
    }


def load_generator(path: str) -> torch.nn.Module:
    """The frozen decoder of a saved Aux-VAE, in float64."""
    return AuxVAE.load(path).generator().to(torch.float64)


# --------------------------------------------------------------------------- helpers
def deep_field(
    problem: Any, prior: DeepPrior, data: torch.Tensor, method: str, seed: int, **kwargs: Any
) -> tuple[np.ndarray, Any]:
    """Posterior-mean field of the deep prior (MAP: the field at the mode) and the result."""
    result = infer(problem, prior, data, method=method, seed=seed, progress=False, **kwargs)
    return np.asarray(result.idata["field_summary"]["field_mean"]), result


def _ratio_summary(deep: np.ndarray, baseline: np.ndarray) -> dict[str, float]:
    ratio = baseline / deep
    return {
        "deep_median": float(np.median(deep)),
        "deep_mean": float(np.mean(deep)),
        "baseline_median": float(np.median(baseline)),
        "baseline_mean": float(np.mean(baseline)),
        "ratio_of_medians": float(np.median(baseline) / np.median(deep)),
        "ratio_of_means": float(np.mean(baseline) / np.mean(deep)),
        "median_of_ratios": float(np.median(ratio)),
        "fraction_deep_better": float(np.mean(ratio > 1.0)),
    }


def _map_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"num_starts": args.num_starts, "steps": args.steps, "lbfgs_steps": args.lbfgs_steps}


# --------------------------------------------------------------------------- experiments
def misspec(args: argparse.Namespace) -> dict[str, Any]:
    """Deep prior vs ML-fitted GRF on held-out ``sources`` truths (relative L2 of the mean)."""
    torch.set_num_threads(1)
    problem = source_problem()
    train_ds = simulate("sources", args.num_fit, size=SIZE, seed=args.fit_seed)
    train_fields = torch.as_tensor(train_ds["image"].values, dtype=torch.float64)
    train_data = simulate_observations(problem, train_fields, seed=args.fit_seed)
    constant_mean = float(train_fields.mean())
    start = GRFPrior.from_matern(SIZE, 0.2, 1.0, mean=constant_mean)
    grf = start.fit_hyperparameters(problem, train_data)
    _log(f"GRF fit: gamma={grf.gamma:.4g} delta={grf.delta:.4g} rho={grf.correlation_length:.3g}")
    test = simulate("sources", args.num_problems, size=SIZE, seed=args.test_seed)
    truths = torch.as_tensor(test["image"].values, dtype=torch.float64)
    data = simulate_observations(problem, truths, seed=args.test_seed + 1)
    grf_mean, _ = grf.posterior(problem, data)
    grf_err = relative_l2_error(grf_mean.numpy(), truths.numpy())
    prior = DeepPrior(load_generator(args.model), u_prior=source_u_prior())
    deep_err = []
    for i in range(args.num_problems):
        mean, _ = deep_field(problem, prior, data[i], args.method, seed=i, **_map_kwargs(args))
        deep_err.append(float(relative_l2_error(mean[None], truths[i][None].numpy())[0]))
        _log(f"problem {i}: deep {deep_err[-1]:.3f} grf {grf_err[i]:.3f}")
    deep_err = np.asarray(deep_err)
    summary = _ratio_summary(deep_err, grf_err)
    return {
        "experiment": "misspec",
        "noise_sd": NOISE_SD,
        "method": args.method,
        "num_problems": args.num_problems,
        "grf": {
            "gamma": grf.gamma,
            "delta": grf.delta,
            "correlation_length": grf.correlation_length,
            "marginal_variance": grf.marginal_variance,
            "constant_mean": constant_mean,
            "num_fit": args.num_fit,
        },
        "deep_errors": deep_err.tolist(),
        "grf_errors": grf_err.tolist(),
        **summary,
        "target_ratio": 2.0,
        "met": bool(min(summary["ratio_of_medians"], summary["ratio_of_means"]) >= 2.0),
    }


def wellspec(args: argparse.Namespace) -> dict[str, Any]:
    """Deep prior trained on GRF draws vs the oracle GRF posterior on GRF truths."""
    torch.set_num_threads(1)
    problem = source_problem(args.noise_sd)
    grf = GRFPrior.from_matern(SIZE, correlation_length=GRF_CORRELATION_LENGTH, variance=1.0)
    truths = grf.sample(args.num_problems, seed=args.test_seed)
    data = simulate_observations(problem, truths, seed=args.test_seed + 1)
    oracle_mean, _ = grf.posterior(problem, data)
    oracle_err = relative_l2_error(oracle_mean.numpy(), truths.numpy())
    prior = DeepPrior(load_generator(args.model))
    deep_err = []
    for i in range(args.num_problems):
        mean, _ = deep_field(problem, prior, data[i], args.method, seed=i, **_map_kwargs(args))
        deep_err.append(float(relative_l2_error(mean[None], truths[i][None].numpy())[0]))
        _log(f"problem {i}: deep {deep_err[-1]:.3f} oracle {oracle_err[i]:.3f}")
    deep_err = np.asarray(deep_err)
    summary = _ratio_summary(deep_err, oracle_err)
    excess = summary["deep_mean"] / summary["baseline_mean"]
    return {
        "experiment": "wellspec",
        "noise_sd": args.noise_sd,
        "method": args.method,
        "grf": {"correlation_length": GRF_CORRELATION_LENGTH, "variance": GRF_VARIANCE},
        "num_problems": args.num_problems,
        "deep_errors": deep_err.tolist(),
        "oracle_errors": oracle_err.tolist(),
        **summary,
        "deep_over_oracle_mean": excess,
        "deep_over_oracle_median": summary["deep_median"] / summary["baseline_median"],
        "target": 1.2,
        "met": bool(excess <= 1.2),
    }


def interval_hits(draws: np.ndarray, truth: np.ndarray, level: float = 0.9) -> np.ndarray:
    """Whether each truth ``(k,)`` lies in the central ``level`` interval of draws ``(n, k)``."""
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return (lo <= truth) & (truth <= hi)


def _named_draws(samples: torch.Tensor) -> np.ndarray:
    """``u`` draws ``(chain, draw, 4)`` to ``(n, 4)`` with ``log_amplitude`` exponentiated."""
    u = samples.reshape(-1, samples.shape[-1]).double().numpy().copy()
    u[:, 2] = np.exp(u[:, 2])
    return u


def coverage(args: argparse.Namespace) -> dict[str, Any]:
    """90% interval coverage of the named parameters with SVI (many problems) and NUTS (few)."""
    torch.set_num_threads(1)
    problem = source_problem()
    test = simulate("sources", max(args.num_svi, args.num_nuts), size=SIZE, seed=args.test_seed)
    truths = torch.as_tensor(test["image"].values, dtype=torch.float64)
    u_true = np.stack([test[k].values for k in NAMED], axis=-1).astype(np.float64)
    u_true[:, 2] = np.exp(u_true[:, 2])
    data = simulate_observations(problem, truths, seed=args.test_seed + 1)
    prior = DeepPrior(load_generator(args.model), u_prior=source_u_prior(), tau=args.tau)
    names = ["x0", "y0", "amplitude", "width"]
    out: dict[str, Any] = {
        "experiment": "coverage",
        "noise_sd": NOISE_SD,
        "level": 0.9,
        "tau": prior.generator.tau if args.tau is None else args.tau,
    }
    hits = []
    for i in range(args.num_svi):
        _, result = deep_field(
            problem,
            prior,
            data[i],
            "svi",
            seed=i,
            guide=args.guide,
            steps=args.svi_steps,
            num_samples=1000,
            num_starts=args.num_starts,
            warn=False,
        )
        hits.append(interval_hits(_named_draws(result.samples["u"]), u_true[i]))
        _log(f"svi problem {i}: hits {hits[-1].astype(int).tolist()}")
    if hits:
        cov = np.mean(hits, axis=0)
        out["svi"] = {
            "guide": args.guide,
            "steps": args.svi_steps,
            "num_problems": len(hits),
            "coverage": dict(zip(names, cov.tolist(), strict=True)),
            "binomial_se": math.sqrt(0.9 * 0.1 / len(hits)),
            "met": bool(np.all((cov >= 0.8) & (cov <= 0.97))),
        }
    hits, rhats, divergences = [], [], []
    for i in range(args.num_nuts):
        _, result = deep_field(
            problem,
            prior,
            data[i],
            "nuts",
            seed=i,
            num_samples=args.nuts_draws,
            num_warmup=args.nuts_draws,
            num_chains=2,
            jit_compile=args.jit,
            warn=False,
        )
        hits.append(interval_hits(_named_draws(result.samples["u"]), u_true[i]))
        rhats.append(result.health["max_rhat"])
        divergences.append(result.health["divergences"])
        _log(f"nuts problem {i}: hits {hits[-1].astype(int).tolist()} health {result.health}")
    if hits:
        cov = np.mean(hits, axis=0)
        out["nuts"] = {
            "num_problems": len(hits),
            "chains": 2,
            "draws": args.nuts_draws,
            "coverage": dict(zip(names, cov.tolist(), strict=True)),
            "max_rhat": rhats,
            "divergences": divergences,
            "worst_rhat": float(np.max(rhats)),
            "total_divergences": int(np.sum(divergences)),
            "met": bool(np.max(rhats) <= 1.01 and np.sum(divergences) == 0),
        }
    return out


class ScaledGenerator(torch.nn.Module):
    """``scale * G(z_aux, z_rec)``: a trained generator mapped to a log-conductivity range."""

    def __init__(self, generator: torch.nn.Module, scale: float) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"expected scale > 0, got {scale}")
        self.inner = generator
        self.scale = float(scale)
        for name in ("aux_dim", "residual_dim", "image_size", "scaler", "tau"):
            setattr(self, name, getattr(generator, name))

    def forward(self, z_aux: torch.Tensor, z_rec: torch.Tensor) -> torch.Tensor:
        return self.scale * self.inner(z_aux, z_rec)


def conductivity(args: argparse.Namespace) -> dict[str, Any]:
    """Worked example: log kappa = 0.1 G(z), unit source, SVI mean and sd fields, figures."""
    import matplotlib

    matplotlib.use("Agg")
    from pyro_dlatent.plots import observed_vs_predicted, posterior_fields

    torch.set_num_threads(1)
    test = simulate("sources", 1, size=SIZE, seed=args.test_seed)
    truth = COND_SCALE * torch.as_tensor(test["image"].values, dtype=torch.float64)
    clean_problem = ConductivityProblem(SIZE, default_sensors(5), noise_sd=1.0, source=1.0)
    with torch.no_grad():
        clean = clean_problem.forward(truth)
    noise_sd = 0.01 * float(clean.max() - clean.min())
    problem = ConductivityProblem(SIZE, default_sensors(5), noise_sd=noise_sd, source=1.0)
    data = simulate_observations(problem, truth, seed=args.test_seed + 1)[0]
    prior = DeepPrior(
        ScaledGenerator(load_generator(args.model), COND_SCALE), u_prior=source_u_prior()
    )
    start = time.perf_counter()
    result = infer(
        problem,
        prior,
        data,
        method=args.method,
        seed=0,
        steps=args.svi_steps,
        num_starts=args.num_starts,
        num_samples=args.num_samples,
        num_warmup=args.num_samples,
        num_chains=2,
        guide="fullrank",
        progress=False,
        warn=False,
    )
    elapsed = time.perf_counter() - start
    summary = result.idata["field_summary"]
    mean = np.asarray(summary["field_mean"])
    sd = np.asarray(summary["field_sd"])
    err = float(relative_l2_error(mean[None], truth.numpy())[0])
    abs_err = np.abs(mean - truth[0].numpy())
    inside = float(np.mean(abs_err <= 1.645 * sd))
    outdir = Path(args.out).parent if args.out else Path(".")
    outdir.mkdir(parents=True, exist_ok=True)
    fig = posterior_fields(truth[0].numpy(), mean, sd, sensors=problem.sensors, title="log kappa")
    fig.savefig(outdir / "conductivity_fields.png", dpi=120)
    predictive = np.asarray(result.idata["posterior_predictive"]["obs"]).reshape(-1, 25)
    fig = observed_vs_predicted(data.numpy(), predictive.mean(0), predictive.std(0))
    fig.savefig(outdir / "conductivity_obs_vs_pred.png", dpi=120)
    u = _named_draws(result.samples["u"])
    u_true = np.array([float(test[k].values[0]) for k in NAMED])
    u_true[2] = math.exp(u_true[2])
    return {
        "experiment": "conductivity",
        "method": args.method,
        "log_kappa_scale": COND_SCALE,
        "noise_sd": noise_sd,
        "relative_l2_error": err,
        "mean_posterior_sd": float(sd.mean()),
        "fraction_nodes_within_90pct": inside,
        "u_true": dict(zip(["x0", "y0", "amplitude", "width"], u_true.tolist(), strict=True)),
        "u_mean": dict(zip(["x0", "y0", "amplitude", "width"], u.mean(0).tolist(), strict=True)),
        "u_sd": dict(zip(["x0", "y0", "amplitude", "width"], u.std(0).tolist(), strict=True)),
        "health": {k: v for k, v in result.health.items() if isinstance(v, int | float | bool)},
        "seconds": elapsed,
        "figures": ["conductivity_fields.png", "conductivity_obs_vs_pred.png"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train")
    p.add_argument("--model", required=True)
    p.add_argument("--num", type=int, default=4096)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--residual_dim", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grf", action="store_true")
    p.add_argument("--out")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True, help="a saved Aux-VAE (see train)")
    common.add_argument("--out")
    common.add_argument("--test_seed", type=int, default=1000)
    common.add_argument("--num_starts", type=int, default=8)
    common.add_argument("--steps", type=int, default=300)
    common.add_argument("--lbfgs_steps", type=int, default=100)
    common.add_argument("--method", default="map", choices=["map", "svi", "nuts"])
    p = sub.add_parser("misspec", parents=[common])
    p.add_argument("--num_problems", type=int, default=20)
    p.add_argument("--num_fit", type=int, default=256)
    p.add_argument("--fit_seed", type=int, default=500)
    p = sub.add_parser("wellspec", parents=[common])
    p.add_argument("--num_problems", type=int, default=20)
    p.add_argument("--noise_sd", type=float, default=NOISE_SD)
    p = sub.add_parser("coverage", parents=[common])
    p.add_argument("--num_svi", type=int, default=50)
    p.add_argument("--num_nuts", type=int, default=10)
    p.add_argument("--svi_steps", type=int, default=1000)
    p.add_argument("--guide", default="fullrank", choices=["normal", "lowrank", "fullrank"])
    p.add_argument("--nuts_draws", type=int, default=300)
    p.add_argument("--jit", action="store_true")
    p.add_argument(
        "--tau", type=float, default=None, help="override the generator's tau (model-error slack)"
    )
    p = sub.add_parser("conductivity", parents=[common])
    p.add_argument("--svi_steps", type=int, default=1000)
    p.add_argument("--num_samples", type=int, default=500)
    args = parser.parse_args(argv)
    commands = {
        "train": train,
        "misspec": misspec,
        "wellspec": wellspec,
        "coverage": coverage,
        "conductivity": conductivity,
    }
    result = commands[args.command](args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2, default=float))
    print(json.dumps(result, indent=2, default=float))


if __name__ == "__main__":
    main()
