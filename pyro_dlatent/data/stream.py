"""Datasets larger than memory: one-pass statistics and shuffled minibatches read chunk by chunk.

A dataset on disk (a zarr store such as :func:`~pyro_dlatent.data.simulate_to` writes, or a
netCDF file) is read a chunk of samples at a time, never whole:

- :func:`fit_statistics` makes one sequential pass for what fitting a model needs first, the
  auxiliary scaler and the pixel mean and standard deviation (equal, to rounding, to
  :func:`~pyro_dlatent.data.make_scaler` and to the in-memory pixel moments);
- :class:`MinibatchStream` is a :class:`torch.utils.data.IterableDataset` of shuffled
  minibatches for a :class:`~torch.utils.data.DataLoader` with worker processes, sharded across
  workers and distributed ranks so that every sample is drawn exactly once per epoch;
- :class:`StandardizeAux` turns its raw batches into the arrays a model's ``prepare`` makes
  (as tensors through :meth:`StandardizedBatch.tensors`).

Examples
--------
>>> stats = fit_statistics("sources.zarr")  # doctest: +SKIP
>>> transform = StandardizeAux(stats.scaler)  # doctest: +SKIP
>>> stream = MinibatchStream("sources.zarr", 128, transform=transform)  # doctest: +SKIP
>>> loader = DataLoader(stream, batch_size=None, num_workers=2)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch.utils.data import IterableDataset, get_worker_info

from pyro_dlatent.data.io import _open, check_dataset, make_scaler
from pyro_dlatent.latent import AuxScaler

__all__ = [
    "Batch",
    "DatasetStatistics",
    "MinibatchStream",
    "StandardizeAux",
    "StandardizedBatch",
    "fit_statistics",
]

_CHUNK_PIXELS = 2**20
"""Pixels per read when the source does not say how it is chunked (4 MiB of float32)."""
_AUX_BYTES = 2**26
"""Largest auxiliary table (float64) a reading process holds whole rather than chunk by chunk."""


@dataclass(frozen=True)
class Batch:
    """A minibatch as stored, in numpy arrays.

    Not tensors: a DataLoader worker sends a batch of arrays to the main process in one pickle
    through its pipe, about twice as fast for 32x32 images as sending three tensors through
    shared memory (``benchmarks/timing/bench_stream.py``); ``torch.from_numpy`` then shares the
    arrays' memory.

    Attributes
    ----------
    images : numpy.ndarray, shape ``(batch, height, width)``, float32
        Images in the dataset's units.
    aux : numpy.ndarray, shape ``(batch, aux_dim)``, float64
        Auxiliaries in physical units, ``NaN`` where missing, in the stream's ``aux_names`` order.
    index : numpy.ndarray, shape ``(batch,)``, int64
        Each sample's position along the source's ``sample`` dimension.
    """

    images: np.ndarray
    aux: np.ndarray
    index: np.ndarray


@dataclass(frozen=True)
class StandardizedBatch:
    """A minibatch as a model takes it, in numpy arrays (see :meth:`tensors`).

    Attributes
    ----------
    images : numpy.ndarray, shape ``(batch, height, width)``, float32
        Images in the dataset's units (the model standardizes them itself).
    aux : numpy.ndarray, shape ``(batch, aux_dim)``, float32
        Standardized auxiliaries, 0 where missing.
    mask : numpy.ndarray of bool, shape ``(batch, aux_dim)``, or None
        True where observed; ``None`` when the whole batch is observed.
    index : numpy.ndarray, shape ``(batch,)``, int64
        Each sample's position along the source's ``sample`` dimension.
    """

    images: np.ndarray
    aux: np.ndarray
    mask: np.ndarray | None
    index: np.ndarray

    def tensors(
        self, device: str | torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(images, aux, mask)`` as tensors on ``device``: the fields of ``ModelTensors``."""
        mask = None if self.mask is None else torch.from_numpy(self.mask).to(device)
        return (
            torch.from_numpy(self.images).to(device),
            torch.from_numpy(self.aux).to(device),
            mask,
        )


