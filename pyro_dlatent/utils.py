"""Small shared helpers: one atomic write, and JSON and netCDF files written with it."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import gc
import json
import os
import shutil
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
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except PermissionError as err:
        raise PermissionError(
            err.errno, f"cannot write {path.name!r} into {str(path.parent)!r}: permission denied"
        ) from None
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if _disk_full(err, path.parent):
            raise OSError(
                errno.ENOSPC,
                f"no space left on the disk of {str(path.parent)!r} while writing {path.name!r}; "
                "the file there was kept as it was",
            ) from err
        raise
    _fsync_dir(path.parent)
    return path


_FULL_BELOW = 1 << 20
"""Free bytes under which a failed write is reported as a full disk."""


def _disk_full(err: BaseException, folder: Path) -> bool:
    """Whether a write failed for want of space (libraries do not all raise ENOSPC)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(err, Exception):
        return False
    try:
        return shutil.disk_usage(folder).free < _FULL_BELOW
    except OSError:
        return False


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (:func:`atomic_write`)."""
    text = json.dumps(obj, indent=2, default=to_jsonable)
    return atomic_write(path, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))


def write_netcdf(ds: Any, path: str | os.PathLike) -> Path:
    """Write an ``xarray.Dataset`` to netCDF (h5netcdf) atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: ds.to_netcdf(tmp, engine="h5netcdf"))


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None on another C library."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Give the heap's free pages back to the system (glibc), after a garbage collection.

    Between the phases of a long run: glibc keeps the pages that freed tensors leave in its
    heap, so a fit's resident memory otherwise grows to the sum of its phases' peaks.
    """
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
