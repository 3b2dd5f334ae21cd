"""Quality of DL-CFM (and an Aux-VAE of the same latent size) on simulated halo tSZ maps.

Simulates ``halos`` maps, holds out a fraction, trains the models on the rest and reports on the
held-out maps:

- alignment: Pearson r between each encoded guided coordinate and its standardized auxiliary,
  and the residual block's leakage (largest |corr| of degree-2 lifts, :func:`metrics.leakage`);
- fidelity of maps generated at the held-out auxiliaries: radially averaged power-spectrum
  relative error, pixel-histogram 1-Wasserstein distance and radial-profile error;
- physics of generated maps: the slope of log integrated Compton-Y against log requested mass,
  against the same estimator on the held-out (simulated) maps, for Y in the cylinder of radius
  R500 about the field centre (Y_500, the aperture of Arnaud et al. 2010 and the Planck cluster
  papers) and over the whole map (where a background offset of the generator of 0.005 of the
  pixel standard deviation already moves the lowest-mass bin's Y by a fifth);
- the concentration–mass relation read from the encoded latents (``predict_aux``) against the
  simulator's median relation, in units of its log-normal scatter;
- AUROC of the residual-block Mahalanobis anomaly score for the simulator's ``disturbed`` flag
  (never used in training), against the whole training population and against training maps of
  similar encoded mass, each also averaged over the encodings of a map's 8 rotations and
  reflections (:func:`pyro_dlatent.anomaly.encode_views`).

Results go to a JSON file, figures to a folder. Example (the setting of the quality criteria)::

    python benchmarks/studies/dlcfm_halos.py --num 8192 --size 32 --epochs 40 --output halos.json

``--evaluate-only`` scores the checkpoints a previous run left in ``--run-dir`` (same data
settings and seed) without training.

Run with ``--help`` for every option.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch

from pyro_dlatent import metrics
from pyro_dlatent.anomaly import (
    encode_views,
    fit_anomaly_detector,
    rank_anomalies,
)
from pyro_dlatent.checkpoint import load_checkpoint
from pyro_dlatent.data import aux_array, simulate, split
from pyro_dlatent.data.halos import median_concentration
from pyro_dlatent.data.halos_analysis import aperture_y, binned_power_law_slope
from pyro_dlatent.flow import BASE_NOISES
from pyro_dlatent.models.auxvae import AuxVAE
from pyro_dlatent.models.base import GuidedLatentModel
from pyro_dlatent.models.dlcfm import DLCFM
from pyro_dlatent.plots import anomaly_gallery, image_grid, save_figure
from pyro_dlatent.training import CHECKPOINT_NAME

__all__ = [
    "concentration_mass_check",
    "evaluate_model",
    "main",
    "train_models",
]


def concentration_mass_check(
    log10_mass: np.ndarray, concentration: np.ndarray, z: float, scatter_dex: float
) -> dict[str, Any]:
    """Binned median ``log10 c`` against the simulator's median relation (dex, vs its scatter)."""
    order = np.argsort(log10_mass)
    rows = []
    for part in np.array_split(order, 8):
        m = float(np.median(log10_mass[part]))
        measured = float(np.median(np.log10(concentration[part])))
        truth = float(np.log10(median_concentration(10.0**m, z)[()]))
        rows.append({"log10_M500": m, "log10_c": measured, "log10_c_simulator": truth})
    worst = max(abs(r["log10_c"] - r["log10_c_simulator"]) for r in rows)
    return {
        "bins": rows,
        "max_abs_dex": worst,
        "scatter_dex": scatter_dex,
        "within_scatter": bool(worst <= scatter_dex),
    }


def _budgeted(fit: dict[str, Any], model: Any, train: Any, minutes: float | None) -> dict:
    """``fit`` with ``epochs`` cut to what ``minutes`` of training allow (a timed probe).

    The probe trains a deep copy of ``model`` for two epochs on the same data and settings and
    takes the training time of the second (the first carries one-off costs: on a GPU, kernel
    selection and warm-up made it 2.5x slower than the rest; validation is left out), so
    ``epochs = min(--epochs, floor(budget / second epoch))``. The epochs actually run are in the
    results' ``epochs_run``.
    """
    if minutes is None:
        return fit
    probe = copy.deepcopy(model)
    probe.fit(train, **{**fit, "epochs": 2, "progress": False})
    per_epoch = probe.history[-1]["time_s"]
    epochs = max(1, min(fit["epochs"], int(minutes * 60.0 / per_epoch)))
    print(f"{type(model).__name__}: {per_epoch:.2f} s per epoch -> {epochs} epochs", flush=True)
    return {**fit, "epochs": epochs}


