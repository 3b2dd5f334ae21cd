"""Time a step of ``fit`` (Aux-VAE and DL-CFM) against a plain-torch loop over the same networks.

The Pyro side is :meth:`pyro_dlatent.models.base.GuidedLatentModel.fit` itself (one epoch, no
validation, no progress bar): its wall time divided by its number of steps, so the shuffling,
minibatch indexing, encoder pass, ``SVI`` step with ``Trace_ELBO``, the optimizer update and
the penalty bookkeeping of every step are all in it. The torch side is a hand-written loop over
deep copies of the same networks with the same loss (the one-sample ELBO estimate scaled to the
dataset size plus the weighted penalties), ``torch.optim.Adam`` and the same minibatches. A
third timing runs ``fit`` with Pyro's own ``ClippedAdam`` (one torch optimizer per parameter
tensor, which ``fit`` used before its single foreach update) swapped in, so the optimizer's
share of the overhead is measured in the same process.

Two sizes are timed for each model: *tiny* networks, where the arithmetic is negligible and the
step time is the per-step overhead floor, and the constructors' *default* networks. Timings are
medians over interleaved rounds (``_timing.measure_interleaved``); each case prints the speedups
against the torch loop, and the ratios ``fit / torch`` are written as JSON (``--output``).
Run ``python benchmarks/timing/bench_fit_overhead.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyro
import torch
import torch.nn.functional as F
import xarray as xr
from _timing import Timing, measure_interleaved, print_ratios
from pyro.optim import PyroOptim
from pyro.optim.clipped_adam import ClippedAdam

from pyro_dlatent import training
from pyro_dlatent.data import simulate
from pyro_dlatent.flow import flow_matching_loss
from pyro_dlatent.models.auxvae import AuxVAE
from pyro_dlatent.models.base import GuidedLatentModel
from pyro_dlatent.models.dlcfm import DLCFM

__all__ = ["CASES", "PerParameterClippedAdam", "fit_epoch", "main", "torch_loop_factory"]

CASES: dict[str, dict[str, Any]] = {
    "dlcfm_tiny": {
        "model": "dlcfm",
        "data": "halos",
        "size": 16,
        "batch": 4,
        "kwargs": {"width": 4, "hidden": 16, "field_channels": 4, "embed_dim": 8},
    },
    "auxvae_tiny": {
        "model": "auxvae",
        "data": "sources",
        "size": 16,
        "batch": 4,
        "kwargs": {"width": 4, "hidden": 16},
    },
    "dlcfm_default": {"model": "dlcfm", "data": "halos", "size": 32, "batch": 32, "kwargs": {}},
    "auxvae_default": {"model": "auxvae", "data": "sources", "size": 32, "batch": 32, "kwargs": {}},
}
"""Benchmark cases: model, simulator, image side, batch size and constructor arguments."""


class PerParameterClippedAdam(PyroOptim):
    """Pyro's ``ClippedAdam``: one torch optimizer per parameter (``fit``'s former optimizer)."""

    def __init__(self, **optim_args: Any) -> None:
        super().__init__(ClippedAdam, optim_args)

    def param_states(self) -> dict[torch.Tensor, dict[str, Any]]:
        """Per-parameter torch optimizer state dicts (what checkpoints store)."""
        return {p: optimizer.state_dict() for p, optimizer in self.optim_objs.items()}


def _build(case: dict[str, Any], ds: xr.Dataset) -> GuidedLatentModel:
    klass = DLCFM if case["model"] == "dlcfm" else AuxVAE
    return klass.from_dataset(ds, residual_dim=4, seed=0, **case["kwargs"])


def torch_loop_factory(
    model: GuidedLatentModel, lr: float
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """A plain-torch training loop on copies of ``model``'s networks, with ``fit``'s loss.

    The returned function runs one epoch over ``(images, aux)`` (shapes ``(n, H, W)`` and
    ``(n, aux_dim)``) in ``ceil(n / batch)`` shuffled minibatches, the batch size being read
    from the closure argument ``batch`` of each call.
    """
    networks = {name: copy.deepcopy(getattr(model, name)) for name in model._networks}
    parameters = [p for net in networks.values() for p in net.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    k, r = model.aux_dim, model.residual_dim
    tau = float(model.split.tau)
    pixels = model.image_size**2
    encoder = networks["encoder"]

    def log_likelihood(images_std: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if isinstance(model, DLCFM):
            loss = flow_matching_loss(networks["field"], images_std, z)
            return -model.flow_weight * pixels * loss
        decoder = networks["decoder"]
        normal = torch.distributions.Normal(decoder.net(z), decoder.scale())
        return normal.log_prob(images_std).sum((-2, -1))

    def epoch(images: torch.Tensor, aux: torch.Tensor, batch: int) -> None:
        n = images.shape[0]
        order = torch.randperm(n)
        for index in torch.tensor_split(order, -(-n // batch)):
            x, u = images[index], aux[index]
            size = x.shape[0]
            x_std = model.standardize_images(x)
            loc, raw = encoder(x_std).split(k + r, dim=-1)
            scale = F.softplus(raw) + 1e-4
            z = loc + scale * torch.randn_like(loc)
            prior_loc = torch.cat([u, torch.zeros(size, r)], dim=-1)
            prior_scale = torch.cat([torch.full((size, k), tau), torch.ones(size, r)], dim=-1)
            log_pz = torch.distributions.Normal(prior_loc, prior_scale).log_prob(z).sum(-1)
            log_qz = torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)
            elbo = n / size * (log_likelihood(x_std, z) + log_pz - log_qz).sum()
            alignment, decorrelation = model.penalties(loc, u)
            penalty = pixels * (model.align_weight * alignment + model.decor_weight * decorrelation)
            loss = -elbo + n * penalty
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()

    return epoch


def fit_epoch(
    model: GuidedLatentModel, ds: xr.Dataset, batch: int, *, per_parameter: bool = False
) -> None:
    """One epoch of ``model.fit`` on ``ds`` (no validation, no progress bar).

    With ``per_parameter`` the epoch runs with :class:`PerParameterClippedAdam` in place of the
    optimizer ``fit`` builds.
    """
    foreach = training._ForeachClippedAdam
    if per_parameter:
        training._ForeachClippedAdam = PerParameterClippedAdam
    try:
        model.fit(ds, epochs=1, batch_size=batch, val_fraction=0.0, progress=False, seed=0)
    finally:
        training._ForeachClippedAdam = foreach


def _per_step(timing: Timing, steps: int) -> Timing:
    return Timing.from_values(value / steps for value in timing.values)


def run_case(name: str, steps: int, rounds: int) -> dict[str, Any]:
    """Time one case of :data:`CASES`: medians over interleaved rounds of ``steps`` steps."""
    case = CASES[name]
    batch = case["batch"]
    ds = simulate(case["data"], steps * batch, size=case["size"], seed=0)
    model = _build(case, ds)
    images, aux, _ = model.prepare(ds)
    loop = torch_loop_factory(model, lr=1e-3)
    epochs = {
        "fit": lambda: fit_epoch(model, ds, batch),
        "fit_per_parameter_adam": lambda: fit_epoch(model, ds, batch, per_parameter=True),
        "torch": lambda: loop(images, aux, batch),
    }
    rows = [
        (key, _per_step(timing, -(-ds.sizes["sample"] // batch)))
        for key, timing in measure_interleaved(epochs, repeat=rounds, warmup=1)
    ]
    print(f"{name}, batch {batch}, one step:")
    print_ratios(rows, baseline="torch")
    ms = {key: [1e3 * value for value in timing.values] for key, timing in rows}
    median = {key: 1e3 * timing.median for key, timing in rows}
    return {
        "case": name,
        "model": case["model"],
        "image_size": case["size"],
        "batch_size": batch,
        "kwargs": case["kwargs"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "parameter_tensors": len(list(model.parameters())),
        "fit_step_ms": round(median["fit"], 3),
        "torch_step_ms": round(median["torch"], 3),
        "ratio": round(median["fit"] / median["torch"], 3),
        "fit_per_parameter_adam_step_ms": round(median["fit_per_parameter_adam"], 3),
        "per_parameter_ratio": round(median["fit_per_parameter_adam"] / median["torch"], 3),
        "fit_step_ms_all": [round(t, 3) for t in ms["fit"]],
        "fit_per_parameter_adam_step_ms_all": [round(t, 3) for t in ms["fit_per_parameter_adam"]],
        "torch_step_ms_all": [round(t, 3) for t in ms["torch"]],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--steps", type=int, default=20, help="steps per timed epoch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-validation", action="store_true", help="disable Pyro validation")
    parser.add_argument("--output", type=Path, default=Path("bench_fit_overhead.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pyro.enable_validation(not args.no_validation)
    pyro.set_rng_seed(0)
    results = []
    for name in args.cases:
        result = run_case(name, args.steps, args.rounds)
        results.append(result)
        print(
            f"{result['parameter_tensors']} parameter tensors; fit / torch time "
            f"{result['ratio']:.2f} (per-parameter Adam {result['per_parameter_ratio']:.2f})"
        )
    summary = {
        "benchmark": "fit_overhead",
        "threads": args.threads,
        "pyro_validation": not args.no_validation,
        "cases": results,
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "python": platform.python_version(),
    }
    args.output.write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
