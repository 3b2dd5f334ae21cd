"""The main job: simulate built-in data, train, explain and invert, all into one folder."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pyro_dlatent import data, plots

__all__ = ["run_demo"]


def _simulate_all(out: Path, *, num: int, size: int, seed: int) -> dict[str, Any]:
    summary = {}
    for name in data.SIMULATORS:
        start = time.perf_counter()
        ds = data.simulate(name, num, size=size, seed=seed)
        data.save(ds, out / f"{name}.nc", overwrite=True)
        plots.save_figure(
            plots.preview(ds, title=f"{name}: first images"), out / f"{name}_preview.png"
        )
        summary[name] = {
            "num": ds.sizes["sample"],
            "size": size,
            "aux_names": ds.attrs["aux_names"],
            "seconds": round(time.perf_counter() - start, 3),
        }
    return summary


def run_demo(out: str | Path, *, fast: bool = False, seed: int = 0) -> dict[str, Any]:
    """Run the main job into the folder ``out`` (created if absent) and return its summary.

    Parameters
    ----------
    out : folder for datasets, figures, models and the ``summary.json``
    fast : a small version for tests (fewer images)
    seed : seed of every stage
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"seed": seed, "fast": fast}
    summary["datasets"] = _simulate_all(out, num=64 if fast else 256, size=32, seed=seed)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
