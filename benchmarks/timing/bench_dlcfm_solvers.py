"""Sample fidelity of a trained DL-CFM against the number of vector-field evaluations per solver.

For one set of latent codes and initial noises (drawn once at the auxiliaries of a freshly
simulated reference set of ``halos`` maps), the flow is integrated with Euler, midpoint and RK4
at several step counts and with adaptive dopri5. Each solution is compared with the reference
maps (radially averaged power-spectrum relative error, pixel-histogram 1-Wasserstein distance)
and with the dopri5 solution (relative RMS difference). A configuration is *within 10%* when
both fidelity metrics are within 10% of dopri5's; the fewest evaluations that achieve it are
printed (a configuration must stay within 10% at every larger step count of its solver, since
the metrics carry Monte Carlo noise), and again with the images also within
``--max-relative-rms`` of dopri5's. The time of each integration (one run, ``_timing.measure``)
is printed with its speedup against dopri5. Results go to JSON, the curves to a figure.

Use the DL-CFM trained by ``benchmarks/studies/dlcfm_halos.py``::

    python benchmarks/timing/bench_dlcfm_solvers.py --checkpoint dlcfm_halos_run/dlcfm/last.pt

Without ``--checkpoint`` a small DL-CFM is trained first (``--train-num``, ``--epochs``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pyro
import torch
from _timing import Timing, measure, print_ratios

from pyro_dlatent import metrics
from pyro_dlatent.data import aux_array, simulate
from pyro_dlatent.flow import FIXED_STEP_METHODS, base_noise, sample_ode
from pyro_dlatent.models.base import GuidedLatentModel
from pyro_dlatent.models.dlcfm import DLCFM
from pyro_dlatent.plots import save_figure

__all__ = ["fewest_within", "main", "run_solvers"]


def run_solvers(
    model: DLCFM,
    reference: Any,
    step_counts: list[int],
    *,
    seed: int = 0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> list[dict[str, Any]]:
    """Integrate the same codes and noises with every solver; one record per configuration."""
    names = list(model.scaler.names)
    aux = aux_array(reference)
    z_aux, z_rec = model.sample_latent({n: aux[:, j] for j, n in enumerate(names)}, seed=seed)
    z = torch.cat([z_aux, z_rec], dim=-1)
    gen = torch.Generator(device=model.device).manual_seed(seed + 1)
    size = model.image_size
    x0 = base_noise((z.shape[0], size, size), model.noise, generator=gen, device=model.device)
    maps = reference["image"].values
    model.eval()

    def solve(method: str, steps: int) -> dict[str, Any]:
        out: dict[str, Any] = {}

        def integrate() -> None:
            with torch.no_grad():
                solution = sample_ode(model.field, z, x0, method, steps, rtol=rtol, atol=atol)
                out["images"] = model.destandardize_images(solution.x).cpu().numpy()
                out["nfe"] = solution.nfe

        timing = measure(integrate, repeat=1, warmup=0)
        images = out["images"]
        return {
            "method": method,
            "steps": steps if method in FIXED_STEP_METHODS else None,
            "nfe": out["nfe"],
            "seconds": timing.median,
            "images": images,
            "power_spectrum_error": metrics.power_spectrum_error(images, maps),
            "pixel_histogram_w1": metrics.pixel_histogram_distance(images, maps),
        }

    adaptive = solve("dopri5", 1)
    records = [adaptive]
    for method in FIXED_STEP_METHODS:
        for steps in step_counts:
            records.append(solve(method, steps))
    target = adaptive["images"]
    scale = np.sqrt(np.mean(target**2))
    for record in records:
        rms = np.sqrt(np.mean((record.pop("images") - target) ** 2))
        record["relative_rms_to_dopri5"] = float(rms / scale)
    for record in records:
        record["within_10pct"] = all(
            abs(record[key] - adaptive[key]) <= 0.1 * adaptive[key]
            for key in ("power_spectrum_error", "pixel_histogram_w1")
        )
    return records


def fewest_within(
    records: list[dict[str, Any]], max_relative_rms: float | None = None
) -> dict[str, Any] | None:
    """The fixed-step record with the fewest evaluations that *stays* within 10% of dopri5.

    A record qualifies when it and every record of the same method with more steps are within
    10% of dopri5 on both fidelity metrics (the metrics carry Monte Carlo noise of their own, so
    a single lucky step count does not count), and, if ``max_relative_rms`` is given, its
    images are within that relative RMS of dopri5's (sample-level agreement).
    """
    candidates = []
    for record in records:
        if record["method"] not in FIXED_STEP_METHODS:
            continue
        finer = [
            r for r in records if r["method"] == record["method"] and r["steps"] >= record["steps"]
        ]
        if not all(r["within_10pct"] for r in finer):
            continue
        if max_relative_rms is not None and record["relative_rms_to_dopri5"] > max_relative_rms:
            continue
        candidates.append(record)
    return min(candidates, key=lambda r: (r["nfe"], r["relative_rms_to_dopri5"]), default=None)


def _figure(records: list[dict[str, Any]]) -> plt.Figure:
    adaptive = next(r for r in records if r["method"] == "dopri5")
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    keys = ("power_spectrum_error", "pixel_histogram_w1", "relative_rms_to_dopri5")
    for ax, key in zip(axes, keys, strict=True):
        for method in FIXED_STEP_METHODS:
            rows = [r for r in records if r["method"] == method]
            ax.plot([r["nfe"] for r in rows], [r[key] for r in rows], "o-", label=method)
        ax.axhline(adaptive[key], color="k", ls="--", lw=1, label=f"dopri5 ({adaptive['nfe']})")
        if key != "relative_rms_to_dopri5":
            ax.axhspan(0.9 * adaptive[key], 1.1 * adaptive[key], color="k", alpha=0.1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("vector-field evaluations")
        ax.set_title(key.replace("_", " "), fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="a trained DL-CFM")
    parser.add_argument("--num", type=int, default=512, help="reference maps (one batch)")
    parser.add_argument("--reference-seed", type=int, default=12345)
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--rtol", type=float, default=1e-5)
    parser.add_argument("--atol", type=float, default=1e-5)
    parser.add_argument(
        "--max-relative-rms", type=float, default=0.05, help="sample-level agreement bound"
    )
    parser.add_argument("--train-num", type=int, default=1024, help="without --checkpoint")
    parser.add_argument("--epochs", type=int, default=5, help="without --checkpoint")
    parser.add_argument("--size", type=int, default=32, help="without --checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=Path("bench_dlcfm_solvers.json"))
    parser.add_argument("--figure", type=Path, default=None)
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns (and writes) the results."""
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(args.seed)
    if args.checkpoint is not None:
        model = GuidedLatentModel.load(args.checkpoint)
        if not isinstance(model, DLCFM):
            raise SystemExit(f"{args.checkpoint} holds a {type(model).__name__}, not a DLCFM")
        trained = {"checkpoint": str(args.checkpoint)}
    else:
        train = simulate("halos", args.train_num, size=args.size, seed=args.seed)
        model = DLCFM.from_dataset(
            train, residual_dim=6, intensity="asinh", field_channels=16, width=16, hidden=128
        )
        start = time.perf_counter()
        model.fit(train, epochs=args.epochs, seed=args.seed, progress=False)
        trained = {"train_num": args.train_num, "epochs": args.epochs}
        trained["train_seconds"] = time.perf_counter() - start
    reference = simulate("halos", args.num, size=model.image_size, seed=args.reference_seed)
    records = run_solvers(
        model, reference, sorted(set(args.steps)), seed=args.seed, rtol=args.rtol, atol=args.atol
    )
    best = fewest_within(records)
    agreeing = fewest_within(records, max_relative_rms=args.max_relative_rms)
    results = {
        "model": trained,
        "num_maps": args.num,
        "records": records,
        "fewest": best,
        "fewest_agreeing": agreeing,
        "max_relative_rms": args.max_relative_rms,
    }
    args.output.write_text(json.dumps(results, indent=2))
    figure = args.figure or args.output.with_suffix(".png")
    save_figure(_figure(records), figure)
    rows = [
        (r["method"] if r["steps"] is None else f"{r['method']} x {r['steps']}", r["seconds"])
        for r in records
    ]
    print(f"integration of {args.num} maps:")
    print_ratios([(n, Timing.from_values([t])) for n, t in rows], baseline="dopri5", unit="s")
    print(f"{'method':>9} {'steps':>5} {'nfe':>5} {'PS err':>8} {'W1':>8} {'rms':>8}  in10%")
    for r in records:
        print(
            f"{r['method']:>9} {r['steps'] or '-':>5} {r['nfe']:>5} "
            f"{r['power_spectrum_error']:8.4f} {r['pixel_histogram_w1']:8.4f} "
            f"{r['relative_rms_to_dopri5']:8.4f}  {r['within_10pct']}"
        )
    for label, record in (
        ("fewest evaluations staying within 10% of dopri5's fidelity", best),
        (f"... and within {args.max_relative_rms:.0%} RMS of dopri5's images", agreeing),
    ):
        if record is None:
            print(f"{label}: none; try more steps")
        else:
            print(
                f"{label}: {record['method']} x {record['steps']} steps = {record['nfe']} "
                "evaluations"
            )
    return results


if __name__ == "__main__":
    main()
