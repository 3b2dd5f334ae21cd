"""Tests for building, validating, saving and loading datasets."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from pyro_dlatent.data import aux_array, from_arrays, load, make_scaler, save, split


def _dataset(n=12, size=8, seed=0):
    rng = np.random.default_rng(seed)
    mass = 10 ** rng.uniform(13, 15, n)
    conc = rng.normal(4, 1, n)
    conc[3] = np.nan
    return from_arrays(
        rng.normal(size=(n, size, size)),
        {"mass": mass, "concentration": conc},
        units={"mass": "Msun"},
        transforms={"mass": "log10"},
        extra={"flag": np.arange(n) % 2 == 0},
        attrs={"simulator": "test"},
    )


def test_from_arrays_layout():
    ds = _dataset()
    assert ds["image"].dims == ("sample", "y", "x")
    assert ds.attrs["aux_names"] == ["mass", "concentration"]
    assert ds["mass"].attrs["units"] == "Msun"
    assert ds["mass"].attrs["transform"] == "log10"
    assert "flag" in ds and "flag" not in ds.attrs["aux_names"]
    arr = aux_array(ds)
    assert arr.shape == (12, 2) and np.isnan(arr[3, 1])


@pytest.mark.parametrize("suffix", [".nc", ".zarr"])
def test_round_trip(tmp_path, suffix):
    ds = _dataset()
    path = save(ds, tmp_path / f"data{suffix}")
    back = load(path)
    assert back.attrs["aux_names"] == ds.attrs["aux_names"]
    np.testing.assert_array_equal(back["image"].values, ds["image"].values)
    np.testing.assert_array_equal(back["mass"].values, ds["mass"].values)
    assert back["mass"].attrs["units"] == "Msun"
    lazy = load(path, chunks={"sample": 4})
    assert lazy["image"].chunks is not None
    np.testing.assert_array_equal(lazy["image"].values, ds["image"].values)


def test_save_never_overwrites_by_default(tmp_path):
    ds = _dataset()
    path = save(ds, tmp_path / "data.nc")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        save(_dataset(seed=1), path)
    assert path.read_bytes() == before
    save(_dataset(seed=1), path, overwrite=True)
    assert not np.array_equal(load(path)["image"].values, ds["image"].values)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.nc"]


def test_scaler_from_dataset():
    scaler = make_scaler(_dataset())
    assert scaler.names == ["mass", "concentration"]
    assert scaler.transforms == ["log10", "identity"]
    assert scaler.units == ["Msun", ""]
    assert scaler.fitted


def test_split_is_disjoint_and_seeded():
    ds = _dataset(n=40)
    train, held = split(ds, 0.25, seed=3)
    assert train.sizes["sample"] == 30 and held.sizes["sample"] == 10
    train2, _ = split(ds, 0.25, seed=3)
    np.testing.assert_array_equal(train["image"].values, train2["image"].values)


@pytest.mark.parametrize(
    ("images", "aux", "match", "error"),
    [
        (np.zeros((0, 4, 4)), {"a": []}, "images", ValueError),
        (np.zeros((3, 4)), {"a": [1, 2, 3]}, "images", ValueError),
        (np.full((3, 4, 4), np.nan), {"a": [1, 2, 3]}, "images", ValueError),
        (np.array([[["a"]]]), {"a": [1]}, "images", TypeError),
        (np.zeros((3, 4, 4)), {"a": [1, 2]}, "aux\\['a'\\]", ValueError),
        (np.zeros((3, 4, 4)), {"a": [1, np.inf, 2]}, "aux\\['a'\\]", ValueError),
        (np.zeros((3, 4, 4)), {"a": [np.nan] * 3}, "aux\\['a'\\]", ValueError),
        (np.zeros((3, 4, 4)), {}, "aux", ValueError),
        (np.zeros((3, 4, 4)), {"a": ["x", "y", "z"]}, "aux\\['a'\\]", TypeError),
        # finite in float64 but not in the float32 the images are stored in
        (np.full((3, 4, 4), 1e39), {"a": [1, 2, 3]}, "float32", ValueError),
        # a complex auxiliary would lose its imaginary part
        (np.zeros((3, 4, 4)), {"a": [1 + 1j, 2, 3]}, "real numbers", TypeError),
        # an auxiliary named like the dataset's own variables would replace them
        (np.zeros((3, 4, 4)), {"image": [1, 2, 3]}, "'image' is taken", ValueError),
        (np.zeros((3, 4, 4)), {"x": [1, 2, 3]}, "'x' is taken", ValueError),
        (np.zeros((3, 4, 4)), {"": [1, 2, 3]}, "non-empty strings", ValueError),
    ],
)
def test_from_arrays_rejects_bad_input(images, aux, match, error):
    with pytest.raises(error, match=match):
        from_arrays(images, aux)


def test_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="must end in"):
        save(_dataset(), tmp_path / "data.txt")
    with pytest.raises(ValueError, match="does not exist"):
        load(tmp_path / "missing.nc")
    garbage = tmp_path / "garbage.nc"
    garbage.write_bytes(b"not a netcdf file")
    with pytest.raises(ValueError, match=r"garbage\.nc"):
        load(garbage)
    foreign = tmp_path / "foreign.nc"
    xr.Dataset({"a": ("t", np.arange(3.0))}).to_netcdf(foreign, engine="h5netcdf")
    with pytest.raises(ValueError, match="image"):
        load(foreign)


def test_extra_names_cannot_collide_with_auxiliaries_or_the_images():
    images = np.zeros((3, 4, 4))
    with pytest.raises(ValueError, match="extra name 'a' is taken"):
        from_arrays(images, {"a": [1, 2, 3]}, extra={"a": [0, 0, 0]})
    with pytest.raises(ValueError, match="extra name 'image' is taken"):
        from_arrays(images, {"a": [1, 2, 3]}, extra={"image": [0, 0, 0]})
    ds = from_arrays(images + 1, {"a": [1, 2, 3], "b": [4, 5, 6]}, extra={"flag": [0, 1, 0]})
    np.testing.assert_array_equal(ds["image"].values, images + 1)  # images kept as given