def train_models(
    train: Any, args: argparse.Namespace, run_dir: Path
) -> tuple[dict[str, Any], dict[str, float]]:
    """Train DL-CFM and (unless ``--no-auxvae``) an Aux-VAE; returns models and seconds."""
    models: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    common = {
        "residual_dim": args.residual_dim,
        "tau": args.tau,
        "align_weight": args.align_weight,
        "decor_weight": args.decor_weight,
        **({} if args.decor_form is None else {"decor_form": args.decor_form}),
        "width": args.width,
        "hidden": args.hidden,
        "seed": args.seed,
    }
    fit = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        **({} if args.lr_decay is None else {"lr_decay": args.lr_decay}),
        "seed": args.seed,
        "progress": args.progress,
        "device": args.device,
    }
    dlcfm = DLCFM.from_dataset(
        train,
        intensity=args.intensity,
        intensity_scale=args.intensity_scale,
        field_channels=args.field_channels,
        field_spatial_channels=args.field_spatial_channels,
        field_mean_head=args.field_mean_head,
        noise=args.noise,
        flow_weight=args.flow_weight,
        method=args.method,
        steps=args.steps,
        **common,
    )
    start = time.perf_counter()
    dlcfm_fit = {**fit, "ema_decay": args.ema_decay}
    dlcfm.fit(
        train,
        checkpoint_dir=run_dir / "dlcfm",
        **_budgeted(dlcfm_fit, dlcfm, train, args.train_minutes),
    )
    seconds["dlcfm"] = time.perf_counter() - start
    models["dlcfm"] = dlcfm
    if args.auxvae:
        vae = AuxVAE.from_dataset(train, **common)
        minutes = args.train_minutes if args.auxvae_minutes is None else args.auxvae_minutes
        start = time.perf_counter()
        vae.fit(train, checkpoint_dir=run_dir / "auxvae", **_budgeted(fit, vae, train, minutes))
        seconds["auxvae"] = time.perf_counter() - start
        models["auxvae"] = vae
    return models, seconds


def _generate(model: Any, aux: dict[str, np.ndarray], seed: int, batch: int = 256) -> np.ndarray:
    """One map per row of ``aux`` (physical units), in chunks to bound memory."""
    n = len(next(iter(aux.values())))
    parts = []
    for k, start in enumerate(range(0, n, batch)):
        rows = {name: values[start : start + batch] for name, values in aux.items()}
        parts.append(model.generate(rows, num=1, seed=seed + k).cpu().numpy())
    return np.concatenate(parts)


