"""Tests for chunk-by-chunk simulation, one-pass statistics and the shuffled minibatch stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pyro_dlatent.data import (
    from_arrays,
    galaxies,
    halos,
    load,
    make_scaler,
    save,
    simulate,
    simulate_to,
    split,
)
from pyro_dlatent.data import stream as stream_module
from pyro_dlatent.data.stream import (
    Batch,
    MinibatchStream,
    StandardizeAux,
    StandardizedBatch,
    fit_statistics,
)
from pyro_dlatent.models.auxvae import AuxVAE, _pixel_moments

NUM = 203  # odd, not a multiple of the chunk or batch sizes below
CHUNK = 16


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A ``sources`` zarr store of NUM 8x8 images in chunks of CHUNK samples."""
    path = tmp_path_factory.mktemp("stream") / "sources.zarr"
    return simulate_to(path, "sources", NUM, size=8, seed=5, chunk_size=CHUNK)


def _with_missing(n=90, size=8, seed=0):
    """A dataset with a log10-transformed auxiliary and missing values."""
    rng = np.random.default_rng(seed)
    conc = rng.normal(4.0, 1.0, n)
    conc[[3, 40, 41]] = np.nan
    return from_arrays(
        rng.normal(2.0, 3.0, size=(n, size, size)),
        {"mass": 10 ** rng.uniform(13, 15, n), "concentration": conc},
        units={"mass": "Msun"},
        transforms={"mass": "log10"},
    )


def _indices(stream, num_workers=0, **loader_kwargs):
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers, **loader_kwargs)
    return [batch.index for batch in loader]


# ---------------------------------------------------------------- chunked simulation


@pytest.mark.parametrize(
    ("name", "num", "chunk_size", "kwargs"),
    [
        ("sources", 50, 7, {}),
        ("halos", 30, 11, {"oversample": 1, "disturbed_fraction": 0.5}),
        ("galaxies", 20, 6, {"noise_sd": 3.0}),
    ],
)
def test_simulate_to_holds_the_in_memory_dataset(tmp_path, name, num, chunk_size, kwargs):
    path = simulate_to(tmp_path / "data.zarr", name, num, size=8, seed=2, chunk_size=chunk_size)
    path = simulate_to(
        tmp_path / "data.zarr",
        name,
        num,
        size=8,
        seed=2,
        chunk_size=chunk_size,
        overwrite=True,
        **kwargs,
    )
    written = load(path)
    expected = simulate(name, num, size=8, seed=2, **kwargs)
    assert written.identical(expected)
    assert written["image"].encoding["chunks"] == (chunk_size, 8, 8)
    assert [p.name for p in tmp_path.iterdir()] == ["data.zarr"]  # no temporary left


def test_simulate_to_is_exact_across_render_blocks(tmp_path, monkeypatch):
    # blocks of 3 images: chunks of 2 and 7 cut across them, in both directions
    from pyro_dlatent.data import sources

    monkeypatch.setattr(sources, "_CHUNK_ELEMENTS", 3 * 8 * 8)
    expected = simulate("sources", 20, size=8, seed=1)
    for chunk_size in (2, 7, 20, 64):
        path = simulate_to(
            tmp_path / f"c{chunk_size}.zarr", "sources", 20, 8, 1, chunk_size=chunk_size
        )
        assert load(path).identical(expected), chunk_size


@pytest.mark.parametrize(
    ("module", "name", "kwargs"),
    [
        (halos, "halos", {"oversample": 1, "disturbed_fraction": 0.5}),
        (galaxies, "galaxies", {"noise_sd": 3.0}),
    ],
)
def test_images_do_not_depend_on_the_render_block(monkeypatch, module, name, kwargs):
    expected = simulate(name, 13, size=8, seed=4, **kwargs)
    monkeypatch.setattr(module, "_CHUNK_ELEMENTS", 4 * 8 * 8)
    assert simulate(name, 13, size=8, seed=4, **kwargs).identical(expected)


def test_simulate_to_keeps_an_existing_store(tmp_path):
    path = simulate_to(tmp_path / "data.zarr", "sources", 10, size=8, seed=0)
    with pytest.raises(FileExistsError, match="overwrite"):
        simulate_to(path, "sources", 10, size=8, seed=1)
    assert load(path).identical(simulate("sources", 10, size=8, seed=0))
    simulate_to(path, "sources", 10, size=8, seed=1, overwrite=True)
    assert load(path).identical(simulate("sources", 10, size=8, seed=1))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"path": "data.nc"}, "path must end in .zarr"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"chunk_size": 2.5}, "chunk_size"),
        ({"name": "nope"}, "name must be one of"),
        ({"num": 0}, "num"),
        ({"size": 4}, "size"),
        ({"seed": -1}, "seed"),
        ({"residual_sd": -1.0}, "residual_sd"),
    ],
)
def test_simulate_to_bad_arguments(tmp_path, kwargs, match):
    args = {"path": "data.zarr", "name": "sources", "num": 10, "size": 8, "seed": 0, **kwargs}
    args["path"] = tmp_path / args["path"]
    with pytest.raises(ValueError, match=match):
        simulate_to(**args)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary left