class StandardizeAux:
    """Batch transform: auxiliaries standardized by a fitted scaler, as ``prepare`` does.

    The arithmetic is that of ``GuidedLatentModel.prepare`` (float64 transform, then float32),
    so a batch holds the same numbers as the in-memory tensors of the same samples. Build the
    stream with ``aux_names=scaler.names`` so the columns are in the scaler's order. An instance
    pickles, so it can run in spawned worker processes.

    Parameters
    ----------
    scaler : AuxScaler
        Fitted, e.g. ``fit_statistics(path).scaler`` or a model's ``scaler``.
    """

    def __init__(self, scaler: AuxScaler) -> None:
        if not isinstance(scaler, AuxScaler):
            raise TypeError(f"scaler must be an AuxScaler, got {type(scaler).__name__}")
        if not scaler.fitted:
            raise ValueError("scaler is not fitted; fit it first (fit_statistics does)")
        self.scaler = scaler

    def __call__(self, batch: Batch) -> StandardizedBatch:
        standardized = self.scaler.transform(batch.aux)
        observed = np.isfinite(standardized)
        aux = np.where(observed, standardized, 0.0).astype(np.float32)
        mask = None if observed.all() else observed
        return StandardizedBatch(batch.images, aux, mask, batch.index)


@dataclass(frozen=True)
class DatasetStatistics:
    """What :func:`fit_statistics` measures in its pass over a dataset.

    Attributes
    ----------
    scaler : AuxScaler
        Fitted on every observed auxiliary value (``make_scaler(ds)`` of the loaded dataset).
    image_loc, image_scale : float
        Mean and standard deviation of all pixels (a model's ``image_loc``, ``image_scale``).
    num_samples : int
        Number of samples read.
    """

    scaler: AuxScaler
    image_loc: float
    image_scale: float
    num_samples: int


