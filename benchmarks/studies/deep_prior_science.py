"""Science checks of the deep prior for the elliptic inverse problems.

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
    Held-out ``sources`` truths: deep prior (MAP field, or with ``--method svi`` the SVI
    posterior-mean field) against the GRF prior whose ``(gamma, delta)`` are fitted by maximum
    marginal likelihood on training observations and whose constant mean is the training
    fields' mean (closed-form posterior mean). Also the *known-bump oracle*: the exact posterior
    mean when the bump is known and only the simulator's Matérn residual (sd 0.25, length
    0.15, smoothness 1) is conditioned on the data — the floor of any prior that is sure of the
    bump; ``--method none`` computes only the GRF and the oracle.
``wellspec``
    GRF truths: deep prior trained on draws of the same GRF against the oracle GRF posterior.
``coverage``
    90% central-interval coverage of ``x0, y0, amplitude, width`` with SVI over many problems,
    and NUTS (R-hat, divergences, coverage) on a few. ``--tau`` (one value or one per
    auxiliary) or ``--calibrate_tau N`` sets the deep prior's model-error slack.
``calibrate``
    Per-coordinate ``tau`` of a saved Aux-VAE from held-out images
    (:func:`pyro_dlatent.inverse.calibrate_tau`), to pass to shards with ``--tau``.
``merge``
    Pool the JSONs of shards of one ``coverage`` or ``misspec`` run into the summary the
    unsharded run gives (:func:`pyro_dlatent.inverse.studies.merge_results`).
``conductivity``
    ``log kappa = 0.1 G(z)`` with a known unit source: SVI posterior mean and sd fields,
    relative L2 error, figures.

Sharding: problem ``i`` has the same truth, data and seed whatever the sharding
(:func:`pyro_dlatent.inverse.studies.sources_problems`), so ``--start i --num_svi k`` runs
problems ``i .. i + k - 1``.

Usage (with ``OMP_NUM_THREADS=1``; each step a few minutes on one core)::

    python benchmarks/studies/deep_prior_science.py train --model SCRATCH/sources.pt
    python benchmarks/studies/deep_prior_science.py misspec --model SCRATCH/sources.pt \
        --out results/misspec.json
    python benchmarks/studies/deep_prior_science.py calibrate --model SCRATCH/sources.pt \
        --num 512 --out results/tau.json
    python benchmarks/studies/deep_prior_science.py coverage --model SCRATCH/sources.pt \
        --tau T_X0 T_Y0 T_LOGA T_WIDTH --start 0 --num_svi 10 --num_nuts 0 --out results/cov0.json
    python benchmarks/studies/deep_prior_science.py merge --out results/coverage.json \
        results/cov*.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyro_dlatent.calibration import interval_hits
from pyro_dlatent.data import from_arrays, simulate
from pyro_dlatent.data.sources import residual_covariance
from pyro_dlatent.inverse import (
    BumpPrior,
    ConductivityProblem,
    DeepPrior,
    GRFPrior,
    SourceProblem,
    calibrate_tau,
    default_sensors,
    infer,
    infer_collapsed,
    simulate_observations,
)
from pyro_dlatent.inverse.exact import NAMES, known_bump_mean
from pyro_dlatent.inverse.grf import cosine_moments
from pyro_dlatent.inverse.model_error import ModelErrorProblem
from pyro_dlatent.inverse.studies import (
    COVERAGE_NAMES,
    NOISE_SD,
    SIZE,
    coverage_summary,
    merge_results,
    misspec_summary,
    named_draws,
    ratio_summary,
    source_problem,
    sources_problems,
)
from pyro_dlatent.metrics import relative_l2_error
from pyro_dlatent.models.auxvae import AuxVAE

__all__ = [
    "COND_SCALE",
    "GRF_CORRELATION_LENGTH",
    "GRF_VARIANCE",
    "ScaledGenerator",
    "calibrate",
    "calibrate_model_tau",
    "conductivity",
    "coverage",
    "grf_dataset",
    "main",
    "merge",
    "misspec",
    "svi_field",
    "train",
    "wellspec",
]

GRF_CORRELATION_LENGTH = 0.3
"""Matérn correlation length of the well-specified GRF."""
GRF_VARIANCE = 1.0
"""Marginal variance of the well-specified GRF."""
COND_SCALE = 0.1
"""log kappa = COND_SCALE * sources field: kappa in about [0.9, 2.6]."""


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


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


def svi_field(
    problem: Any, prior: DeepPrior, data: torch.Tensor, seed: int, **kwargs: Any
) -> tuple[np.ndarray, Any, str]:
    """SVI started at the MAP (Laplace), falling back to the prior median if that fails.

    A Laplace start whose inverse Hessian is huge along a flat direction can draw overflowing
    fields at the first step (``infer`` then raises); the prior-median start does not.

    Returns
    -------
    field_mean : ndarray, shape ``(H, W)``
    result : InferenceResult
    svi_init : str
        ``"map"`` or ``"median"``, the start that worked.
    """
    try:
        mean, result = deep_field(problem, prior, data, "svi", seed=seed, **kwargs)
        return mean, result, "map"
    except RuntimeError as err:
        _log(f"SVI from the MAP failed ({err}); retrying from the prior median")
        kwargs = {**kwargs, "svi_init": "median"}
        mean, result = deep_field(problem, prior, data, "svi", seed=seed, **kwargs)
        return mean, result, "median"


def _map_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"num_starts": args.num_starts, "steps": args.steps, "lbfgs_steps": args.lbfgs_steps}


def misspec(args: argparse.Namespace) -> dict[str, Any]:
    """Deep prior vs ML-fitted GRF (and the known-bump oracle) on held-out ``sources`` truths."""
    torch.set_num_threads(1)
    start = args.start
    problem = source_problem()
    train_ds = simulate("sources", args.num_fit, size=SIZE, seed=args.fit_seed)
    train_fields = torch.as_tensor(train_ds["image"].values, dtype=torch.float64)
    train_data = simulate_observations(problem, train_fields, seed=args.fit_seed)
    constant_mean = float(train_fields.mean())
    initial = GRFPrior.from_matern(SIZE, 0.2, 1.0, mean=constant_mean)
    grf = initial.fit_hyperparameters(problem, train_data)
    _log(f"GRF fit: gamma={grf.gamma:.4g} delta={grf.delta:.4g} rho={grf.correlation_length:.3g}")
    truths, u_true, data = sources_problems(problem, start, args.num_problems, args.test_seed)
    grf_mean, _ = grf.posterior(problem, data)
    grf_err = relative_l2_error(grf_mean.numpy(), truths.numpy())
    oracle_mean = known_bump_mean(problem, u_true, data, residual_covariance(SIZE))
    oracle_err = relative_l2_error(oracle_mean, truths.numpy())
    prior, deep_problem, deep_data = None, problem, data
    if args.method != "none":
        prior = DeepPrior(load_generator(args.model), u_prior=BumpPrior().u_prior(), tau=_tau(args))
        deep_problem, deep_data = _with_model_error(args, problem, data)
    records = []
    for k in range(args.num_problems):
        i = start + k
        record = {"problem": i, "grf": float(grf_err[k]), "oracle": float(oracle_err[k])}
        if prior is not None:
            kwargs = _map_kwargs(args)
            if args.method == "svi":
                kwargs.update(guide=args.guide, num_samples=args.num_samples, warn=False)
                kwargs["steps"] = args.svi_steps
                mean, _, record["svi_init"] = svi_field(
                    deep_problem, prior, deep_data[k], seed=i, **kwargs
                )
            else:
                mean, _ = deep_field(deep_problem, prior, deep_data[k], "map", seed=i, **kwargs)
            record["deep"] = float(relative_l2_error(mean[None], truths[k][None].numpy())[0])
        records.append(record)
        errors = {n: v for n, v in record.items() if isinstance(v, float)}
        _log(f"problem {i}: " + " ".join(f"{n} {v:.3f}" for n, v in errors.items()))
    settings = {
        "noise_sd": NOISE_SD,
        "method": args.method,
        "test_seed": args.test_seed,
        "tau": _tau_json(prior),
        "model_error": bool(args.model_error),
        "grf": {
            "gamma": grf.gamma,
            "delta": grf.delta,
            "correlation_length": grf.correlation_length,
            "marginal_variance": grf.marginal_variance,
            "constant_mean": constant_mean,
            "num_fit": args.num_fit,
        },
        "oracle": "known bump, Matern residual (sd 0.25, length 0.15, nu 1) conditioned exactly",
    }
    if args.method == "svi":
        settings.update(guide=args.guide, svi_steps=args.svi_steps, num_samples=args.num_samples)
    return {
        "experiment": "misspec",
        "settings": settings,
        "start": start,
        "records": records,
        **misspec_summary(records),
        "target_ratio": 2.0,
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
    if args.method == "collapsed":
        generator = AuxVAE.load(args.model).generator()
    else:
        prior = DeepPrior(load_generator(args.model))
    deep_err = []
    for i in range(args.num_problems):
        if args.method == "collapsed":
            result = infer_collapsed(problem, generator, data[i].numpy(), seed=i, warn=False)
            mean = np.asarray(result.idata["field_summary"]["field_mean"])
        else:
            mean, _ = deep_field(problem, prior, data[i], args.method, seed=i, **_map_kwargs(args))
        deep_err.append(float(relative_l2_error(mean[None], truths[i][None].numpy())[0]))
        _log(f"problem {i}: deep {deep_err[-1]:.3f} oracle {oracle_err[i]:.3f}")
    deep_err = np.asarray(deep_err)
    summary = ratio_summary(deep_err, oracle_err)
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


def _calibration(args: argparse.Namespace) -> dict[str, Any] | None:
    """The calibration of ``--calibration FILE`` or ``--calibrate_tau N`` (computed once)."""
    if getattr(args, "_calibration", None) is None:
        if getattr(args, "calibration", None) is not None:
            args._calibration = json.loads(Path(args.calibration).read_text())
        elif getattr(args, "calibrate_tau", 0):
            args._calibration = calibrate_model_tau(
                args.model, args.calibrate_tau, seed=args.calibrate_seed
            )
    return getattr(args, "_calibration", None)


def _tau(args: argparse.Namespace) -> float | np.ndarray | None:
    """The deep prior's ``tau``: ``--tau``, else calibrated, else None (the generator's)."""
    given = [
        getattr(args, "tau", None) is not None,
        bool(getattr(args, "calibrate_tau", 0)),
        getattr(args, "calibration", None) is not None,
    ]
    if sum(given) > 1:
        raise ValueError("give at most one of --tau, --calibrate_tau and --calibration")
    if getattr(args, "tau", None) is not None:
        return float(args.tau[0]) if len(args.tau) == 1 else np.asarray(args.tau)
    calibration = _calibration(args)
    return None if calibration is None else np.asarray(calibration["tau"])


def _with_model_error(
    args: argparse.Namespace, problem: SourceProblem, data: torch.Tensor
) -> tuple[Any, torch.Tensor]:
    """``(problem, data)``, whitened by :class:`ModelErrorProblem` with ``--model_error``."""
    if not getattr(args, "model_error", False):
        return problem, data
    calibration = _calibration(args)
    if calibration is None:
        raise ValueError("--model_error needs --calibration FILE or --calibrate_tau N")
    wrapped = ModelErrorProblem(problem, calibration["sensor_error_second_moment"])
    return wrapped, wrapped.whiten(data)


def _tau_json(prior: DeepPrior | None) -> Any:
    if prior is None:
        return None
    return prior.tau if isinstance(prior.tau, float) else list(prior.tau)


def calibrate_model_tau(path: str, num: int, seed: int = 7000, steps: int = 300) -> dict[str, Any]:
    """Per-coordinate ``tau`` of a saved Aux-VAE from ``num`` held-out ``sources`` images.

    Held-out images (``simulate(seed=seed)``, a seed the training set did not use) are fitted
    by :func:`~pyro_dlatent.inverse.calibrate_tau`, starting at the encoder's means, with the
    pixel noise sd set to the root-mean-square reconstruction error at those means (the misfit
    the trained model leaves). The encoder's own root-mean-square misalignment is reported next
    to it for comparison. The generator's residuals ``x - G(z_hat)`` pushed through the
    source problem's sensor operator give ``sensor_error_second_moment`` ``(25, 25)``, the
    model-error covariance of :class:`ModelErrorProblem` (second moment about zero, so a mean
    error counts too).
    """
    vae = AuxVAE.load(path)
    ds = simulate("sources", num, size=SIZE, seed=seed)
    images = ds["image"].values.astype(np.float64)
    aux = np.stack([ds[k].values for k in vae.aux_names], axis=-1)
    encoding = vae.encode(ds["image"].values)
    z_aux0 = encoding.z_aux_loc.double().numpy()
    z_rec0 = encoding.z_rec_loc.double().numpy()
    generator = vae.generator().to(torch.float64)
    with torch.no_grad():
        recon = generator(torch.as_tensor(z_aux0), torch.as_tensor(z_rec0)).numpy()
    noise_sd = float(np.sqrt(np.mean((recon - images) ** 2)))
    start = time.perf_counter()
    result = calibrate_tau(
        generator,
        images,
        aux,
        noise_sd=noise_sd,
        init_z_aux=z_aux0,
        init_z_rec=z_rec0,
        steps=steps,
        lr=0.02,
    )
    encoder_error = z_aux0 - result.aux_standardized
    forward = source_problem().sensor_operator
    sensor_error = result.residuals.reshape(num, -1) @ forward.T
    out = {
        "num": num,
        "seed": seed,
        "steps": steps,
        "noise_sd": noise_sd,
        "names": list(vae.aux_names),
        "generator_tau": float(generator.tau),
        "tau": result.tau.tolist(),
        "bias": result.bias.tolist(),
        "sd": result.sd.tolist(),
        "encoder_rms": np.sqrt(np.mean(encoder_error**2, axis=0)).tolist(),
        "pixel_rmse_median": float(np.median(result.pixel_rmse)),
        "sensor_error_second_moment": (sensor_error.T @ sensor_error / num).tolist(),
        "sensor_error_rms": float(np.sqrt(np.mean(sensor_error**2))),
        "seconds": time.perf_counter() - start,
    }
    _log(f"calibrated tau {np.round(result.tau, 4).tolist()} (encoder {out['encoder_rms']})")
    return out


def coverage(args: argparse.Namespace) -> dict[str, Any]:
    """90% interval coverage of the named parameters with SVI (many problems) and NUTS (few)."""
    torch.set_num_threads(1)
    start = args.start
    problem = source_problem()
    count = max(args.num_svi, args.num_nuts)
    _, u_true, data = sources_problems(problem, start, count, args.test_seed)
    u_true[:, 2] = np.exp(u_true[:, 2])
    tau = _tau(args)
    problem, data = _with_model_error(args, problem, data)
    prior = DeepPrior(load_generator(args.model), u_prior=BumpPrior().u_prior(), tau=tau)
    warmup = args.nuts_draws if args.nuts_warmup is None else args.nuts_warmup
    out: dict[str, Any] = {
        "experiment": "coverage",
        "settings": {
            "noise_sd": NOISE_SD,
            "level": 0.9,
            "test_seed": args.test_seed,
            "tau": _tau_json(prior),
            "calibrate_tau": args.calibrate_tau,
            "model_error": bool(args.model_error),
            "svi": {"guide": args.guide, "steps": args.svi_steps, "num_starts": args.num_starts},
            "nuts": {
                "chains": args.nuts_chains,
                "draws": args.nuts_draws,
                "warmup": warmup,
                "target_accept_prob": args.target_accept,
                "dense_mass": bool(args.dense_mass),
            },
        },
        "start": start,
    }
    if getattr(args, "_calibration", None) is not None:
        out["calibration"] = args._calibration
    svi_records = []
    for k in range(args.num_svi):
        i = start + k
        svi_kwargs = {
            "guide": args.guide,
            "steps": args.svi_steps,
            "num_samples": 1000,
            "num_starts": args.num_starts,
            "warn": False,
        }
        _, result, svi_init = svi_field(problem, prior, data[k], seed=i, **svi_kwargs)
        draws = named_draws(result.samples["u"])
        hits = interval_hits(draws, u_true[k])
        svi_records.append(
            {
                "problem": i,
                "hits": hits.astype(int).tolist(),
                "u_true": u_true[k].tolist(),
                "u_mean": draws.mean(0).tolist(),
                "u_sd": draws.std(0).tolist(),
                "svi_init": svi_init,
            }
        )
        _log(f"svi problem {i}: hits {hits.astype(int).tolist()}")
    nuts_records = []
    for k in range(args.num_nuts):
        i = start + k
        _, result = deep_field(
            problem,
            prior,
            data[k],
            "nuts",
            seed=i,
            num_samples=args.nuts_draws,
            num_warmup=warmup,
            num_chains=args.nuts_chains,
            target_accept_prob=args.target_accept,
            dense_mass=bool(args.dense_mass),
            jit_compile=args.jit,
            mp_context=args.mp_context,
            warn=False,
        )
        draws = named_draws(result.samples["u"])
        hits = interval_hits(draws, u_true[k])
        nuts_records.append(
            {
                "problem": i,
                "hits": hits.astype(int).tolist(),
                "u_true": u_true[k].tolist(),
                "u_mean": draws.mean(0).tolist(),
                "u_sd": draws.std(0).tolist(),
                "max_rhat": float(result.health["max_rhat"]),
                "divergences": int(result.health["divergences"]),
            }
        )
        _log(f"nuts problem {i}: hits {hits.astype(int).tolist()} health {result.health}")
    if svi_records:
        out["svi"] = {"records": svi_records, **coverage_summary(svi_records)}
    if nuts_records:
        out["nuts"] = {"records": nuts_records, **coverage_summary(nuts_records)}
    return out


def calibrate(args: argparse.Namespace) -> dict[str, Any]:
    """Calibrate and print a per-coordinate ``tau`` (pass it to shards with ``--tau``)."""
    torch.set_num_threads(1)
    return calibrate_model_tau(args.model, args.num, seed=args.seed, steps=args.steps)


def merge(args: argparse.Namespace) -> dict[str, Any]:
    """Read shard JSON files and pool them (see :func:`merge_results`)."""
    return merge_results([json.loads(Path(path).read_text()) for path in args.shards])


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
        ScaledGenerator(load_generator(args.model), COND_SCALE), u_prior=BumpPrior().u_prior()
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
    u = named_draws(result.samples["u"])
    u_true = np.array([float(test[k].values[0]) for k in NAMES])
    u_true[2] = math.exp(u_true[2])
    return {
        "experiment": "conductivity",
        "method": args.method,
        "log_kappa_scale": COND_SCALE,
        "noise_sd": noise_sd,
        "relative_l2_error": err,
        "mean_posterior_sd": float(sd.mean()),
        "fraction_nodes_within_90pct": inside,
        "u_true": dict(zip(COVERAGE_NAMES, u_true.tolist(), strict=True)),
        "u_mean": dict(zip(COVERAGE_NAMES, u.mean(0).tolist(), strict=True)),
        "u_sd": dict(zip(COVERAGE_NAMES, u.std(0).tolist(), strict=True)),
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
    slack = argparse.ArgumentParser(add_help=False)
    slack.add_argument(
        "--tau",
        type=float,
        nargs="+",
        default=None,
        help="override the generator's tau: one value or one per auxiliary (model-error slack)",
    )
    slack.add_argument(
        "--calibrate_tau",
        type=int,
        default=0,
        metavar="N",
        help="per-coordinate tau calibrated on N held-out images (see calibrate_model_tau)",
    )
    slack.add_argument("--calibrate_seed", type=int, default=7000)
    slack.add_argument("--calibration", help="a JSON written by the calibrate subcommand")
    slack.add_argument(
        "--model_error",
        action="store_true",
        help="add the calibrated generator error to the data noise (ModelErrorProblem)",
    )
    slack.add_argument(
        "--start", type=int, default=0, help="index of the first problem (for sharding)"
    )
    p = sub.add_parser("misspec", parents=[common, slack], conflict_handler="resolve")
    p.add_argument("--method", default="map", choices=["map", "svi", "none"])
    p.add_argument("--num_problems", type=int, default=20)
    p.add_argument("--num_fit", type=int, default=256)
    p.add_argument("--fit_seed", type=int, default=500)
    p.add_argument("--guide", default="fullrank", choices=["normal", "lowrank", "fullrank"])
    p.add_argument("--svi_steps", type=int, default=1000)
    p.add_argument("--num_samples", type=int, default=500)
    p = sub.add_parser("wellspec", parents=[common], conflict_handler="resolve")
    p.add_argument("--method", default="map", choices=["map", "svi", "nuts", "collapsed"])
    p.add_argument("--num_problems", type=int, default=20)
    p.add_argument("--noise_sd", type=float, default=NOISE_SD)
    p = sub.add_parser("coverage", parents=[common, slack])
    p.add_argument("--num_svi", type=int, default=50)
    p.add_argument("--num_nuts", type=int, default=10)
    p.add_argument("--svi_steps", type=int, default=1000)
    p.add_argument("--guide", default="fullrank", choices=["normal", "lowrank", "fullrank"])
    p.add_argument("--nuts_draws", type=int, default=300)
    p.add_argument("--nuts_warmup", type=int, default=None, help="default: --nuts_draws")
    p.add_argument("--nuts_chains", type=int, default=2)
    p.add_argument("--target_accept", type=float, default=0.8)
    p.add_argument("--dense_mass", action="store_true")
    p.add_argument("--mp_context", default=None, help="e.g. fork, to force parallel chains")
    p.add_argument("--jit", action="store_true")
    p = sub.add_parser("conductivity", parents=[common])
    p.add_argument("--svi_steps", type=int, default=1000)
    p.add_argument("--num_samples", type=int, default=500)
    p = sub.add_parser("calibrate", help="per-coordinate tau from held-out images")
    p.add_argument("--model", required=True)
    p.add_argument("--num", type=int, default=512)
    p.add_argument("--seed", type=int, default=7000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out")
    p = sub.add_parser("merge", help="pool shard JSONs of one coverage or misspec experiment")
    p.add_argument("--out")
    p.add_argument("shards", nargs="+")
    args = parser.parse_args(argv)
    if getattr(args, "start", 0) < 0:
        parser.error(f"expected --start >= 0, got {args.start}")
    commands = {
        "train": train,
        "misspec": misspec,
        "wellspec": wellspec,
        "coverage": coverage,
        "conductivity": conductivity,
        "merge": merge,
        "calibrate": calibrate,
    }
    result = commands[args.command](args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2, default=float))
    print(json.dumps(result, indent=2, default=float))


if __name__ == "__main__":
    main()
