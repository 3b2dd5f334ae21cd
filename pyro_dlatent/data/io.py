"""Datasets as ``xarray.Dataset``: building from arrays, validating, netCDF/zarr I/O.

A pyro_dlatent dataset has

- a variable ``image`` with dims ``(sample, y, x)``;
- one variable per auxiliary with dim ``sample`` and a ``units`` attribute (``NaN`` = missing),
  optionally a ``transform`` attribute (``"log10"``, ``"log"``) used by :func:`make_scaler`;
- ``attrs["aux_names"]``: the auxiliary names, in latent order.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from pyro_dlatent.latent import TRANSFORMS, AuxScaler

__all__ = [
    "aux_array",
    "check_dataset",
    "from_arrays",
    "load",
    "make_scaler",
    "mask_auxiliaries",
    "save",
    "split",
    "unlabelled",
]

_FORMATS = {".nc": "netcdf", ".nc4": "netcdf", ".netcdf": "netcdf", ".zarr": "zarr"}


_RESERVED = ("image", "sample", "x", "y")
"""Names of a dataset's own variables and dimensions, which auxiliaries and extras cannot take."""


def from_arrays(
    images: Any,
    aux: Mapping[str, Any],
    *,
    units: Mapping[str, str] | None = None,
    transforms: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """Build a dataset from a user's own arrays.

    Parameters
    ----------
    images : array-like, shape ``(n, height, width)``
        Finite image values.
    aux : mapping of str to array-like, each shape ``(n,)``
        Auxiliary variables in physical units, in latent order; ``NaN`` marks a missing value.
    units : mapping of str to str, optional
        Units of each auxiliary (default ``""``).
    transforms : mapping of str to str, optional
        Transform applied before standardization (``"log10"`` for a mass, say).
    extra : mapping of str to array-like, optional
        Per-sample variables that are *not* auxiliaries (flags, truths, seeds).
    attrs : mapping, optional
        Dataset attributes (provenance).

    Returns
    -------
    xarray.Dataset
    """
    try:
        images = np.asarray(images)
    except (TypeError, ValueError) as err:
        raise TypeError("images must be a numeric array of shape (n, height, width)") from err
    if images.dtype.kind not in "fiu":
        raise TypeError(f"images must be numeric, got dtype {images.dtype}")
    if images.ndim != 3:
        raise ValueError(f"images must have shape (n, height, width), got {images.shape}")
    n = images.shape[0]
    if n == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise ValueError(f"images is empty: shape {images.shape}")
    stored = images.astype(np.float32, copy=False)
    if not np.isfinite(stored).all():  # checked as stored: 1e39 is finite in float64, not float32
        raise ValueError(
            "images contains values that are not finite as float32 (NaN, inf, or |x| > 3.4e38)"
        )
    if not isinstance(aux, Mapping) or len(aux) == 0:
        raise ValueError("aux must be a non-empty mapping of auxiliary names to arrays")
    taken = set(_RESERVED)
    for label, names in (("aux", list(aux)), ("extra", list(extra or {}))):
        for name in names:
            if not isinstance(name, str) or not name:
                raise ValueError(f"{label} names must be non-empty strings, got {name!r}")
            if name in taken:
                raise ValueError(
                    f"{label} name {name!r} is taken (by the dataset's own {sorted(_RESERVED)} "
                    "or another auxiliary or extra variable); rename it"
                )
            taken.add(name)
    units = dict(units or {})
    transforms = dict(transforms or {})
    for label, mapping in (("units", units), ("transforms", transforms)):
        unknown = set(mapping) - set(aux)
        if unknown:
            raise ValueError(f"{label} names unknown auxiliaries {sorted(unknown)}")
    data_vars: dict[str, Any] = {"image": (("sample", "y", "x"), stored)}
    for name, values in aux.items():
        try:
            values = np.asarray(values)
        except (TypeError, ValueError) as err:
            raise TypeError(f"aux[{name!r}] must be numeric") from err
        if values.dtype.kind not in "fiub":
            raise TypeError(f"aux[{name!r}] must be real numbers, got dtype {values.dtype}")
        values = values.astype(np.float64)
        if values.shape != (n,):
            raise ValueError(f"aux[{name!r}] must have shape ({n},), got {values.shape}")
        if np.isinf(values).any():
            raise ValueError(f"aux[{name!r}] contains infinite values")
        if np.isnan(values).all():
            raise ValueError(f"aux[{name!r}] has no observed value")
        transform = transforms.get(name, "identity")
        if transform not in TRANSFORMS:
            raise ValueError(f"transforms[{name!r}] must be one of {TRANSFORMS}, got {transform!r}")
        var_attrs = {"units": str(units.get(name, "")), "transform": transform}
        data_vars[name] = (("sample",), values, var_attrs)
    for name, values in (extra or {}).items():
        values = np.asarray(values)
        if values.shape[:1] != (n,):
            raise ValueError(f"extra[{name!r}] must have leading dimension {n}")
        dims = ("sample", *(f"{name}_dim{i}" for i in range(1, values.ndim)))
        data_vars[name] = (dims, values)
    ds = xr.Dataset(data_vars, attrs=dict(attrs or {}))
    ds.attrs["aux_names"] = list(aux)
    return ds


def check_dataset(ds: Any, *, name: str = "dataset") -> xr.Dataset:
    """Validate a dataset's layout and return it; raises ``ValueError`` naming ``name``."""
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"{name} must be an xarray.Dataset, got {type(ds).__name__}")
    if "image" not in ds:
        raise ValueError(f"{name} has no variable 'image'")
    if ds["image"].dims != ("sample", "y", "x"):
        raise ValueError(f"{name}['image'] must have dims (sample, y, x), got {ds['image'].dims}")
    if ds.sizes["sample"] == 0:
        raise ValueError(f"{name} is empty (0 samples)")
    names = ds.attrs.get("aux_names")
    if isinstance(names, str):
        names = json.loads(names) if names.startswith("[") else [names]
    if not names:
        raise ValueError(f"{name}.attrs['aux_names'] is missing or empty")
    for aux_name in names:
        if aux_name not in ds:
            raise ValueError(f"{name} lacks auxiliary variable {aux_name!r} named in aux_names")
        if ds[aux_name].dims != ("sample",):
            raise ValueError(f"{name}[{aux_name!r}] must have dims (sample,)")
    ds.attrs["aux_names"] = list(names)
    return ds


