"""Out-of-core data: write a large ``sources`` dataset chunk by chunk, then stream it to a loader.

Three phases, each in a fresh Python process so that each one's peak memory is its own:

1. ``write``: :func:`pyro_dlatent.data.simulate_to` writes ``--num`` images into a zarr store a
   chunk at a time (seconds, images per second, peak resident memory of the writer);
2. ``memory`` (the baseline): the store loaded whole into a tensor, an epoch of shuffled
   minibatches indexed from it, as ``fit`` does today;
3. ``stream``: an epoch of :class:`~pyro_dlatent.data.stream.MinibatchStream` through a
   ``DataLoader`` with ``--workers`` worker processes (persistent across epochs).

Each epoch is timed bare (``--consumers none``: the loader alone, a whole epoch) and with a small
convolutional network's forward and backward pass on every batch (``conv``: the loader next to
training work that competes for the same cores; the first ``--conv-batches`` batches of an
epoch). The training process runs ``--threads`` torch threads in both paths (default 1: on a
small shared machine, torch's two-thread gather of a minibatch from a large tensor was ten times
slower than one thread's whenever other processes held the cores).

Peak memory of the loading processes is sampled every 0.1 s with psutil, summed over the main
process and its workers, as resident set size (RSS: pages shared by the forked workers count
once per process) and as proportional set size (PSS: shared pages split among the processes
sharing them; the honest total).

Run ``python benchmarks/timing/bench_stream.py --num 200000`` (about 800 MB of images at
32x32; the default directory is a temporary one, deleted afterwards) or a quick
``--num 4096 --repeat 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _timing import Timing, measure, print_ratios

__all__ = ["main"]

MIB = 2**20


class _PeakMemory:
    """Peak RSS and PSS of this process plus its children, and of this process, on a thread."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.rss = 0
        self.pss = 0
        self.main_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _PeakMemory:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        try:
            import psutil
        except ImportError:  # without psutil: this process's own peak, from the kernel
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.rss = self.pss = self.main_rss = peak
            return
        me = psutil.Process()
        rss = pss = 0
        for process in [me, *me.children(recursive=True)]:
            try:
                info = process.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
            if process.pid == me.pid:
                self.main_rss = max(self.main_rss, info.rss)
        self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)


def _load() -> dict[str, float]:
    one, five, _ = os.getloadavg()
    return {"load_1min": one, "load_5min": five}


def _consumer(kind: str):
    """A callable run on every batch's images: nothing, or a small conv net's training step."""
    import torch
    from torch import nn

    if kind == "none":
        return lambda images: None
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 1),
    )
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-4)

    def step(images):
        loss = net(images[:, None]).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def phase_write(args: argparse.Namespace) -> dict:
    """Write the store; seconds and the writer's peak RSS."""
    from pyro_dlatent.data import simulate_to

    imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    before = _load()
    timing = measure(
        lambda: simulate_to(
            args.path,
            "sources",
            args.num,
            size=args.size,
            seed=0,
            chunk_size=args.chunk_size,
            overwrite=True,
        ),
        repeat=1,
        warmup=0,
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "seconds": timing.median,
        "images_per_second": args.num / timing.median,
        "peak_rss_mib": peak / MIB,
        "rss_after_imports_mib": imported / MIB,
        "store_mib": sum(f.stat().st_size for f in Path(args.path).rglob("*") if f.is_file()) / MIB,
        "load_before": before,
        "load_after": _load(),
    }


def phase_memory(args: argparse.Namespace) -> dict:
    """Epochs of minibatches indexed from the whole dataset in memory (today's ``fit``)."""
    import numpy as np
    import torch

    from pyro_dlatent.data import load

    torch.set_num_threads(args.threads)
    results = {}
    with _PeakMemory() as peak:
        ds = load(args.path)
        images = torch.from_numpy(ds["image"].values)
        aux = torch.from_numpy(np.stack([ds[n].values for n in ds.attrs["aux_names"]], -1))
        num = images.shape[0]
        generator = torch.Generator().manual_seed(0)
        for kind in args.consumers:
            consume = _consumer(kind)

            stop = _images_per_epoch(kind, num, args)

            def epoch(consume=consume, stop=stop):
                order = torch.randperm(num, generator=generator)
                for start in range(0, stop, args.batch_size):
                    index = order[start : start + args.batch_size]
                    batch_images, _ = images[index], aux[index]
                    consume(batch_images)

            before = _load()
            timing = measure(epoch, repeat=args.repeat, warmup=0)
            results[kind] = {**_timing_dict(timing, stop), "load_before": before}
    return _with_memory(results, peak)