def evaluate_model(
    model: Any, train: Any, held: Any, args: argparse.Namespace, figures: Path, name: str
) -> dict[str, Any]:
    """Every held-out metric of one trained model; writes its figures."""
    names = list(model.scaler.names)
    if model.calibrate_after_fit and not model.generation_calibrated:  # an older checkpoint
        model.calibrate_generation(train)
    aux_held = aux_array(held)
    standardized = model.scaler.transform(aux_held)
    encoding = model.encode(held)
    z_aux = encoding.z_aux_loc.cpu().numpy()
    z_rec = encoding.z_rec_loc.cpu().numpy()
    result: dict[str, Any] = {
        # the model's own constructor arguments: with --evaluate-only they come from the
        # checkpoint, not from this run's flags
        "config": model.config,
        "pearson_r": {
            n: float(np.corrcoef(z_aux[:, j], standardized[:, j])[0, 1])
            for j, n in enumerate(names)
        },
        "leakage": metrics.leakage(z_rec, standardized, names=names).max_abs_corr,
    }

    start = time.perf_counter()
    generated = _generate(model, {n: aux_held[:, j] for j, n in enumerate(names)}, args.seed)
    result["generate_seconds"] = time.perf_counter() - start
    reference = held["image"].values
    result["power_spectrum_error"] = metrics.power_spectrum_error(generated, reference)
    result["pixel_histogram_w1"] = metrics.pixel_histogram_distance(generated, reference)
    result["radial_profile_error"] = metrics.radial_profile_error(generated, reference)

    pixel_arcmin = float(held.attrs.get("pixel_arcmin", 1.0))
    log_mass = held["log10_M500"].values
    radius = held["r500_arcmin"].values / pixel_arcmin
    for key, measure in (
        ("y_m_slope", lambda maps: aperture_y(maps, radius)),
        ("y_m_slope_whole_map", lambda maps: maps.sum(axis=(1, 2))),
    ):
        slope_gen = binned_power_law_slope(log_mass, measure(generated) * pixel_arcmin**2)
        slope_sim = binned_power_law_slope(log_mass, measure(reference) * pixel_arcmin**2)
        result[key] = {
            "generated": slope_gen,
            "simulator": slope_sim,
            "abs_difference": abs(slope_gen - slope_sim),
        }

    predicted = model.predict_aux(held)
    scatter = float(held.attrs.get("concentration_scatter_dex", 0.16))
    result["c_m_relation"] = {
        "from_latents": concentration_mass_check(
            predicted["log10_M500"].values,
            predicted["concentration"].values,
            float(held.attrs.get("z", 0.1)),
            scatter,
        ),
        "held_out_truth": concentration_mass_check(
            log_mass, held["concentration"].values, float(held.attrs.get("z", 0.1)), scatter
        ),
    }

    if model.residual_dim > 0 and "disturbed" in held:
        # view 0 of each map is the map itself: its encoding is the plain one
        views_train, views_held = encode_views(model, train), encode_views(model, held)
        reference_rec = views_train.z_rec_loc[:, 0].cpu().numpy()
        detector = fit_anomaly_detector(reference_rec)
        scores = detector.score(z_rec)
        flag = held["disturbed"].values.astype(bool)
        result["anomaly_auroc_disturbed"] = metrics.auroc(scores, flag)
        # the same radius against images of similar encoded mass (8 equal-count bins)
        mass = names.index("log10_M500") if "log10_M500" in names else 0
        by_mass = fit_anomaly_detector(
            reference_rec, condition=views_train.z_aux_loc[:, 0, mass].cpu().numpy()
        )
        result["anomaly_auroc_disturbed_by_mass"] = metrics.auroc(
            by_mass.score(z_rec, z_aux[:, mass]), flag
        )
        # the same two scores averaged over each map's 8 rotations and reflections
        views_rec = views_train.z_rec_loc.cpu().numpy()
        result["anomaly_auroc_disturbed_dihedral"] = metrics.auroc(
            fit_anomaly_detector(views_rec).score(views_held.z_rec_loc.cpu().numpy()), flag
        )
        by_mass_views = fit_anomaly_detector(
            views_rec, condition=views_train.z_aux_loc[:, :, mass].mean(dim=1).cpu().numpy()
        )
        result["anomaly_auroc_disturbed_by_mass_dihedral"] = metrics.auroc(
            by_mass_views.score(
                views_held.z_rec_loc.cpu().numpy(),
                views_held.z_aux_loc[:, :, mass].mean(dim=1).cpu().numpy(),
            ),
            flag,
        )
        table = rank_anomalies(detector, z_rec, extra={"disturbed": flag})
        top = min(50, table.sizes["rank"])
        result["disturbed_fraction_in_top50"] = float(table["disturbed"].values[:top].mean())
        result["disturbed_fraction_overall"] = float(flag.mean())
        save_figure(
            anomaly_gallery(reference, table, top_k=16, annotate=["disturbed"]),
            figures / f"{name}_anomalies.png",
        )

    grid_n = min(8, reference.shape[0])
    save_figure(
        image_grid(
            np.concatenate([reference[:grid_n], generated[:grid_n]]),
            nrows=2,
            ncols=grid_n,
            row_labels=["held-out", name],
        ),
        figures / f"{name}_samples.png",
    )
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num", type=int, default=8192, help="simulated maps in all")
    parser.add_argument("--size", type=int, default=32, help="pixels per side")
    parser.add_argument("--held-out", type=float, default=0.2, help="held-out fraction")
    parser.add_argument("--epochs", type=int, default=40, help="epochs (the most, with a budget)")
    parser.add_argument(
        "--train-minutes",
        type=float,
        default=None,
        help="wall-time budget of each model's training: epochs are cut to fit it",
    )
    parser.add_argument(
        "--auxvae-minutes", type=float, default=None, help="the Aux-VAE's (default: the same)"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument(
        "--lr-decay", type=float, default=None, help="final / initial rate (default: each model's)"
    )
    parser.add_argument(
        "--ema-decay",
        type=float,
        default=0.0,
        help="decay of the DL-CFM's weight average (DLCFM.fit's ema_decay; 0 = off)",
    )
    parser.add_argument("--residual-dim", type=int, default=6)
    parser.add_argument("--tau", type=float, default=0.1)
    parser.add_argument("--align-weight", type=float, default=0.01)
    parser.add_argument("--decor-weight", type=float, default=1.0)
    parser.add_argument(
        "--decor-form", choices=["abs", "square"], default=None, help="default: each model's"
    )
    parser.add_argument("--intensity", choices=["identity", "asinh"], default="identity")
    parser.add_argument(
        "--intensity-scale", type=float, default=None, help="asinh scale (default: pixel MAD)"
    )
    parser.add_argument("--field-channels", type=int, default=32)
    parser.add_argument(
        "--field-spatial-channels",
        type=int,
        default=0,
        help="channels of the vector field's latent map (0: FiLM conditioning only)",
    )
    parser.add_argument(
        "--field-mean-head",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the vector field's mean level from a head that sees the state's mean level",
    )
    parser.add_argument(
        "--noise", choices=list(BASE_NOISES), default="white", help="flow's initial noise"
    )
    parser.add_argument(
        "--flow-weight", type=float, default=1.0, help="DL-CFM surrogate weight w (KL: 1 / (w D))"
    )
    parser.add_argument("--width", type=int, default=32, help="encoder (and decoder) width")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--method", default="rk4", help="DL-CFM sampling solver")
    parser.add_argument("--steps", type=int, default=4, help="DL-CFM sampling steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-auxvae", dest="auxvae", action="store_false")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument(
        "--evaluate-only",
        action="store_true",
        help="score the checkpoints in --run-dir instead of training",
    )
    parser.add_argument(
        "--weights",
        choices=["averaged", "live"],
        default="averaged",
        help="with --evaluate-only: score a weight-averaged fit's live weights instead (the "
        "generation map refitted on the fit's training part)",
    )
    parser.add_argument(
        "--recalibrate",
        action="store_true",
        help="with --evaluate-only: refit the generation map on the fit's training part first "
        "(checkpoints written before the neighbour draws hold a Gaussian map)",
    )
    parser.add_argument("--run-dir", type=Path, default=Path("dlcfm_halos_run"))
    parser.add_argument("--output", type=Path, default=None, help="JSON file (default in run dir)")
    return parser


def _load_live_weights(path: Path, device: str, train: Any) -> Any:
    """The live weights of a weight-averaged fit's checkpoint (None: it averaged nothing).

    Checkpoints written before fits kept the live weights' own generation map get it
    refitted as the fit did, on the fit's training part.
    """
    ckpt = load_checkpoint(path)
    if not ckpt.state.get("average"):
        return None
    model = GuidedLatentModel.load(path, device=device, weights="live")
    if model.calibrate_after_fit and not model.generation_calibrated:
        model.calibrate_generation(_fit_part(path, train))
    return model


def _fit_part(path: Path, train: Any) -> Any:
    """The part of ``train`` that the fit saved at ``path`` trained on (validation split off)."""
    fit = load_checkpoint(path).extra["fit"]
    return split(train, fit["val_fraction"], seed=fit["seed"])[0] if fit["val_fraction"] else train


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns (and writes) the results dictionary."""
    parser = _parser()
    args = parser.parse_args(argv)
    if (args.weights != "averaged" or args.recalibrate) and not args.evaluate_only:
        parser.error("--weights and --recalibrate apply to --evaluate-only")
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(args.seed)
    run_dir = args.run_dir
    figures = run_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    ds = simulate("halos", args.num, size=args.size, seed=args.seed)
    simulate_seconds = time.perf_counter() - start
    train, held = split(ds, args.held_out, seed=args.seed)
    if args.evaluate_only:
        paths = {
            name: run_dir / name / CHECKPOINT_NAME
            for name in ("dlcfm", "auxvae")
            if (run_dir / name / CHECKPOINT_NAME).exists()
        }
        if not paths:
            raise SystemExit(f"no checkpoints under {run_dir}")
        live = {}
        if args.weights == "live":
            live = {name: _load_live_weights(p, args.device, train) for name, p in paths.items()}
            live = {name: model for name, model in live.items() if model is not None}
            if not live:
                raise SystemExit(f"--weights live: no checkpoint under {run_dir} averaged weights")
        models = {
            name: live[name] if name in live else GuidedLatentModel.load(path, device=args.device)
            for name, path in paths.items()
        }
        for name, model in models.items():
            if args.recalibrate and model.calibrate_after_fit:
                model.calibrate_generation(_fit_part(paths[name], train))
        train_seconds: dict[str, float] = {}
    else:
        models, train_seconds = train_models(train, args, run_dir)

    results: dict[str, Any] = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "num_train": int(train.sizes["sample"]),
        "num_held_out": int(held.sizes["sample"]),
        "simulate_seconds": simulate_seconds,
        "train_seconds": train_seconds,
        "epochs_run": {name: len(model.history) for name, model in models.items()},
        "device": str(args.device),
        "platform": {"python": platform.python_version(), "torch": torch.__version__},
        "models": {},
    }
    for name, model in models.items():
        results["models"][name] = evaluate_model(model, train, held, args, figures, name)
        results["models"][name]["final_history"] = model.history[-1]
    if {"dlcfm", "auxvae"} <= set(results["models"]):
        d, v = results["models"]["dlcfm"], results["models"]["auxvae"]
        results["fidelity_gain_over_auxvae"] = {
            key: v[key] / d[key] if d[key] > 0 else float("inf")
            for key in ("power_spectrum_error", "pixel_histogram_w1", "radial_profile_error")
        }
    default = "results_evaluated.json" if args.evaluate_only else "results.json"
    output = args.output or run_dir / default
    output.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
