"""Built-in simulators and dataset I/O.

Every dataset is an ``xarray.Dataset`` with an ``image`` variable ``(sample, y, x)`` and one
variable per auxiliary (with a ``units`` attribute); see :mod:`pyro_dlatent.data.io`.
"""

from __future__ import annotations

import importlib
from typing import Any

import xarray as xr

from pyro_dlatent.data.io import (
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
    """
    if name not in SIMULATORS:
        raise ValueError(f"name must be one of {sorted(SIMULATORS)}, got {name!r}")
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"expected num >= 1 (an int), got {num!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"expected size >= 8 (an int), got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"expected seed >= 0 (an int), got {seed!r}")
    module = importlib.import_module(SIMULATORS[name])
    return module.simulate(num, size=size, seed=seed, **kwargs)
