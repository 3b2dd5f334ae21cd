"""Time one Aux-VAE training step in Pyro against the same step written in plain torch.

Both steps use the same networks (the torch step works on deep copies of the Aux-VAE's encoder
and decoder), the same batch, the same loss (one-sample ELBO estimate scaled to the dataset size
plus the weighted alignment and decorrelation penalties) and the same learning rate. The Pyro
step is what :meth:`pyro_dlatent.AuxVAE.fit` runs: encoder once, ``SVI`` with ``Trace_ELBO`` and
``ClippedAdam``'s rule applied as one foreach update; the torch step is a hand-written loss with
``torch.optim.Adam``. Steps are timed in interleaved rounds in one process on a batch of the
built-in ``sources`` images (``_timing.measure``); the medians and the speedups against the
torch step are printed, and the numbers written as JSON (``--output``).

Run ``python benchmarks/timing/bench_auxvae_step.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F
from _timing import Timing, measure, print_ratios
from pyro.infer import Trace_ELBO

from pyro_dlatent.data import simulate
from pyro_dlatent.models.auxvae import AuxVAE
from pyro_dlatent.training import _ForeachClippedAdam, _GuardedSVI

__all__ = ["main", "pyro_step_factory", "torch_step_factory"]


def torch_step_factory(model: AuxVAE, num_data: int, lr: float):
    """A plain-torch training step on copies of ``model``'s networks, with the same loss."""
    encoder = copy.deepcopy(model.encoder)
    decoder = copy.deepcopy(model.decoder)
    parameters = [*encoder.parameters(), *decoder.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    k, r = model.aux_dim, model.residual_dim
    tau = float(model.split.tau)
    loc_image, scale_image = model.image_loc, model.image_scale

    def step(images: torch.Tensor, aux: torch.Tensor) -> float:
        batch = images.shape[0]
        x_std = (images - loc_image) / scale_image
        loc, raw = encoder(x_std).split(k + r, dim=-1)
        scale = F.softplus(raw) + 1e-4
        z = loc + scale * torch.randn_like(loc)
        mean = decoder.net(z)
        log_px = torch.distributions.Normal(mean, decoder.scale()).log_prob(x_std).sum((-2, -1))
        prior_loc = torch.cat([aux, torch.zeros(batch, r)], dim=-1)
        prior_scale = torch.cat([torch.full((batch, k), tau), torch.ones(batch, r)], dim=-1)
        log_pz = torch.distributions.Normal(prior_loc, prior_scale).log_prob(z).sum(-1)
        log_qz = torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)
        elbo = num_data / batch * (log_px + log_pz - log_qz).sum()
        alignment, decorrelation = model.penalties(loc, aux)
        pixels = model.image_size**2
        penalty = pixels * (model.align_weight * alignment + model.decor_weight * decorrelation)
        loss = -elbo + num_data * penalty
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def pyro_step_factory(model: AuxVAE, num_data: int, lr: float, clip_norm: float):
    """The step :meth:`AuxVAE.fit` runs, on the model itself."""
    model._forget_params()
    optim = _ForeachClippedAdam(lr=lr, clip_norm=clip_norm)
    svi = _GuardedSVI(model.model, model.guide, optim, Trace_ELBO())

    def step(images: torch.Tensor, aux: torch.Tensor) -> float:
        index = torch.arange(images.shape[0])
        encoded = model.encoder_params(images)
        loss = svi.step(images, aux, None, num_data=num_data, subsample=index, encoded=encoded)
        with torch.no_grad():  # fit() also records the penalties of every step
            model.penalties(encoded[0], aux)
        return loss

    return step


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round and side")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-validation", action="store_true", help="disable Pyro validation")
    parser.add_argument("--output", type=Path, default=Path("bench_auxvae_step.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pyro.enable_validation(not args.no_validation)
    pyro.set_rng_seed(0)

    num_data = 8192
    ds = simulate("sources", args.batch_size, size=args.size, seed=0)
    model = AuxVAE.from_dataset(ds, residual_dim=8, width=args.width, seed=0)
    images, aux, _ = model.prepare(ds)
    lr = 1e-3
    pyro_step = pyro_step_factory(model, num_data, lr, clip_norm=10.0)
    torch_step = torch_step_factory(model, num_data, lr)
    steps = {"pyro": lambda: pyro_step(images, aux), "torch": lambda: torch_step(images, aux)}
    values: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(args.rounds):  # each side times --steps single steps, in turn
        for name, step in steps.items():
            timing = measure(step, repeat=args.steps, warmup=3 if round_ == 0 else 0)
            values[name] += timing.values
    rows = [(name, Timing.from_values(v)) for name, v in values.items()]
    print(f"one training step, batch {args.batch_size}, {args.size}x{args.size}:")
    print_ratios(rows, baseline="torch")
    pyro_times, torch_times = values["pyro"], values["torch"]
    pyro_ms = 1e3 * statistics.median(pyro_times)
    torch_ms = 1e3 * statistics.median(torch_times)
    result = {
        "benchmark": "auxvae_step",
        "batch_size": args.batch_size,
        "image_size": args.size,
        "width": args.width,
        "threads": args.threads,
        "pyro_validation": not args.no_validation,
        "pyro_step_ms": round(pyro_ms, 3),
        "torch_step_ms": round(torch_ms, 3),
        "ratio": round(pyro_ms / torch_ms, 4),
        "target_ratio": 1.2,
        "pyro_step_ms_iqr": [round(1e3 * q, 3) for q in statistics.quantiles(pyro_times, n=4)],
        "torch_step_ms_iqr": [round(1e3 * q, 3) for q in statistics.quantiles(torch_times, n=4)],
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "python": platform.python_version(),
    }
    print(f"pyro / torch time {pyro_ms / torch_ms:.3f} (target <= 1.2)")
    args.output.write_text(json.dumps(result, indent=2))
    if not math.isfinite(result["ratio"]):
        raise SystemExit("non-finite timing")
    return result


if __name__ == "__main__":
    main()