# ---------------------------------------------------------------- one-pass statistics


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 1000])
def test_fit_statistics_equal_in_memory(tmp_path, chunk_size):
    ds = _with_missing()
    path = save(ds.chunk({"sample": 16}), tmp_path / "data.zarr")
    stats = fit_statistics(path, chunk_size=chunk_size)
    scaler = make_scaler(ds)
    assert stats.num_samples == ds.sizes["sample"]
    assert stats.scaler.names == scaler.names
    assert stats.scaler.units == scaler.units and stats.scaler.transforms == scaler.transforms
    np.testing.assert_allclose(stats.scaler.mean, scaler.mean, rtol=1e-13)
    np.testing.assert_allclose(stats.scaler.std, scaler.std, rtol=1e-13)
    loc, scale = _pixel_moments(ds["image"])
    np.testing.assert_allclose([stats.image_loc, stats.image_scale], [loc, scale], rtol=1e-13)


def test_fit_statistics_of_netcdf_and_of_a_lazy_dataset(tmp_path, store):
    ds = load(store)
    expected = fit_statistics(ds)
    path = save(ds, tmp_path / "data.nc")
    for source in (store, path, load(store, chunks={"sample": 32})):
        stats = fit_statistics(source)
        np.testing.assert_allclose(stats.scaler.mean, expected.scaler.mean, rtol=1e-13)
        np.testing.assert_allclose(stats.scaler.std, expected.scaler.std, rtol=1e-13)
        np.testing.assert_allclose(stats.image_scale, expected.image_scale, rtol=1e-13)


def test_fit_statistics_errors():
    ds = _with_missing()
    constant = ds.assign(concentration=ds["concentration"] * 0 + 4.0)
    with pytest.raises(ValueError, match=r"\['concentration'\] are constant"):
        fit_statistics(constant)
    lonely = ds.assign(concentration=ds["concentration"].where(ds["sample"] == 0))
    with pytest.raises(ValueError, match=r"two observed values.*\['concentration'\]"):
        fit_statistics(lonely)
    negative = ds.assign(mass=-ds["mass"])
    with pytest.raises(ValueError, match="'mass' uses a log10 transform"):
        fit_statistics(negative)
    with pytest.raises(ValueError, match=r"image.*constant"):
        fit_statistics(ds.assign(image=ds["image"] * 0))
    with pytest.raises(TypeError, match="source must be a path or an xarray"):
        fit_statistics(np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match="chunk_size"):
        fit_statistics(ds, chunk_size=0)


# ---------------------------------------------------------------- the minibatch stream


def test_batches_hold_the_stored_samples(store):
    ds = load(store)
    stream = MinibatchStream(store, 10, seed=3)
    batches = list(DataLoader(stream, batch_size=None))
    assert all(isinstance(b, Batch) for b in batches)
    index = np.concatenate([b.index for b in batches])
    np.testing.assert_array_equal(np.sort(index), np.arange(NUM))
    assert not np.array_equal(index, np.arange(NUM))  # shuffled
    for batch in batches[:3]:
        assert batch.images.dtype == np.float32 and batch.aux.dtype == np.float64
        assert batch.index.dtype == np.int64
        np.testing.assert_array_equal(batch.images, ds["image"].values[batch.index])
        expected = np.stack([ds[n].values[batch.index] for n in ds.attrs["aux_names"]], -1)
        np.testing.assert_array_equal(batch.aux, expected)