class _Moments:
    """Count, mean and sum of squared deviations, merged block by block (Chan et al. 1979).

    .. math::
        n = n_a + n_b, \\quad \\bar x = \\bar x_a + \\delta\\, n_b / n, \\quad
        M_2 = M_{2,a} + M_{2,b} + \\delta^2 n_a n_b / n, \\qquad \\delta = \\bar x_b - \\bar x_a,

    per column of 2-d blocks, ignoring ``NaN``; each block's own moments are computed in two
    passes, so the result is accurate to rounding whatever the offset of the values.
    """

    def __init__(self, dim: int) -> None:
        self.count = np.zeros(dim)
        self.mean = np.zeros(dim)
        self.m2 = np.zeros(dim)

    def update(self, block: np.ndarray) -> None:
        observed = ~np.isnan(block)
        count = observed.sum(axis=0).astype(np.float64)
        filled = np.where(observed, block, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(count > 0, filled.sum(axis=0) / count, 0.0)
            m2 = (np.where(observed, block - mean, 0.0) ** 2).sum(axis=0)
            total = self.count + count
            delta = mean - self.mean
            share = np.where(total > 0, count / total, 0.0)
            self.mean = self.mean + delta * share
            self.m2 = self.m2 + m2 + delta**2 * self.count * share
        self.count = total

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation (``numpy.std``'s default)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.sqrt(self.m2 / self.count)


def fit_statistics(
    source: str | os.PathLike | xr.Dataset, *, chunk_size: int | None = None
) -> DatasetStatistics:
    """Fit the auxiliary scaler and the pixel moments in one pass, a chunk of samples at a time.

    Parameters
    ----------
    source : path or xarray.Dataset
        A ``.zarr`` store or ``.nc`` file (opened lazily), or a dataset (lazy or in memory).
    chunk_size : int, optional
        Samples per read (default: the source's chunking along ``sample``, else about 4 MiB).

    Returns
    -------
    DatasetStatistics
        The scaler equals ``make_scaler(ds)`` and the moments the mean and population standard
        deviation of every pixel of the loaded dataset, to float64 rounding.

    Raises
    ------
    ValueError
        On non-finite pixels, constant images, or an auxiliary without two distinct observed
        values (the errors of :meth:`AuxScaler.fit`).
    """
    ds = _as_dataset(source)
    chunk_size = _chunk_size(ds, chunk_size)
    scaler = make_scaler(ds, fit=False)
    names = scaler.names
    # a scaler with mean 0 and sd 1 applies (and checks) the transforms and nothing else
    identity = AuxScaler.from_state_dict(
        {**scaler.state_dict(), "mean": [0.0] * scaler.dim, "std": [1.0] * scaler.dim}
    )
    pixels, aux = _Moments(1), _Moments(scaler.dim)
    num = ds.sizes["sample"]
    for start in range(0, num, chunk_size):
        images, physical = _read(ds, names, start, min(start + chunk_size, num))
        images = images.astype(np.float64).reshape(-1, 1)
        if not np.isfinite(images).all():
            raise ValueError("source['image'] contains non-finite values")
        pixels.update(images)
        aux.update(identity.transform(physical))
    if not pixels.std[0] > 0:
        raise ValueError("source['image'] is constant; it cannot be standardized")
    if np.any(aux.count < 2):
        bad = [names[j] for j in np.flatnonzero(aux.count < 2)]
        raise ValueError(f"aux needs at least two observed values per variable; {bad} lack them")
    if np.any(aux.std <= 0):
        bad = [names[j] for j in np.flatnonzero(aux.std <= 0)]
        raise ValueError(f"aux variables {bad} are constant; they cannot be standardized")
    fitted = AuxScaler.from_state_dict(
        {**scaler.state_dict(), "mean": aux.mean.tolist(), "std": aux.std.tolist()}
    )
    return DatasetStatistics(fitted, float(pixels.mean[0]), float(pixels.std[0]), num)


class MinibatchStream(IterableDataset):
    r"""Shuffled minibatches of a dataset, read a chunk of samples at a time.

    Epoch :math:`e` draws a permutation of the chunks from the seed ``(seed, e)``; the samples,
    chunk after chunk in that order, are cut into :math:`R\,B` near-equal batches (sizes
    differing by at most one, none over ``batch_size``), where :math:`R` is ``world_size`` and
    :math:`B = \lceil n / (R \cdot \text{batch\_size}) \rceil`; rank :math:`r` takes batches
    :math:`rB, \dots, (r + 1)B - 1`, and its DataLoader workers split those into contiguous
    runs. A worker reads its part of the stream ``buffer_chunks`` chunks at a time, shuffles
    what it holds (seed ``(seed, e, rank, worker)``), hands out the batches that fill, and
    carries the rest into the next read. So every sample is drawn exactly once per epoch across
    all ranks and workers, every rank makes the same number of steps (``len(stream)``), and the
    order is a function of ``seed``, the epoch, ``world_size`` and the number of workers.

    Mixing reaches across ``buffer_chunks`` chunks (plus the carried remainder): a dataset
    stored in a meaningful order (sorted by mass, say) needs more of them, or a shuffled copy.

    Parameters
    ----------
    source : path or xarray.Dataset
        A ``.zarr`` store or ``.nc`` file, opened lazily in each process that reads it (the
        safe way for netCDF), or a dataset, lazy (:func:`~pyro_dlatent.data.load` with
        ``chunks``, or a subset of one such as a :func:`~pyro_dlatent.data.split` part) or in
        memory.
    batch_size : int
        Largest batch; batches differ in size by at most one.
    shuffle : bool
        ``False`` reads in storage order (for evaluation passes).
    seed : int
        Seed of the chunk and sample permutations.
    buffer_chunks : int
        Chunks each worker holds and shuffles together (default 4).
    chunk_size : int, optional
        Samples per read (default: the source's chunking along ``sample``, else about 4 MiB).
    rank, world_size : int
        This process's rank among ``world_size`` distributed ranks.
    aux_names : sequence of str, optional
        Column order of ``aux`` (default: the dataset's); pass a model's ``scaler.names``.
    transform : callable, optional
        Applied to each :class:`Batch` in the worker, e.g. :class:`StandardizeAux`; it must
        pickle if the DataLoader spawns its workers.

    Notes
    -----
    Use it with ``DataLoader(stream, batch_size=None, num_workers=k)`` (the stream makes the
    batches). Call :meth:`set_epoch` before each epoch; the epoch is kept in shared memory, so
    ``persistent_workers=True`` sees it too (and the stream pickles only to start worker
    processes). Each item is a :class:`Batch` of arrays, or what ``transform`` returns.

    Examples
    --------
    >>> stream = MinibatchStream("sources.zarr", 128, seed=0)  # doctest: +SKIP
    >>> loader = DataLoader(stream, None, num_workers=2, persistent_workers=True)  # doctest: +SKIP
    >>> for epoch in range(10):  # doctest: +SKIP
    ...     stream.set_epoch(epoch)
    ...     for batch in loader:
    ...         images = torch.from_numpy(batch.images)
    """

    def __init__(
        self,
        source: str | os.PathLike | xr.Dataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        buffer_chunks: int = 4,
        chunk_size: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        aux_names: Sequence[str] | None = None,
        transform: Callable[[Batch], Any] | None = None,
    ) -> None:
        super().__init__()
        self.batch_size = _check_int(batch_size, "batch_size", 1)
        self.seed = _check_int(seed, "seed", 0)
        self.buffer_chunks = _check_int(buffer_chunks, "buffer_chunks", 1)
        self.world_size = _check_int(world_size, "world_size", 1)
        self.rank = _check_int(rank, "rank", 0)
        if self.rank >= self.world_size:
            raise ValueError(f"expected 0 <= rank < world_size={self.world_size}, got {rank!r}")
        if not isinstance(shuffle, bool):
            raise TypeError(f"shuffle must be a bool, got {shuffle!r}")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        self.shuffle = shuffle
        self.transform = transform
        ds = _as_dataset(source)
        self._path = None if isinstance(source, xr.Dataset) else Path(source)
        self._ds = ds if self._path is None else None  # a file is opened by each reader
        self._opened: tuple[int, xr.Dataset, np.ndarray | None] | None = None
        self.chunk_size = _chunk_size(ds, chunk_size)
        self.num_samples = int(ds.sizes["sample"])
        self.image_shape = tuple(int(s) for s in ds["image"].shape[1:])
        stored = list(ds.attrs["aux_names"])
        if aux_names is None:
            self.aux_names = stored
        else:
            self.aux_names = [str(n) for n in aux_names]
            if sorted(self.aux_names) != sorted(stored):
                raise ValueError(
                    f"aux_names must order the source's auxiliaries {stored}, got {self.aux_names}"
                )
        self._batches_per_rank = math.ceil(self.num_samples / (self.world_size * self.batch_size))
        if self.num_samples < self._batches_per_rank * self.world_size:
            raise ValueError(
                f"a source of {self.num_samples} samples cannot give each of world_size="
                f"{self.world_size} ranks {self._batches_per_rank} batch(es) of at most "
                f"batch_size={self.batch_size}; use fewer ranks or a larger batch_size"
            )
        if self._path is not None:
            ds.close()  # netCDF handles must not cross a fork
        self._epoch = multiprocessing.RawValue("q", 0)

    def __len__(self) -> int:
        """Batches this rank yields per epoch (over all its workers)."""
        return self._batches_per_rank

    @property
    def epoch(self) -> int:
        """The epoch the next iteration draws (see :meth:`set_epoch`)."""
        return int(self._epoch.value)

    def set_epoch(self, epoch: int) -> None:
        """Draw epoch ``epoch``'s order next, in this process and in every DataLoader worker."""
        self._epoch.value = _check_int(epoch, "epoch", 0)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_opened": None}  # the process that reads opens its own

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        epoch = self.epoch
        pieces, sizes = self.plan(epoch, worker=worker, num_workers=num_workers)
        rng = np.random.default_rng((self.seed, epoch, self.rank, worker))
        ds, aux_table = self._reader()
        images = np.empty((0, *self.image_shape), dtype=np.float32)
        aux = np.empty((0, len(self.aux_names)))
        index = np.empty(0, dtype=np.int64)
        next_piece = 0
        next_batch = 0
        while next_batch < len(sizes):
            reads = pieces[next_piece : next_piece + self.buffer_chunks]
            next_piece += len(reads)
            if not reads and len(index) < sizes[next_batch]:
                raise RuntimeError("MinibatchStream ran out of samples; this is a bug")
            parts = [(images, aux, index)]
            for start, stop in reads:
                if aux_table is None:
                    read = _read(ds, self.aux_names, start, stop)
                else:
                    read = (_read(ds, [], start, stop)[0], aux_table[start:stop])
                parts.append((*read, np.arange(start, stop)))
            images, aux, index = (np.concatenate(p) for p in zip(*parts, strict=True))
            order = rng.permutation(len(index)) if self.shuffle else np.arange(len(index))
            used = 0
            while next_batch < len(sizes) and used + sizes[next_batch] <= len(index):
                take = order[used : used + sizes[next_batch]]
                used += sizes[next_batch]
                next_batch += 1
                batch = Batch(images[take], aux[take], index[take])
                yield batch if self.transform is None else self.transform(batch)
            rest = order[used:]
            images, aux, index = images[rest], aux[rest], index[rest]

    def plan(
        self, epoch: int, *, worker: int = 0, num_workers: int = 1
    ) -> tuple[list[tuple[int, int]], list[int]]:
        """What one worker of this rank reads and yields in ``epoch``.

        Returns
        -------
        pieces : list of ``(start, stop)``
            Runs of samples along ``sample``, each within one chunk, in reading order.
        sizes : list of int
            The sizes of the worker's batches, in order; they add up to the pieces' samples.
        """
        epoch = _check_int(epoch, "epoch", 0)
        num_workers = _check_int(num_workers, "num_workers", 1)
        worker = _check_int(worker, "worker", 0)
        if worker >= num_workers:
            raise ValueError(f"expected 0 <= worker < num_workers={num_workers}, got {worker!r}")
        n, chunk = self.num_samples, self.chunk_size
        num_chunks = math.ceil(n / chunk)
        if self.shuffle:
            chunks = np.random.default_rng((self.seed, epoch)).permutation(num_chunks)
        else:
            chunks = np.arange(num_chunks)
        lengths = np.minimum(chunk, n - chunks * chunk)
        chunk_starts = np.concatenate([[0], np.cumsum(lengths)])  # in stream order
        total = self._batches_per_rank * self.world_size
        base, extra = divmod(n, total)
        all_sizes = np.full(total, base)
        all_sizes[:extra] += 1
        per_worker, spare = divmod(self._batches_per_rank, num_workers)
        first = self.rank * self._batches_per_rank + worker * per_worker + min(worker, spare)
        count = per_worker + (worker < spare)
        batch_starts = np.concatenate([[0], np.cumsum(all_sizes)])
        lo, hi = batch_starts[first], batch_starts[first + count]
        pieces = []
        for j in range(num_chunks):
            a, b = max(lo, chunk_starts[j]), min(hi, chunk_starts[j + 1])
            if a < b:
                offset = int(chunks[j]) * chunk - int(chunk_starts[j])
                pieces.append((int(a + offset), int(b + offset)))
        return pieces, [int(s) for s in all_sizes[first : first + count]]

    def _reader(self) -> tuple[xr.Dataset, np.ndarray | None]:
        """The source as this process reads it, and all its auxiliaries if they are small.

        A file is opened once per process; auxiliaries of at most 64 MiB (8 million samples of
        one auxiliary) are read whole then, since reading them chunk by chunk costs as much as
        reading the images.
        """
        if self._opened is None or self._opened[0] != os.getpid():
            ds = self._ds if self._path is None else _as_dataset(self._path)
            aux = None
            if self.num_samples * len(self.aux_names) * 8 <= _AUX_BYTES:
                aux = _read(ds, self.aux_names, 0, self.num_samples, images=False)[1]
            self._opened = (os.getpid(), ds, aux)
        return self._opened[1], self._opened[2]


def _as_dataset(source: str | os.PathLike | xr.Dataset) -> xr.Dataset:
    if isinstance(source, xr.Dataset):
        return check_dataset(source, name="source")
    if isinstance(source, str | os.PathLike):
        return _open(source, chunks=None)
    raise TypeError(f"source must be a path or an xarray.Dataset, got {type(source).__name__}")


def _chunk_size(ds: xr.Dataset, chunk_size: int | None) -> int:
    """``chunk_size`` checked, or the source's chunking along ``sample``, or about 4 MiB."""
    if chunk_size is not None:
        return _check_int(chunk_size, "chunk_size", 1)
    image = ds["image"]
    if image.chunks is not None:
        return int(image.chunks[0][0])
    stored = image.encoding.get("chunks") or image.encoding.get("chunksizes")
    if stored:
        return int(stored[0])
    return max(1, _CHUNK_PIXELS // math.prod(image.shape[1:]))


def _read(
    ds: xr.Dataset, names: Sequence[str], start: int, stop: int, *, images: bool = True
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Images ``(m, H, W)`` float32 and auxiliaries ``(m, k)`` float64 of samples ``start:stop``.

    Either is ``None`` when not asked for (``images=False``, no ``names``).
    """
    variables = ["image", *names] if images else list(names)
    part = ds[variables].isel(sample=slice(start, stop))
    if part.chunks:  # dask: compute here; a thread pool inherited through a fork would hang
        part = part.compute(scheduler="synchronous")
    pixels = np.asarray(part["image"].values, dtype=np.float32) if images else None
    if not names:
        return pixels, None
    return pixels, np.stack([np.asarray(part[n].values, dtype=np.float64) for n in names], -1)


def _check_int(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ValueError(f"expected {name} >= {low} (an int), got {value!r}")
    return int(value)
