"""Profile one ``fit`` epoch of each model with ``torch.profiler``: where a training step goes.

Prepared for a GPU machine (``--device cuda``), runnable on the CPU. For ``AuxVAE`` and ``DLCFM``
at their default networks on ``--num`` simulated ``sources`` images (``--size``, default 32x32)
and ``--batch-size`` (default 128), it runs one warm-up epoch, then one profiled epoch, and
prints and writes (``--output``):

- the step time: the profiled epoch's wall time over its steps, and an unprofiled epoch's;
- the operators that take the most time (self device time on a GPU, self CPU time on the CPU);
- on a GPU, the host synchronizations of one step, counted by
  ``torch.cuda.set_sync_debug_mode("warn")`` (each ``.item()``, ``bool(tensor)`` or host copy
  stalls the step until the device has caught up), with the line of the package that caused each;
- a Chrome trace of the profiled epoch per model under ``--trace-dir`` (open in
  ``chrome://tracing`` or Perfetto).

Run ``python benchmarks/timing/profile_step.py --device cuda --trace-dir traces --output
step.json``; a quick CPU run: ``--num 512 --batch-size 64``.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from pyro_dlatent.data import simulate
from pyro_dlatent.models import DLCFM, AuxVAE

__all__ = ["main"]

MODELS = {"auxvae": AuxVAE, "dlcfm": DLCFM}


def _fit_epoch(model: Any, ds: Any, batch_size: int, device: str) -> float:
    """Wall seconds of one epoch of ``fit`` (no validation pass)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    model.fit(ds, epochs=1, batch_size=batch_size, val_fraction=0.0, progress=False, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _host_syncs(model: Any, ds: Any, batch_size: int, device: str) -> dict[str, int]:
    """Host synchronizations of a one-step epoch, by the package line that caused them."""
    small = ds.isel(sample=slice(0, batch_size))
    lines: collections.Counter[str] = collections.Counter()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _fit_epoch(model, small, batch_size, device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for warning in caught:  # issued at the Python line whose operation synchronized
        if "synchroniz" in str(warning.message):
            lines[f"{Path(warning.filename).name}:{warning.lineno}"] += 1
    return dict(lines.most_common())


def profile_model(
    name: str, num: int, size: int, batch_size: int, device: str, top: int, trace_dir: Path | None
) -> dict[str, Any]:
    """Profile one model; print its table; return its numbers."""
    ds = simulate("sources", num, size=size, seed=0)
    model = MODELS[name].from_dataset(ds, seed=0)
    # the steps alone: no generation map, uncertainty calibration or residual field after them
    model.calibrate_after_fit = model.residual_after_fit = False
    steps = -(-num // batch_size)
    _fit_epoch(model, ds, batch_size, device)  # warm-up: allocator, kernels, autotuning
    plain = _fit_epoch(model, ds, batch_size, device)
    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=False) as prof:
        profiled = _fit_epoch(model, ds, batch_size, device)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"\n{name}: {num} images, batch {batch_size}, {size}x{size}, {device}")
    print(f"  step {1e3 * plain / steps:.2f} ms ({1e3 * profiled / steps:.2f} ms profiled)")
    print(prof.key_averages().table(sort_by=key, row_limit=top))
    averages = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    result: dict[str, Any] = {
        "step_ms": 1e3 * plain / steps,
        "profiled_step_ms": 1e3 * profiled / steps,
        "steps": steps,
        "top_ops_ms_per_step": {e.key: getattr(e, key) / 1e3 / steps for e in averages[:top]},
    }
    if trace_dir is not None:
        trace_dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace_dir / f"{name}.json"))
    if cuda:
        result["host_syncs_per_step"] = _host_syncs(model, ds, batch_size, device)
        print("  host synchronizations in one step:", result["host_syncs_per_step"] or "none")
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; returns what it writes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--num", type=int, default=4096, help="images per epoch")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--top", type=int, default=15, help="operators listed")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--trace-dir", type=Path, default=None)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
    }
    for name in args.models:
        results[name] = profile_model(
            name, args.num, args.size, args.batch_size, args.device, args.top, args.trace_dir
        )
    if args.output is not None:
        args.output.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