@pytest.mark.parametrize(
    ("num", "chunk", "batch", "world_size", "num_workers", "buffer"),
    [
        (NUM, CHUNK, 10, 2, 2, 4),
        (NUM, CHUNK, 10, 3, 1, 1),
        (100, 100, 7, 2, 3, 2),  # one chunk for everyone
        (50, 3, 64, 1, 4, 2),  # one batch: three workers idle
        (37, 5, 2, 4, 2, 3),
        (1000, 64, 32, 4, 3, 2),
    ],
)
def test_plan_draws_every_sample_once(num, chunk, batch, world_size, num_workers, buffer):
    ds = from_arrays(np.zeros((num, 2, 2)), {"u": np.arange(num, dtype=float)})
    taken = []
    steps = []
    for rank in range(world_size):
        stream = MinibatchStream(
            ds, batch, chunk_size=chunk, rank=rank, world_size=world_size, buffer_chunks=buffer
        )
        rank_sizes = []
        for worker in range(num_workers):
            pieces, sizes = stream.plan(3, worker=worker, num_workers=num_workers)
            assert sum(b - a for a, b in pieces) == sum(sizes)
            assert all(a // chunk == (b - 1) // chunk for a, b in pieces)  # within one chunk
            taken.extend(i for a, b in pieces for i in range(a, b))
            rank_sizes.extend(sizes)
        assert max(rank_sizes) <= batch and max(rank_sizes) - min(rank_sizes) <= 1
        steps.append(len(rank_sizes))
        assert len(rank_sizes) == len(stream)
    np.testing.assert_array_equal(np.sort(taken), np.arange(num))
    assert len(set(steps)) == 1  # every rank makes the same number of steps


def test_two_ranks_of_two_workers_draw_every_sample_once(store):
    per_rank = []
    for rank in range(2):
        stream = MinibatchStream(store, 10, seed=1, rank=rank, world_size=2)
        batches = _indices(stream, num_workers=2)
        assert len(batches) == len(stream)
        assert all(9 <= len(b) <= 10 for b in batches)
        per_rank.append(np.concatenate(batches))
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= len(per_rank[0]) // 10
    everything = np.concatenate(per_rank)
    np.testing.assert_array_equal(np.sort(everything), np.arange(NUM))


def test_order_is_a_function_of_seed_and_epoch(store):
    def order(seed, epoch, num_workers=0):
        stream = MinibatchStream(store, 10, seed=seed)
        stream.set_epoch(epoch)
        return np.concatenate(_indices(stream, num_workers=num_workers))

    first = order(0, 0)
    np.testing.assert_array_equal(first, order(0, 0))
    np.testing.assert_array_equal(order(0, 1, num_workers=2), order(0, 1, num_workers=2))
    assert not np.array_equal(first, order(0, 1))
    assert not np.array_equal(first, order(1, 0))
    # chunks are drawn in a new order each epoch, not only reshuffled inside a buffer
    stream = MinibatchStream(store, 10, seed=0)
    assert stream.plan(0)[0] != stream.plan(1)[0]


def test_persistent_workers_see_set_epoch(store):
    def fresh(epoch):
        stream = MinibatchStream(store, 10, seed=2)
        stream.set_epoch(epoch)
        return _indices(stream, num_workers=2)

    stream = MinibatchStream(store, 10, seed=2)
    loader = DataLoader(stream, batch_size=None, num_workers=2, persistent_workers=True)
    epochs = []
    for epoch in range(2):
        stream.set_epoch(epoch)
        epochs.append([b.index for b in loader])
    for epoch, batches in enumerate(epochs):
        np.testing.assert_array_equal(np.concatenate(batches), np.concatenate(fresh(epoch)))
    assert not np.array_equal(np.concatenate(epochs[0]), np.concatenate(epochs[1]))


def test_unshuffled_stream_reads_in_storage_order(store):
    stream = MinibatchStream(store, 10, shuffle=False)
    np.testing.assert_array_equal(np.concatenate(_indices(stream)), np.arange(NUM))


def test_netcdf_source_with_workers(tmp_path, store):
    path = save(load(store), tmp_path / "data.nc")
    stream = MinibatchStream(path, 10, seed=0, chunk_size=CHUNK)
    index = np.concatenate(_indices(stream, num_workers=2))
    np.testing.assert_array_equal(np.sort(index), np.arange(NUM))
    np.testing.assert_array_equal(
        index, np.concatenate(_indices(MinibatchStream(store, 10, seed=0), num_workers=2))
    )


def test_a_lazy_split_part_streams_its_own_samples(store):
    train, _ = split(load(store, chunks={"sample": CHUNK}), 0.2, seed=0)
    expected, _ = split(load(store), 0.2, seed=0)
    assert float(train["image"].sum().compute()) != 0.0  # dask's thread pool is now running
    stream = MinibatchStream(train, 25, seed=0)  # and is not used by forked workers
    batches = list(DataLoader(stream, batch_size=None, num_workers=2, timeout=60))
    index = np.concatenate([b.index for b in batches])
    np.testing.assert_array_equal(np.sort(index), np.arange(train.sizes["sample"]))
    for batch in batches[:2]:
        np.testing.assert_array_equal(batch.images, expected["image"].values[batch.index])


def test_standardize_aux_matches_prepare(tmp_path):
    ds = _with_missing(size=16)
    path = save(ds, tmp_path / "data.zarr")
    # the model's auxiliary order need not be the file's
    names = list(reversed(ds.attrs["aux_names"]))
    model = AuxVAE.from_dataset(ds.assign_attrs(aux_names=names), residual_dim=2)
    assert model.scaler.names == names
    prepared = model.prepare(ds)
    stream = MinibatchStream(
        path, 16, seed=0, aux_names=model.scaler.names, transform=StandardizeAux(model.scaler)
    )
    masked = 0
    for batch in DataLoader(stream, batch_size=None, num_workers=2):
        assert isinstance(batch, StandardizedBatch)
        index = torch.from_numpy(batch.index)
        images, aux, mask = batch.tensors()
        assert torch.equal(images, prepared.images[index])
        assert torch.equal(aux, prepared.aux[index])
        if mask is None:
            assert prepared.mask[index].all()
        else:
            masked += 1
            assert torch.equal(mask, prepared.mask[index])
    assert masked >= 1


def test_stream_matches_fit_statistics_scaler(store):
    stats = fit_statistics(store)
    transform = StandardizeAux(stats.scaler)
    stream = MinibatchStream(store, 64, transform=transform, shuffle=False)
    aux = np.concatenate([b.aux for b in DataLoader(stream, batch_size=None)]).astype(np.float64)
    # standardized over the whole dataset: mean 0 and sd 1 in every column
    np.testing.assert_allclose(aux.mean(0), 0.0, atol=1e-6)
    np.testing.assert_allclose(aux.std(0), 1.0, atol=1e-6)


def test_auxiliaries_read_chunk_by_chunk_equal_those_held_whole(store, monkeypatch):
    def batches(num_workers):
        stream = MinibatchStream(store, 10, seed=4)
        return list(DataLoader(stream, batch_size=None, num_workers=num_workers))

    held = {num_workers: batches(num_workers) for num_workers in (0, 2)}
    monkeypatch.setattr(stream_module, "_AUX_BYTES", 0)
    for num_workers in (0, 2):
        for a, b in zip(held[num_workers], batches(num_workers), strict=True):
            np.testing.assert_array_equal(a.index, b.index)
            np.testing.assert_array_equal(a.aux, b.aux)
            np.testing.assert_array_equal(a.images, b.images)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"batch_size": 2.0}, ValueError, "batch_size"),
        ({"seed": -1}, ValueError, "seed"),
        ({"buffer_chunks": 0}, ValueError, "buffer_chunks"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"world_size": 0}, ValueError, "world_size"),
        ({"rank": 2, "world_size": 2}, ValueError, "rank < world_size=2"),
        ({"rank": -1}, ValueError, "rank"),
        ({"shuffle": "yes"}, TypeError, "shuffle"),
        ({"transform": "standardize"}, TypeError, "transform must be callable"),
        ({"aux_names": ["x0", "y0"]}, ValueError, "aux_names"),
        ({"batch_size": 1, "world_size": 3}, ValueError, "world_size=3"),
    ],
)
def test_stream_bad_arguments(kwargs, error, match):
    ds = from_arrays(np.random.default_rng(0).normal(size=(11, 8, 8)), {"u": np.arange(11.0)})
    args = {"batch_size": 4, **kwargs}
    with pytest.raises(error, match=match):
        MinibatchStream(ds, **args)