def _with_memory(results: dict, peak: _PeakMemory) -> dict:
    """``results`` with the phase's peak memory and the load at its end."""
    return {
        **results,
        "peak_rss_mib": peak.rss / MIB,
        "peak_pss_mib": peak.pss / MIB,
        "peak_main_rss_mib": peak.main_rss / MIB,
        "load_after": _load(),
    }


def phase_stream(args: argparse.Namespace) -> dict:
    """Epochs of a MinibatchStream through a DataLoader with worker processes."""
    import torch
    from torch.utils.data import DataLoader

    from pyro_dlatent.data.stream import MinibatchStream

    torch.set_num_threads(args.threads)
    results = {}
    with _PeakMemory() as peak:
        stream = MinibatchStream(
            args.path, args.batch_size, seed=0, buffer_chunks=args.buffer_chunks
        )
        loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=args.workers,
            persistent_workers=args.workers > 0,
        )
        epochs = iter(range(10**9))
        for kind in args.consumers:
            consume = _consumer(kind)

            stop = _images_per_epoch(kind, stream.num_samples, args)

            def epoch(consume=consume, stop=stop):
                stream.set_epoch(next(epochs))
                seen = 0
                for batch in loader:
                    consume(torch.from_numpy(batch.images))
                    seen += len(batch.index)
                    if seen >= stop:
                        break
                if seen != stop:
                    raise RuntimeError(f"an epoch drew {seen} samples, expected {stop}")

            before = _load()
            timing = measure(epoch, repeat=args.repeat, warmup=0)
            results[kind] = {**_timing_dict(timing, stop), "load_before": before}
    return _with_memory(results, peak)


def _images_per_epoch(kind: str, num: int, args: argparse.Namespace) -> int:
    """A whole epoch, or the first ``--conv-batches`` full batches of one under a conv net."""
    if kind == "none":
        return num
    return min(num, args.conv_batches * args.batch_size)


def _timing_dict(timing: Timing, num: int) -> dict:
    return {
        "epoch_seconds": list(timing.values),
        "median_seconds": timing.median,
        "images_per_second": num / timing.median,
    }


def _phase_fit(args: argparse.Namespace, streamed: bool) -> dict:
    """One epoch of ``AuxVAE.fit`` (package defaults) on the store, loaded whole or streamed."""
    import torch

    from pyro_dlatent.data import load
    from pyro_dlatent.models import AuxVAE

    torch.set_num_threads(args.threads)
    with _PeakMemory() as peak:
        ds = load(args.path, chunks={}) if streamed else load(args.path)
        model = AuxVAE.from_dataset(ds, seed=0)
        before = _load()
        start = time.perf_counter()
        history = model.fit(
            args.path if streamed else ds,
            epochs=1,
            batch_size=args.batch_size,
            progress=False,
            data_workers=args.workers,
        )
        seconds = time.perf_counter() - start
    trained = round(args.num * 0.9)  # the fit's training part (val_fraction 0.1)
    return {
        "epoch_seconds": history[0]["time_s"],
        "images_per_second": trained / history[0]["time_s"],
        "fit_seconds": seconds,
        "peak_rss_mib": peak.rss / MIB,
        "peak_pss_mib": peak.pss / MIB,
        "peak_main_rss_mib": peak.main_rss / MIB,
        "load_before": before,
        "load_after": _load(),
    }


def phase_fit_memory(args: argparse.Namespace) -> dict:
    """``fit`` on the dataset loaded whole (the in-memory path)."""
    return _phase_fit(args, streamed=False)


def phase_fit_stream(args: argparse.Namespace) -> dict:
    """``fit`` on the store's path (read chunk by chunk by ``--workers`` processes)."""
    return _phase_fit(args, streamed=True)


PHASES = {
    "write": phase_write,
    "memory": phase_memory,
    "stream": phase_stream,
    "fit_memory": phase_fit_memory,
    "fit_stream": phase_fit_stream,
}


