"""Small shared helpers: one atomic write, and JSON and netCDF files written with it."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["atomic_write", "to_jsonable", "write_json", "write_netcdf"]


def to_jsonable(value: Any) -> Any:
    """``json.dumps`` fallback for numpy/torch values: arrays become lists, scalars numbers."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _fsync_dir(directory: Path) -> None:
    """Flush a folder's entry table, so that a rename survives a power cut (best effort)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write ``path`` through ``write(tmp)`` on a temporary file, then rename it into place.

    The temporary file has a unique name in the destination's folder (``mkstemp``), so writers
    of the same ``path`` never share one; ``path`` is either its old content or the complete new
    one, and the temporary file is removed when ``write`` fails.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (:func:`atomic_write`)."""
    text = json.dumps(obj, indent=2, default=to_jsonable)
    return atomic_write(path, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))


def write_netcdf(ds: Any, path: str | os.PathLike) -> Path:
    """Write an ``xarray.Dataset`` to netCDF (h5netcdf) atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: ds.to_netcdf(tmp, engine="h5netcdf"))
