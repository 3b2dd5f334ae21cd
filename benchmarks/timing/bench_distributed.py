"""Data-parallel training: images per second on 1 and 2 processes, and the single-process step.

Two measurements, each printed with :func:`_timing.print_ratios`:

- **throughput**: an Aux-VAE trained on ``sources`` by ``fit`` in fresh processes: one process
  with one thread, one process with ``--processes`` threads, and ``--processes`` processes of
  one thread each in a gloo group (NCCL, one GPU each, with ``--device cuda``). A measurement is
  one epoch's training time as ``fit`` records it (``history[i]["time_s"]``: the steps, without
  validation, set-up or post-fit calibration); the first epoch is a warm-up. Images per second
  are the training images over the median epoch. The whole fit's wall time is printed too, as
  set-up and calibration run on every process and do not get faster.
- **single-process step** (``--before REV``): the same epoch timing, per step, for the package
  at git revision ``REV`` and at ``--after`` (default: this working tree), each in its own
  process, alternating ``--rounds`` times so that the load of a shared machine reaches both.

Run from the repository root, e.g.::

    python benchmarks/timing/bench_distributed.py --num 1024 --epochs 4
    python benchmarks/timing/bench_distributed.py --skip-throughput \
        --before ad938c6^ --after ad938c6
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _timing import Timing, print_ratios

REPOSITORY = Path(__file__).resolve().parents[2]
NETWORKS = {"tiny": {"width": 8, "hidden": 32}, "default": {}}
"""Aux-VAE sizes: ``tiny`` shows the per-step overhead floor, ``default`` the constructor's."""


def _train(spec: dict[str, Any], device: str) -> dict[str, Any]:
    """Fit an Aux-VAE as ``spec`` says; its epochs' training times and the fit's wall time."""
    import warnings

    from pyro_dlatent import AuxVAE, data

    warnings.simplefilter("ignore")  # calibration warnings of a short fit
    ds = data.simulate("sources", spec["num"], size=spec["size"], seed=0)
    model = AuxVAE.from_dataset(ds, seed=0, **NETWORKS[spec["networks"]])
    start = time.perf_counter()
    history = model.fit(
        ds,
        epochs=spec["epochs"],
        batch_size=spec["batch_size"],
        val_fraction=0.0,
        progress=False,
        device=device,
    )
    return {
        "epochs_s": [record["time_s"] for record in history],
        "wall_s": time.perf_counter() - start,
        "images": spec["num"],
        "steps": -(-spec["num"] // spec["batch_size"]),
    }


def _process(rank: int, size: int, threads: int, spec: dict, store: str, out: str) -> None:
    torch.set_num_threads(threads)
    device = spec["device"]
    if device == "cuda":
        device = f"cuda:{rank}"
        torch.cuda.set_device(device)
    if size > 1:
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=size)
    result = _train(spec, device)
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    if size > 1:
        dist.destroy_process_group()


def run_processes(size: int, threads: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Train in ``size`` fresh processes of ``threads`` threads (a group when ``size > 1``)."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "result.json"
        store = Path(scratch) / "store"
        mp.spawn(_process, args=(size, threads, spec, str(store), str(out)), nprocs=size)
        return json.loads(out.read_text())


def throughput(spec: dict[str, Any], processes: int) -> None:
    """Print epoch timings and images per second on 1 and ``processes`` processes."""
    if spec["device"] == "cuda":  # one GPU per process
        variants = {"1 process, 1 GPU": (1, 1)}
        if torch.cuda.device_count() >= processes:
            variants[f"{processes} processes, {processes} GPUs"] = (processes, 1)
    else:
        variants = {"1 process x 1 thread": (1, 1)}
        variants[f"1 process x {processes} threads"] = (1, processes)
        variants[f"{processes} processes x 1 thread"] = (processes, 1)
    rows, walls = [], {}
    for name, (size, threads) in variants.items():
        result = run_processes(size, threads, spec)
        rows.append((name, Timing.from_values(result["epochs_s"][1:])))
        walls[name] = result["wall_s"]
    print(
        f"\nthroughput: Aux-VAE ({spec['networks']} networks), sources {spec['size']}x"
        f"{spec['size']}, {spec['num']} images, global batch {spec['batch_size']}, "
        f"device {spec['device']}; one epoch per measurement"
    )
    print_ratios(rows, baseline=rows[0][0], unit="s")
    for name, timing in rows:
        print(
            f"{name:<{max(map(len, variants))}}  {spec['num'] / timing.median:9.1f} images/s"
            f"  (whole fit of {spec['epochs']} epochs: {walls[name]:.1f} s)"
        )


def _checkout(revision: str, into: Path) -> Path:
    """The package at a git revision, exported into the new folder ``into``."""
    into.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPOSITORY), "archive", revision], check=True, capture_output=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def step_before_after(spec: dict[str, Any], before: str, after: str | None, rounds: int) -> None:
    """Print the single-process step of the package at ``before`` and ``after``."""
    values: dict[str, list[float]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as scratch:
        trees = {"before": _checkout(before, Path(scratch) / "before")}
        if after is None:
            trees["after"] = REPOSITORY
        else:
            trees["after"] = _checkout(after, Path(scratch) / "after")
        command = [sys.executable, str(Path(__file__).resolve()), "--step-worker", json.dumps(spec)]
        for _ in range(rounds):
            for name, tree in trees.items():
                env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
                done = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
                result = json.loads(done.stdout.strip().splitlines()[-1])
                values[name] += [t / result["steps"] for t in result["epochs_s"][1:]]
    print(
        f"\nsingle-process step: Aux-VAE ({spec['networks']} networks), sources {spec['size']}x"
        f"{spec['size']}, batch {spec['batch_size']}, one thread; before = {before}, after = "
        f"{after or 'this working tree'}; {rounds} alternating rounds"
    )
    rows = [(name, Timing.from_values(v)) for name, v in values.items()]
    print_ratios(rows, baseline="before")
    ratio = rows[1][1].median / rows[0][1].median
    print(f"after / before = {ratio:.3f} (median step)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", choices=list(NETWORKS), default="default")
    parser.add_argument("--num", type=int, default=1024, help="training images")
    parser.add_argument("--size", type=int, default=32, help="image side")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch")
    parser.add_argument("--epochs", type=int, default=4, help="per fit; the first is a warm-up")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: one GPU per process")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--before", help="git revision of the single-process step's baseline")
    parser.add_argument("--after", help="git revision to compare with it [this working tree]")
    parser.add_argument("--rounds", type=int, default=3, help="of the before/after comparison")
    parser.add_argument("--step-networks", choices=list(NETWORKS), default="tiny")
    parser.add_argument("--step-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step_worker is not None:  # one timed fit, in the tree that PYTHONPATH names
        torch.set_num_threads(1)
        print(json.dumps(_train(json.loads(args.step_worker), "cpu")))
        return
    spec = {
        "networks": args.networks,
        "num": args.num,
        "size": args.size,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "device": args.device,
    }
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores (load {load})", end="")
    if args.device == "cuda":
        print(f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}", end="")
    print()
    if not args.skip_throughput:
        throughput(spec, args.processes)
    if args.before is not None:
        step = {**spec, "networks": args.step_networks, "size": 16, "batch_size": 32}
        step_before_after(step, args.before, args.after, args.rounds)


if __name__ == "__main__":
    main()