def _run_phase(name: str, argv: list[str]) -> dict:
    """Run one phase in a fresh interpreter; it prints its result as the last line of JSON."""
    done = subprocess.run(
        [sys.executable, __file__, "--phase", name, *argv],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    """Command-line entry point; returns the results it prints."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num", type=int, default=200_000, help="images in the dataset")
    parser.add_argument("--size", type=int, default=32, help="pixels per side")
    parser.add_argument("--chunk-size", type=int, default=1024, help="samples per zarr chunk")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--buffer-chunks", type=int, default=4)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of the training process (both paths)"
    )
    parser.add_argument("--repeat", type=int, default=2, help="timed epochs per consumer")
    parser.add_argument(
        "--consumers", nargs="+", default=["none", "conv"], choices=["none", "conv"]
    )
    parser.add_argument(
        "--conv-batches", type=int, default=300, help="batches per timed epoch under the conv net"
    )
    parser.add_argument(
        "--fit", action="store_true", help="also time one epoch of AuxVAE.fit, loaded vs streamed"
    )
    parser.add_argument(
        "--skip-loader", action="store_true", help="only write (and --fit): no loader phases"
    )
    parser.add_argument("--dir", type=Path, default=None, help="keep the store in this folder")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase is not None:  # a child process: one phase, JSON on the last line
        print(json.dumps(PHASES[args.phase](args)))
        return {}
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.dir if args.dir is not None else Path(scratch)
        path = folder / f"sources_{args.num}_{args.size}.zarr"
        common = [
            *("--num", str(args.num), "--size", str(args.size)),
            *("--chunk-size", str(args.chunk_size), "--batch-size", str(args.batch_size)),
            *("--workers", str(args.workers), "--buffer-chunks", str(args.buffer_chunks)),
            *("--threads", str(args.threads)),
            *("--repeat", str(args.repeat), "--conv-batches", str(args.conv_batches)),
            *("--consumers", *args.consumers),
            *("--path", str(path)),
        ]
        results = {
            "num": args.num,
            "size": args.size,
            "chunk_size": args.chunk_size,
            "batch_size": args.batch_size,
            "workers": args.workers,
            "buffer_chunks": args.buffer_chunks,
            "threads": args.threads,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        phases = ["write"] + ([] if args.skip_loader else ["memory", "stream"])
        phases += ["fit_memory", "fit_stream"] if args.fit else []
        for name in phases:
            results[name] = _run_phase(name, common)
            print(f"{name}: {json.dumps(results[name])}", flush=True)
    write = results["write"]
    print(
        f"write: {args.num} images of {args.size}x{args.size} in {write['seconds']:.1f} s "
        f"({write['images_per_second']:.0f} images/s, store {write['store_mib']:.0f} MiB); "
        f"peak RSS {write['peak_rss_mib']:.0f} MiB ({write['rss_after_imports_mib']:.0f} MiB "
        "after the imports)"
    )
    for name in ("memory", "stream", "fit_memory", "fit_stream"):
        if name not in results:
            continue
        phase = results[name]
        print(
            f"{name}: peak RSS {phase['peak_rss_mib']:.0f} MiB, PSS {phase['peak_pss_mib']:.0f} "
            f"MiB (main process and workers; main alone: RSS {phase['peak_main_rss_mib']:.0f} "
            f"MiB); load {phase['load_after']['load_1min']:.2f} after"
        )
    if args.fit:
        rows = [
            (name, Timing.from_values([results[name]["epoch_seconds"]]))
            for name in ("fit_memory", "fit_stream")
        ]
        for name in ("fit_memory", "fit_stream"):
            print(f"{name}: {results[name]['images_per_second']:.0f} images/s")
        print_ratios(rows, baseline="fit_memory", unit="s")
    for kind in [] if args.skip_loader else args.consumers:
        rows = [
            (f"{name}[{kind}]", Timing.from_values(results[name][kind]["epoch_seconds"]))
            for name in ("memory", "stream")
        ]
        for name in ("memory", "stream"):
            speed = results[name][kind]["images_per_second"]
            print(f"{name}[{kind}]: {speed:.0f} images/s")
        print_ratios(rows, baseline=f"memory[{kind}]", unit="s")
    if args.output is not None:
        args.output.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