def test_stream_bad_sources_and_epochs(tmp_path):
    with pytest.raises(TypeError, match="source must be a path or an xarray"):
        MinibatchStream(np.zeros((4, 8, 8)), 2)
    with pytest.raises(ValueError, match="does not exist"):
        MinibatchStream(tmp_path / "missing.zarr", 2)
    with pytest.raises(ValueError, match="must end in"):
        MinibatchStream(tmp_path / "data.h5", 2)
    stream = MinibatchStream(simulate("sources", 11, size=8), 4)
    with pytest.raises(ValueError, match="epoch"):
        stream.set_epoch(-1)
    with pytest.raises(ValueError, match="worker < num_workers=2"):
        stream.plan(0, worker=2, num_workers=2)
    with pytest.raises(TypeError, match="AuxScaler"):
        StandardizeAux({"u": (0.0, 1.0)})
    with pytest.raises(ValueError, match="not fitted"):
        StandardizeAux(make_scaler(simulate("sources", 11, size=8), fit=False))


@pytest.mark.slow
def test_spawned_workers(store):
    transform = StandardizeAux(fit_statistics(store).scaler)
    stream = MinibatchStream(store, 10, seed=0, transform=transform)
    stream.set_epoch(1)
    loader = DataLoader(stream, batch_size=None, num_workers=2, multiprocessing_context="spawn")
    index = np.concatenate([b.index for b in loader])
    expected = MinibatchStream(store, 10, seed=0)
    expected.set_epoch(1)
    np.testing.assert_array_equal(index, np.concatenate(_indices(expected, num_workers=2)))
