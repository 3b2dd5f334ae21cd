"""Posterior results as ArviZ data (InferenceData on arviz 0.x, DataTree on >= 1) and netCDF I/O.

The groups follow ArviZ's schema, so ``az.summary``, ``az.ess``, ``az.rhat`` and the trace and
rank plots read them unchanged:

- ``posterior``: latent sites with dims ``(chain, draw, ...)`` — for the deep prior ``u``
  (coordinate ``aux`` = the physical names, with a non-index coordinate ``aux_units``),
  ``z_aux`` (``aux``) and ``z_rec`` (``rec``);
- ``posterior_predictive``, ``log_likelihood`` (pointwise, per sensor): ``obs``
  ``(chain, draw, sensor)``;
- ``sample_stats`` (NUTS): ``diverging``, ``step_size``, ``tree_depth``, ``n_steps``,
  ``energy``, ``acceptance_rate``, ``lp``;
- ``observed_data``: ``obs (sensor)``; ``constant_data``: ``sensor_x``, ``sensor_y``,
  ``noise_sd`` and the mesh-node coordinates ``x``, ``y``;
- ``field_summary``: the field's posterior ``field_mean`` and ``field_sd`` on the mesh nodes,
  dims ``(y, x)`` with coordinates ``x``, ``y``. It is a group of its own (not part of
  ``posterior``) because it has no ``chain``/``draw`` dims: ArviZ's diagnostics only read
  ``posterior``, so they ignore it, and netCDF stores it as one more group.

The sample groups are built by ``arviz.from_dict`` (keyword groups on 0.x, a dict of groups on
>= 1); the data groups and the field summary are plain ``xarray.Dataset`` objects.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import arviz as az
import numpy as np
import xarray as xr

from pyro_dlatent.utils import atomic_write

__all__ = [
    "ARVIZ_MAJOR",
    "SAMPLE_GROUPS",
    "field_summary_from_moments",
    "load_netcdf",
    "save_netcdf",
    "to_arviz",
]

ARVIZ_MAJOR = int(az.__version__.split(".")[0])
"""Major version of the installed ArviZ (0: InferenceData; >= 1: xarray DataTree)."""

SAMPLE_GROUPS = ("posterior", "posterior_predictive", "log_likelihood", "sample_stats")
"""Groups whose variables carry the ``chain`` and ``draw`` dims."""


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _group_dict(group: Mapping[str, Any] | None, name: str) -> dict[str, np.ndarray] | None:
    if group is None:
        return None
    if not isinstance(group, Mapping):
        raise TypeError(f"{name} must be a mapping of variable names to arrays")
    out = {}
    for var, value in group.items():
        arr = _to_numpy(value)
        if name in SAMPLE_GROUPS and arr.ndim < 2:
            raise ValueError(f"{name}[{var!r}] must have shape (chain, draw, ...), got {arr.shape}")
        out[str(var)] = arr
    return out


def _split_coords(coords: Mapping[str, Any] | None) -> tuple[dict, dict]:
    """Index coordinates ``{dim: values}`` and auxiliary ones ``{name: (dim, values)}``."""
    index, auxiliary = {}, {}
    for name, value in (coords or {}).items():
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
            auxiliary[name] = (value[0], np.asarray(value[1]))
        else:
            index[name] = np.asarray(value)
    return index, auxiliary


def _data_dataset(
    group: Mapping[str, np.ndarray], dims: Mapping[str, Any], index_coords: Mapping[str, Any]
) -> xr.Dataset:
    """A group without sample dims (observed or constant data)."""
    variables = {}
    for name, arr in group.items():
        var_dims = list(dims.get(name, [f"{name}_dim_{i}" for i in range(arr.ndim)]))
        if len(var_dims) != arr.ndim:
            raise ValueError(f"dims[{name!r}] = {var_dims} does not match shape {arr.shape}")
        variables[name] = (var_dims, arr)
    ds = xr.Dataset(variables)
    used = {d: index_coords[d] for d in ds.dims if d in index_coords}
    return ds.assign_coords(used)


def _finish(
    ds: xr.Dataset,
    auxiliary: Mapping[str, tuple[str, np.ndarray]],
    var_attrs: Mapping[str, Mapping[str, Any]],
    attrs: Mapping[str, Any],
) -> xr.Dataset:
    extra = {k: v for k, v in auxiliary.items() if v[0] in ds.dims}
    if extra:
        ds = ds.assign_coords(extra)
    for name, var in ds.data_vars.items():
        if name in var_attrs:
            var.attrs.update(var_attrs[name])
    ds.attrs.update(attrs)
    return ds


def field_summary_from_moments(
    summary: Mapping[str, Any], *, x: Any, y: Any, attrs: Mapping[str, Any] | None = None
) -> xr.Dataset:
    """The ``field_summary`` group: per-node posterior moments of the field.

    Parameters
    ----------
    summary : mapping of str to array, each shape ``(ny, nx)``
        E.g. ``{"field_mean": ..., "field_sd": ...}``; row ``i`` is the node row at ``y[i]``.
    x : array-like, shape ``(nx,)``
        Node x coordinates.
    y : array-like, shape ``(ny,)``
        Node y coordinates.
    attrs : mapping, optional
        Group attributes.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    variables = {}
    for name, value in summary.items():
        arr = _to_numpy(value)
        if arr.shape != (y.size, x.size):
            raise ValueError(
                f"summary[{name!r}] must have shape ({y.size}, {x.size}) = (len(y), len(x)), "
                f"got {arr.shape}"
            )
        variables[name] = (("y", "x"), arr)
    ds = xr.Dataset(variables, coords={"x": ("x", x), "y": ("y", y)}, attrs=dict(attrs or {}))
    descriptions = {
        "field_mean": "posterior mean of the field at the mesh nodes",
        "field_sd": "posterior standard deviation of the field at the mesh nodes",
    }
    for name, text in descriptions.items():
        if name in ds:
            ds[name].attrs["long_name"] = text
    return ds


