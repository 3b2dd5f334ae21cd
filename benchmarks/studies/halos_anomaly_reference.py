"""Reference AUROCs for the disturbed halos of ``halos``, to read a model's anomaly score against.

The residual-block anomaly score (:mod:`pyro_dlatent.anomaly`) is asked to rank the disturbed
halos (three times the centroid offset and 1 + Poisson(1) substructure clumps; 7% of the maps)
with AUROC >= 0.85, the flag never used in training. This script measures two things
that bound what such a score can reach on the same maps and the same train / held-out split as
``benchmarks/studies/dlcfm_halos.py``:

- **the same score on the true nuisance parameters** (no images): the Mahalanobis radius of the
  simulator's centroid offsets (in arcmin, or in units of R500), alone and with the ellipticity
  ``(1 - q) (cos 2 phi, sin 2 phi)``, plus two uninformative N(0, 1) coordinates standing in for
  residual dimensions that carry something else; against the whole training population and
  against training halos of similar mass (:func:`pyro_dlatent.anomaly.fit_anomaly_detector`
  with ``condition``; :func:`pyro_dlatent.anomaly.nuisance_oracle_aurocs`). This is what a
  residual block that encoded those parameters perfectly would score; the clumps are left out
  (they have no fixed-length parameters).
- **a supervised classifier from the pixels**: the package's :class:`~pyro_dlatent.nn.ConvEncoder`
  with a logistic output, trained *on the flag* (class-weighted cross-entropy, AdamW, random
  rotations and flips; the epoch with the best AUROC on a validation fifth of the training maps
  is kept, scores averaged over the eight symmetries of the square). How well the pixels
  separate the two populations when the labels are given: an unsupervised score can only do
  worse, up to the classifier's own shortfall.

Example (the setting of the DL-CFM study, 7 minutes on one CPU thread)::

    python benchmarks/studies/halos_anomaly_reference.py --num 10240 --output reference.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pyro_dlatent import metrics
from pyro_dlatent.anomaly import nuisance_oracle_aurocs
from pyro_dlatent.data import simulate, split
from pyro_dlatent.nn import ConvEncoder

__all__ = ["classifier_auroc", "main"]


def _symmetric_scores(net: torch.nn.Module, images: torch.Tensor, batch: int = 512) -> np.ndarray:
    """Logits averaged over the eight rotations and reflections of the square."""
    net.eval()
    total = torch.zeros(images.shape[0])
    with torch.no_grad():
        for k in range(4):
            for flip in (False, True):
                view = torch.rot90(images, k, (1, 2))
                view = view.flip(2) if flip else view
                total += torch.cat(
                    [net(view[i : i + batch]).squeeze(1) for i in range(0, len(view), batch)]
                )
    return (total / 8).numpy()


def classifier_auroc(
    train: Any,
    held: Any,
    *,
    epochs: int = 30,
    seed: int = 0,
    intensity_scale: float = 0.3,
    width: int = 32,
    lr: float = 5e-4,
) -> dict[str, Any]:
    """Held-out AUROC of a CNN trained on the ``disturbed`` flag (the supervised reference).

    Images enter as ``asinh(x / intensity_scale)`` (about the per-pixel noise: the faint
    clumps and the bright cores both stay in range).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    fit, val = split(train, 0.2, seed=seed + 1)

    def tensor(ds: Any) -> torch.Tensor:
        return torch.asinh(torch.as_tensor(ds["image"].values) / intensity_scale)

    x, x_val, x_held = tensor(fit), tensor(val), tensor(held)
    y = torch.as_tensor(fit["disturbed"].values, dtype=torch.float32)
    y_val, y_held = val["disturbed"].values, held["disturbed"].values
    if not 0 < float(y.sum()) < len(y):
        raise ValueError("the training part needs both disturbed and relaxed halos")
    net = ConvEncoder(x.shape[-1], 1, width=width, hidden=128)
    optimizer = torch.optim.AdamW(net.parameters(), lr, weight_decay=1e-2)
    pos_weight = (1 - y.mean()) / y.mean()
    best: tuple[float, np.ndarray | None, int] = (-math.inf, None, -1)
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(x))
        for start in range(0, len(x), 128):
            rows = order[start : start + 128]
            batch = torch.rot90(x[rows], int(rng.integers(4)), (1, 2))
            if rng.random() < 0.5:
                batch = batch.flip(2)
            loss = F.binary_cross_entropy_with_logits(
                net(batch).squeeze(1), y[rows], pos_weight=pos_weight
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        val_auroc = metrics.auroc(_symmetric_scores(net, x_val), y_val)
        if val_auroc > best[0]:
            best = (val_auroc, _symmetric_scores(net, x_held), epoch)
    scores = best[1]
    mass = held["log10_M500"].values
    quartiles = np.array_split(np.argsort(mass), 4)
    return {
        "auroc": metrics.auroc(scores, y_held),
        "validation_auroc": best[0],
        "best_epoch": best[2],
        "auroc_by_mass_quartile": [metrics.auroc(scores[q], y_held[q]) for q in quartiles],
        "scores": scores,
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num", type=int, default=10240, help="simulated maps in all")
    parser.add_argument("--size", type=int, default=32, help="pixels per side")
    parser.add_argument("--held-out", type=float, default=0.2, help="held-out fraction")
    parser.add_argument("--epochs", type=int, default=30, help="classifier epochs")
    parser.add_argument("--classifiers", type=int, default=3, help="classifier seeds")
    parser.add_argument("--seed", type=int, default=0, help="simulation and split seed")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--output", default=None, help="JSON file for the results")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run both references; returns (and optionally writes) the results."""
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    ds = simulate("halos", args.num, size=args.size, seed=args.seed)
    train, held = split(ds, args.held_out, seed=args.seed)
    results: dict[str, Any] = {
        "settings": vars(args),
        "num_train": int(train.sizes["sample"]),
        "num_held_out": int(held.sizes["sample"]),
        "disturbed_held_out": int(held["disturbed"].values.sum()),
        "oracle_mahalanobis": nuisance_oracle_aurocs(train, held, seed=args.seed),
        "classifier": [],
    }
    ensemble = np.zeros(int(held.sizes["sample"]))
    start = time.perf_counter()
    for k in range(args.classifiers):
        run = classifier_auroc(train, held, epochs=args.epochs, seed=k)
        scores = run.pop("scores")
        ensemble += (scores - scores.mean()) / max(scores.std(), 1e-12)
        results["classifier"].append(run)
        print(f"classifier {k}: held-out AUROC {run['auroc']:.3f}", flush=True)
    if args.classifiers:
        results["classifier_ensemble_auroc"] = metrics.auroc(ensemble, held["disturbed"].values)
    results["classifier_seconds"] = time.perf_counter() - start
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