def aux_array(ds: xr.Dataset) -> np.ndarray:
    """Auxiliaries as a float64 array ``(n, k)`` in physical units (``NaN`` = missing)."""
    ds = check_dataset(ds)
    return np.stack([ds[n].values.astype(np.float64) for n in ds.attrs["aux_names"]], axis=-1)


def make_scaler(ds: xr.Dataset, *, fit: bool = True) -> AuxScaler:
    """An :class:`AuxScaler` with the dataset's names, units and transforms, fitted on it."""
    ds = check_dataset(ds)
    names = ds.attrs["aux_names"]
    scaler = AuxScaler(
        names,
        units=[str(ds[n].attrs.get("units", "")) for n in names],
        transforms=[str(ds[n].attrs.get("transform", "identity")) for n in names],
    )
    return scaler.fit(aux_array(ds)) if fit else scaler


def split(ds: xr.Dataset, fraction: float = 0.1, *, seed: int = 0) -> tuple[xr.Dataset, xr.Dataset]:
    """Random train/held-out split along ``sample``; returns ``(train, held_out)``."""
    ds = check_dataset(ds)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"expected 0 < fraction < 1, got {fraction}")
    n = ds.sizes["sample"]
    n_out = max(1, round(n * fraction))
    if n_out >= n:
        raise ValueError(f"dataset with {n} samples is too small to split with fraction={fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    return ds.isel(sample=np.sort(perm[n_out:])), ds.isel(sample=np.sort(perm[:n_out]))


def mask_auxiliaries(ds: xr.Dataset, fraction: float, *, seed: int) -> xr.Dataset:
    """A copy of ``ds`` with each auxiliary value hidden (``NaN``) independently with ``fraction``.

    For training with part of the labels missing: the models fall back to the marginal prior of
    a missing auxiliary. ``ds`` itself is left as it is.

    Parameters
    ----------
    ds : xarray.Dataset
    fraction : float
        Probability that a value is hidden, ``0 <= fraction < 1``.
    seed : int
        Seed of the numpy generator that picks the hidden values.
    """
    ds = check_dataset(ds)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"expected 0 <= fraction < 1, got {fraction!r}")
    rng = np.random.default_rng(seed)
    out = ds.copy(deep=True)
    for name in ds.attrs["aux_names"]:
        out[name].values[rng.random(ds.sizes["sample"]) < fraction] = np.nan
    return out


