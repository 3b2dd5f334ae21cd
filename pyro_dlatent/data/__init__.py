"""Built-in simulators and dataset I/O.

Every dataset is an ``xarray.Dataset`` with an ``image`` variable ``(sample, y, x)`` and one
variable per auxiliary (with a ``units`` attribute); see :mod:`pyro_dlatent.data.io`.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import xarray as xr

from pyro_dlatent.data._simulation import Simulation
from pyro_dlatent.data.io import (
    _atomic,
    _encode_attrs,
    _format,
    aux_array,
    check_dataset,
    from_arrays,
    load,
    make_scaler,
    save,
    split,
)

__all__ = [
    "SIMULATORS",
    "aux_array",
    "check_dataset",
    "from_arrays",
    "load",
    "make_scaler",
    "save",
    "simulate",
    "simulate_to",
    "split",
]

SIMULATORS = {
    "sources": "pyro_dlatent.data.sources",
    "halos": "pyro_dlatent.data.halos",
    "galaxies": "pyro_dlatent.data.galaxies",
}
"""Names of the built-in simulators and the modules that implement them."""


def simulate(name: str, num: int, size: int = 32, seed: int = 0, **kwargs: Any) -> xr.Dataset:
    """Simulate a built-in dataset.

    Parameters
    ----------
    name : {"sources", "halos", "galaxies"}
        Which simulator.
    num : int
        Number of images.
    size : int
        Images are ``size x size`` pixels.
    seed : int
        Seed of the numpy generator; the same seed gives the same dataset.
    **kwargs
        Simulator-specific options (see each module's ``simulate``).

    Returns
    -------
    xarray.Dataset
        ``image`` ``(sample, y, x)``, one variable per auxiliary with ``units``, and
        ``attrs["aux_names"]``.

    See Also
    --------
    simulate_to : the same dataset written to disk a chunk at a time.
    """
    return _simulation(name, num, size, seed, **kwargs).dataset()


def simulate_to(
    path: str | os.PathLike,
    name: str,
    num: int,
    size: int = 32,
    seed: int = 0,
    *,
    chunk_size: int | None = None,
    overwrite: bool = False,
    **kwargs: Any,
) -> Path:
    """Simulate a built-in dataset into a zarr store, one chunk of samples at a time.

    The store holds exactly ``simulate(name, num, size, seed, **kwargs)`` (the same values,
    bit for bit, for any ``chunk_size``): the simulators draw every per-sample variable first
    (a few numbers per sample) and then render the images in order from the same random
    stream. Only one chunk of images is in memory at a time, so ``num`` is bounded by the disk,
    not the memory. Like :func:`save`, the store is written next to ``path`` and renamed into
    place once complete, and an existing ``path`` is kept unless ``overwrite=True``.

    Parameters
    ----------
    path : path ending in ``.zarr``
        Where the store goes; its directory must exist.
    name, num, size, seed, **kwargs
        As in :func:`simulate`.
    chunk_size : int, optional
        Samples per zarr chunk along ``sample`` (default: about 4 MiB of images,
        ``2**20 // size**2`` samples, at least 1). Also the unit in which
        :class:`~pyro_dlatent.data.stream.MinibatchStream` reads and shuffles.
    overwrite : bool
        Replace an existing ``path``.

    Returns
    -------
    pathlib.Path
        ``path``; :func:`load` reads it (``chunks={"sample": ...}`` keeps it on disk).

    Examples
    --------
    >>> path = simulate_to("sources.zarr", "sources", 200_000)  # doctest: +SKIP
    >>> lazy = load(path, chunks={"sample": 1024})  # doctest: +SKIP
    """
    path = Path(path)
    if _format(path) != "zarr":
        raise ValueError(
            f"path must end in .zarr (chunks are appended to a zarr store), got {str(path)!r}"
        )
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"expected chunk_size >= 1 (an int), got {chunk_size!r}")
    with _atomic(path, overwrite=overwrite) as tmp:
        simulation = _simulation(name, num, size, seed, **kwargs)
        chunk_size = chunk_size or max(1, 2**20 // size**2)
        for index, part in enumerate(simulation.chunks(chunk_size)):
            part = _encode_attrs(part)
            if index == 0:
                encoding = {
                    var: {"chunks": (chunk_size, *part[var].shape[1:])} for var in part.data_vars
                }
                part.to_zarr(tmp, mode="w", consolidated=False, encoding=encoding)
            else:
                part.to_zarr(tmp, append_dim="sample", consolidated=False)
    return path


def _simulation(name: str, num: int, size: int, seed: int, **kwargs: Any) -> Simulation:
    """The simulator ``name``'s draws for ``num`` samples, images still to render."""
    if name not in SIMULATORS:
        raise ValueError(f"name must be one of {sorted(SIMULATORS)}, got {name!r}")
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"expected num >= 1 (an int), got {num!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"expected size >= 8 (an int), got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"expected seed >= 0 (an int), got {seed!r}")
    module = importlib.import_module(SIMULATORS[name])
    return module._simulation(num, size=size, seed=seed, **kwargs)