def to_arviz(
    samples: Mapping[str, Any],
    *,
    posterior_predictive: Mapping[str, Any] | None = None,
    observed_data: Mapping[str, Any] | None = None,
    log_likelihood: Mapping[str, Any] | None = None,
    sample_stats: Mapping[str, Any] | None = None,
    constant_data: Mapping[str, Any] | None = None,
    coords: Mapping[str, Any] | None = None,
    dims: Mapping[str, list[str]] | None = None,
    var_attrs: Mapping[str, Mapping[str, Any]] | None = None,
    attrs: Mapping[str, Any] | None = None,
    field_summary: xr.Dataset | None = None,
) -> Any:
    """Build ArviZ data from posterior arrays.

    Parameters
    ----------
    samples : mapping of str to array, each shape ``(chain, draw, *event)``
        Posterior draws (tensors or arrays).
    posterior_predictive, log_likelihood, sample_stats : mapping, optional
        Variables with shape ``(chain, draw, ...)``.
    observed_data, constant_data : mapping, optional
        Variables without sample dims (scalars allowed).
    coords : mapping, optional
        ``{dim: values}`` index coordinates, or ``{name: (dim, values)}`` for a non-index
        coordinate along ``dim`` (e.g. ``"aux_units": ("aux", ["", "Msun"])``).
    dims : mapping of str to list of str, optional
        Event dims of each variable, in every group it appears in.
    var_attrs : mapping of str to mapping, optional
        Attributes of each variable, in every group it appears in (units, long names).
    attrs : mapping, optional
        Attributes added to every group (e.g. ``inference_method``).
    field_summary : xarray.Dataset, optional
        The ``field_summary`` group (see :func:`field_summary_from_moments`).

    Returns
    -------
    arviz.InferenceData (arviz 0.x) or xarray.DataTree (arviz >= 1)
    """
    posterior = _group_dict(samples, "posterior")
    if not posterior:
        raise ValueError("samples must hold at least one posterior variable")
    sample_groups = {
        "posterior": posterior,
        "posterior_predictive": _group_dict(posterior_predictive, "posterior_predictive"),
        "log_likelihood": _group_dict(log_likelihood, "log_likelihood"),
        "sample_stats": _group_dict(sample_stats, "sample_stats"),
    }
    sample_groups = {k: v for k, v in sample_groups.items() if v}
    shapes = {arr.shape[:2] for group in sample_groups.values() for arr in group.values()}
    if len(shapes) != 1:
        raise ValueError(f"all sample groups must share (chain, draw), got {sorted(shapes)}")
    index_coords, auxiliary = _split_coords(coords)
    dims = {k: list(v) for k, v in (dims or {}).items()}
    event_dims = {d for group in sample_groups.values() for v in group for d in dims.get(v, [])}
    from_dict_coords = {k: v for k, v in index_coords.items() if k in event_dims}
    if ARVIZ_MAJOR >= 1:
        tree = az.from_dict(sample_groups, coords=from_dict_coords, dims=dims)
        groups = {name: node.to_dataset() for name, node in tree.children.items()}
    else:
        idata = az.from_dict(**sample_groups, coords=from_dict_coords, dims=dims)
        groups = {name: idata[name] for name in idata.groups()}
    for name, data in (
        ("observed_data", _group_dict(observed_data, "observed_data")),
        ("constant_data", _group_dict(constant_data, "constant_data")),
    ):
        if data:
            groups[name] = _data_dataset(data, dims, index_coords)
    if field_summary is not None:
        if not isinstance(field_summary, xr.Dataset):
            raise TypeError("field_summary must be an xarray.Dataset")
        groups["field_summary"] = field_summary
    var_attrs = var_attrs or {}
    attrs = dict(attrs or {})
    groups = {k: _finish(ds, auxiliary, var_attrs, attrs) for k, ds in groups.items()}
    if ARVIZ_MAJOR >= 1:
        return xr.DataTree.from_dict(groups)
    return az.InferenceData(**groups)


def save_netcdf(data: Any, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """Write ArviZ data to a netCDF file atomically (temporary file, then rename).

    An interrupted write leaves any previous file at ``path`` intact.

    Parameters
    ----------
    data : arviz.InferenceData or xarray.DataTree
    path : path-like
        Destination (``.nc``).
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    pathlib.Path
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"path {str(path)!r} exists; pass overwrite=True to replace it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"directory {str(path.parent)!r} does not exist")
    if not (isinstance(data, xr.DataTree) or hasattr(data, "to_netcdf")):
        raise TypeError(f"data must be InferenceData or DataTree, got {type(data).__name__}")
    return atomic_write(path, lambda tmp: data.to_netcdf(tmp, engine="h5netcdf"))


def load_netcdf(path: str | os.PathLike) -> Any:
    """Read ArviZ data written by :func:`save_netcdf`, fully into memory.

    Returns
    -------
    arviz.InferenceData (arviz 0.x) or xarray.DataTree (arviz >= 1)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"posterior file {str(path)!r} does not exist")
    try:
        if ARVIZ_MAJOR >= 1:
            with xr.open_datatree(path, engine="h5netcdf") as tree:
                return tree.load().copy()
        return az.from_netcdf(path, engine="h5netcdf")
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{str(path)!r} is not a readable netCDF posterior file: {err}") from err
