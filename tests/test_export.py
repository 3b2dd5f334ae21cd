"""ArviZ export: groups, dims and coords, netCDF round trip, ArviZ functions on the result."""

from __future__ import annotations

import os

import arviz as az
import matplotlib
import numpy as np
import pytest
import torch
import xarray as xr

from pyro_dlatent.export import (
    ARVIZ_MAJOR,
    field_summary_from_moments,
    load_netcdf,
    save_netcdf,
    to_arviz,
)

matplotlib.use("Agg")


def _groups(data) -> list[str]:
    return list(data.groups()) if ARVIZ_MAJOR < 1 else list(data.children)


@pytest.fixture()
def idata():
    rng = np.random.default_rng(0)
    chains, draws, sensors = 2, 50, 4
    posterior = {
        "u": torch.as_tensor(rng.normal(size=(chains, draws, 2))),
        "z_aux": rng.normal(size=(chains, draws, 2)),
        "z_rec": rng.normal(size=(chains, draws, 3)),
    }
    stats = {
        "diverging": np.zeros((chains, draws), dtype=bool),
        "step_size": np.full((chains, draws), 0.3),
        "tree_depth": rng.integers(1, 4, size=(chains, draws)),
        "energy": rng.normal(10.0, 1.0, size=(chains, draws)),
        "acceptance_rate": rng.uniform(0.5, 1.0, size=(chains, draws)),
    }
    x = np.linspace(0.0, 1.0, 5)
    y = np.linspace(0.0, 2.0, 3)
    summary = field_summary_from_moments(
        {"field_mean": rng.normal(size=(3, 5)), "field_sd": rng.uniform(size=(3, 5))}, x=x, y=y
    )
    return to_arviz(
        posterior,
        posterior_predictive={"obs": rng.normal(size=(chains, draws, sensors))},
        log_likelihood={"obs": rng.normal(size=(chains, draws, sensors))},
        observed_data={"obs": rng.normal(size=sensors)},
        sample_stats=stats,
        constant_data={
            "noise_sd": np.float64(0.1),
            "sensor_x": rng.uniform(size=sensors),
            "sensor_y": rng.uniform(size=sensors),
        },
        coords={
            "aux": ["x0", "log_amplitude"],
            "aux_units": ("aux", ["m", "dex"]),
            "rec": [0, 1, 2],
            "sensor": np.arange(sensors),
            "x": x,
            "y": y,
        },
        dims={
            "u": ["aux"],
            "z_aux": ["aux"],
            "z_rec": ["rec"],
            "obs": ["sensor"],
            "sensor_x": ["sensor"],
            "sensor_y": ["sensor"],
        },
        var_attrs={"u": {"long_name": "auxiliaries"}},
        attrs={"inference_method": "nuts"},
        field_summary=summary,
    )


def test_groups_dims_and_coords(idata):
    assert _groups(idata) == [
        "posterior",
        "posterior_predictive",
        "log_likelihood",
        "sample_stats",
        "observed_data",
        "constant_data",
        "field_summary",
    ]
    posterior = idata["posterior"]
    assert posterior["u"].dims == ("chain", "draw", "aux")
    assert list(posterior["aux"].values) == ["x0", "log_amplitude"]
    assert list(posterior["aux_units"].values) == ["m", "dex"]
    assert posterior["z_rec"].dims == ("chain", "draw", "rec")
    assert posterior["u"].attrs["long_name"] == "auxiliaries"
    assert posterior.attrs["inference_method"] == "nuts"
    assert idata["log_likelihood"]["obs"].dims == ("chain", "draw", "sensor")
    assert idata["observed_data"]["obs"].dims == ("sensor",)
    constant = idata["constant_data"]
    assert constant["noise_sd"].dims == () and constant["sensor_x"].dims == ("sensor",)
    summary = idata["field_summary"]
    assert summary["field_mean"].dims == ("y", "x")
    assert np.allclose(summary["y"].values, [0.0, 1.0, 2.0])
    assert "chain" not in summary.dims


def test_netcdf_round_trip_is_identical(idata, tmp_path):
    path = save_netcdf(idata, tmp_path / "posterior.nc")
    assert os.listdir(tmp_path) == ["posterior.nc"]
    loaded = load_netcdf(path)
    assert _groups(loaded) == _groups(idata)
    for group in _groups(idata):
        xr.testing.assert_identical(loaded[group], idata[group])


def test_save_is_atomic_and_respects_overwrite(idata, tmp_path):
    path = tmp_path / "posterior.nc"
    path.write_text("previous")
    with pytest.raises(FileExistsError):
        save_netcdf(idata, path, overwrite=False)
    assert path.read_text() == "previous"

    class Exploding:
        def to_netcdf(self, *args, **kwargs):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_netcdf(Exploding(), path)
    assert path.read_text() == "previous"
    assert sorted(os.listdir(tmp_path)) == ["posterior.nc"]


def test_load_reports_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.nc"):
        load_netcdf(tmp_path / "missing.nc")
    bad = tmp_path / "bad.nc"
    bad.write_bytes(b"not a netCDF file at all")
    with pytest.raises(ValueError, match=r"bad\.nc"):
        load_netcdf(bad)


def test_arviz_functions_run_unchanged(idata):
    summary = az.summary(idata)
    assert list(summary.index[:2]) == ["u[x0]", "u[log_amplitude]"]
    assert len(summary) == 7
    ess = az.ess(idata)
    rhat = az.rhat(idata)
    assert set(ess.data_vars) == set(rhat.data_vars) == {"u", "z_aux", "z_rec"}
    assert np.all(np.isfinite(rhat["u"].values))
    axes = az.plot_trace(idata, var_names=["u"], compact=False)
    assert axes.shape == (2, 2)
    matplotlib.pyplot.close("all")
    az.plot_rank(idata, var_names=["z_rec"])
    matplotlib.pyplot.close("all")


def test_datatree_bridge(idata):
    if ARVIZ_MAJOR >= 1:
        tree = idata
    else:
        tree = idata.to_datatree()
    assert isinstance(tree, xr.DataTree)
    assert tree["posterior"]["u"].dims == ("chain", "draw", "aux")
    assert "field_summary" in tree.children


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"samples": {}}, ValueError, "at least one"),
        ({"samples": {"u": np.zeros(3)}}, ValueError, "chain, draw"),
        (
            {"samples": {"u": np.zeros((2, 5))}, "log_likelihood": {"obs": np.zeros((2, 4, 3))}},
            ValueError,
            "share",
        ),
        ({"samples": [1, 2]}, TypeError, "mapping"),
        ({"samples": {"u": np.zeros((1, 2))}, "field_summary": {"a": 1}}, TypeError, "Dataset"),
        (
            {
                "samples": {"u": np.zeros((1, 2))},
                "constant_data": {"s": np.zeros(3)},
                "dims": {"s": ["a", "b"]},
            },
            ValueError,
            "dims",
        ),
    ],
)
def test_bad_input_is_rejected(kwargs, error, message):
    samples = kwargs.pop("samples")
    with pytest.raises(error, match=message):
        to_arviz(samples, **kwargs)


def test_field_summary_checks_shapes():
    with pytest.raises(ValueError, match="shape"):
        field_summary_from_moments({"field_mean": np.zeros((3, 4))}, x=np.arange(3), y=np.arange(4))
