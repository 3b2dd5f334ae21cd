"""Small shared helpers: atomic JSON and netCDF files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["to_jsonable", "write_json", "write_netcdf"]


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


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=to_jsonable))
    os.replace(tmp, path)
    return path


def write_netcdf(ds: Any, path: str | os.PathLike) -> Path:
    """Write an ``xarray.Dataset`` to netCDF (h5netcdf) atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    ds.to_netcdf(tmp, engine="h5netcdf")
    os.replace(tmp, path)
    return path