def unlabelled(ds: xr.Dataset) -> xr.Dataset:
    """A copy of ``ds`` with every auxiliary value missing (``NaN``): images without labels.

    A guided-latent model fitted on it has an untethered guided block (its prior is the
    marginal), i.e. it is a plain VAE of the same latent size.
    """
    ds = check_dataset(ds)
    out = ds.copy(deep=True)
    for name in ds.attrs["aux_names"]:
        out[name].values[:] = np.nan
    return out


def _format(path: Path) -> str:
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"path {str(path)!r} must end in one of {sorted(_FORMATS)}")
    return fmt


def save(ds: xr.Dataset, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a dataset to netCDF (``.nc``) or zarr (``.zarr``), atomically.

    The file is written next to its destination and renamed into place, so an interrupted write
    never leaves a half-written file under ``path``. An existing ``path`` is kept unless
    ``overwrite=True``.
    """
    ds = check_dataset(ds)
    path = Path(path)
    fmt = _format(path)
    with _atomic(path, overwrite=overwrite) as tmp:
        if fmt == "netcdf":
            _encode_attrs(ds).to_netcdf(tmp, engine="h5netcdf")
        else:
            _encode_attrs(ds).to_zarr(tmp, mode="w", consolidated=False)
    return path


def _encode_attrs(ds: xr.Dataset) -> xr.Dataset:
    """A shallow copy whose lists, dicts, booleans and ``None`` attributes are JSON text."""
    out = ds.copy()
    out.attrs["aux_names"] = json.dumps(list(ds.attrs["aux_names"]))
    for key, value in list(out.attrs.items()):
        if isinstance(value, dict | list | tuple | bool) or value is None:
            out.attrs[key] = json.dumps(value)
    return out


@contextlib.contextmanager
def _atomic(path: Path, *, overwrite: bool) -> Iterator[Path]:
    """A temporary path next to ``path``, renamed onto it when the block succeeds.

    An existing ``path`` raises ``FileExistsError`` unless ``overwrite``; it is replaced only
    once the new file is complete.
    """
    if path.exists() and not overwrite:
        raise FileExistsError(f"path {str(path)!r} exists; pass overwrite=True to replace it")
    if not path.parent.exists():
        raise ValueError(f"path {str(path)!r}: directory {str(path.parent)!r} does not exist")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)) / path.name
    try:
        yield tmp
        if path.exists():
            backup = path.with_name(path.name + ".old")
            os.replace(path, backup)
            os.replace(tmp, path)
            shutil.rmtree(backup) if backup.is_dir() else backup.unlink()
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def load(path: str | os.PathLike, *, chunks: Mapping[str, int] | None = None) -> xr.Dataset:
    """Read a dataset written by :func:`save` (or any file with the same layout).

    Parameters
    ----------
    path : path to a ``.nc`` file or ``.zarr`` store
    chunks : mapping, optional
        Dask chunks, e.g. ``{"sample": 1024}``, for lazy loading of large data; without it the
        data are read into memory.
    """
    ds = _open(path, chunks=chunks)
    if chunks is None:
        ds = ds.load()
        ds.close()
    return ds


def _open(path: str | os.PathLike, *, chunks: Mapping[str, int] | None) -> xr.Dataset:
    """Open a dataset without reading its arrays (backend-lazy, or dask with ``chunks``)."""
    path = Path(path)
    fmt = _format(path)
    if not path.exists():
        raise ValueError(f"path {str(path)!r} does not exist")
    try:
        if fmt == "netcdf":
            ds = xr.open_dataset(path, engine="h5netcdf", chunks=chunks)
        else:
            ds = xr.open_zarr(path, chunks=chunks, consolidated=False)
    except Exception as err:
        raise ValueError(f"path {str(path)!r} is not a readable {fmt} dataset: {err}") from err
    for key, value in list(ds.attrs.items()):
        if isinstance(value, str) and (
            value[:1] in ("[", "{") or value in ("true", "false", "null")
        ):
            try:
                ds.attrs[key] = json.loads(value)
            except (json.JSONDecodeError, TypeError):
                pass
    return check_dataset(ds, name=f"dataset at {str(path)!r}")
