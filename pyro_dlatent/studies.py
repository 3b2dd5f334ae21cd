"""Many inverse problems (or any independent jobs) as tasks on a dask cluster, resumably.

:func:`run_study` runs ``task(i)`` for every index ``i`` of a study and writes each result on
its own, atomically, to ``records/{i}.json`` under the study's folder, from the worker that
computed it. A rerun skips the indices whose record exists, so a killed worker (or a killed
study) loses at most the problems it was working on; the records do not depend on which worker
computed them or in what order, so a distributed run writes what a serial run writes.
``scheduler=None`` starts a :class:`distributed.LocalCluster` of one single-threaded worker
process per core; an address (``"tcp://host:8786"``) sends the same tasks to a running cluster;
``"serial"`` runs them here, one after another. What every task needs and is costly to build
(a trained model, a fitted prior) can be built once by the caller and passed as ``shared``: it
is then sent once to each worker and the tasks are called as ``task(i, shared)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pyro_dlatent.utils import write_json
from pyro_dlatent.validation import check_int

__all__ = ["RECORDS", "load_records", "run_study"]

RECORDS = "records"
"""Folder of a study's per-index records."""


def _record_path(out: Path, index: int) -> Path:
    return out / RECORDS / f"{index:06d}.json"


class _NotShared:
    """The default of ``shared``: tasks take the index alone."""

    def __repr__(self) -> str:
        return "<nothing shared>"


_NOTHING = _NotShared()


def _run_and_write(
    task: Callable[..., dict[str, Any]], index: int, out: str, shared: Any = _NOTHING
) -> int:
    """Worker side: compute one record and write it atomically; return its index."""
    import torch

    torch.set_num_threads(1)  # one core per worker process
    record = task(index) if shared is _NOTHING else task(index, shared)
    if not isinstance(record, dict):
        raise TypeError(f"task({index}) returned {type(record).__name__}, not a dict")
    write_json({"index": index, **record}, _record_path(Path(out), index))
    return index


_UNSET_MALLOC_TRIM = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
"""dask config that leaves ``MALLOC_TRIM_THRESHOLD_`` out of the workers' environment (None unsets).

Setting that variable at all switches off glibc's adaptive mmap threshold, so every tensor of
128 KiB or more is mapped and unmapped anew: a study's problem took 1.3x as long in a dask worker
as in this process until it was left out."""


def load_records(out: str | os.PathLike, indices: Iterable[int] | None = None) -> list[dict]:
    """The records written under ``out`` (those of ``indices`` if given), in index order."""
    folder = Path(out) / RECORDS
    if indices is None:
        paths = sorted(folder.glob("*.json"))
    else:
        paths = [_record_path(Path(out), int(i)) for i in sorted(set(indices))]
        absent = [p.stem for p in paths if not p.exists()]
        if absent:
            raise FileNotFoundError(f"{str(folder)!r} lacks the records of {absent[:8]}")
    return [json.loads(path.read_text()) for path in paths]


def run_study(
    task: Callable[[int], dict[str, Any]],
    indices: Iterable[int],
    out: str | os.PathLike,
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    shared: Any = _NOTHING,
) -> list[dict[str, Any]]:
    """Run ``task(i)`` for each index not yet recorded under ``out``; return every record.

    Parameters
    ----------
    task : callable ``int -> dict`` (``(int, shared) -> dict`` with ``shared``)
        One problem's result (JSON-able). It must be picklable (a module-level function or a
        ``functools.partial`` of one) and depend on nothing but its index and its arguments.
    indices : iterable of int
        The study's problems.
    out : folder
        Where ``records/`` is kept (created).
    scheduler : str, optional
        ``None``: a local cluster of ``workers`` single-threaded processes (default one per
        core); ``"serial"``: this process; otherwise a dask scheduler address.
    workers : int, optional
        Worker processes of the local cluster.
    shared : object, optional
        Passed to every task as its second argument; on a cluster, pickled once and sent to
        each worker once (``Client.scatter(..., broadcast=True)``) instead of rebuilt there.

    Returns
    -------
    list of dict
        The records of ``indices`` in index order (each with its ``"index"``).
    """
    indices = sorted({check_int(i, "index", 0) for i in indices})
    out = Path(out)
    (out / RECORDS).mkdir(parents=True, exist_ok=True)
    todo = [i for i in indices if not _record_path(out, i).exists()]
    if todo and scheduler == "serial":
        for index in todo:
            _run_and_write(task, index, str(out), shared)
    elif todo:
        import dask
        from distributed import Client, LocalCluster, as_completed

        if scheduler is None:
            from pyro_dlatent.inverse.chains import available_cores

            count = available_cores() if workers is None else check_int(workers, "workers", 1)
            with dask.config.set(_UNSET_MALLOC_TRIM):
                cluster = LocalCluster(
                    n_workers=min(count, len(todo)), threads_per_worker=1, processes=True
                )
            client = Client(cluster)
        else:
            cluster, client = None, Client(scheduler)
        try:
            extra = []
            if shared is not _NOTHING:
                extra = [[client.scatter(shared, broadcast=True)] * len(todo)]
            futures = client.map(
                _run_and_write, [task] * len(todo), todo, [str(out)] * len(todo), *extra
            )
            failed = [f for f in as_completed(futures) if f.status == "error"]
            if failed:  # raised once every other task has finished and written its record
                failed[0].result()
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    return load_records(out, indices)
