"""Studies as dask tasks: one atomic record per problem, reruns skip, any layout same records."""

from __future__ import annotations

import functools
import json
import os

import numpy as np
import pytest

from pyro_dlatent.studies import RECORDS, load_records, run_study


def _problem(index: int, *, marks: str | None = None) -> dict:
    """A stand-in study problem: seeded by its index alone, as the package's studies are."""
    if marks is not None:
        open(os.path.join(marks, f"{index}-{os.getpid()}"), "w").close()
    if index == 13:
        raise RuntimeError("problem 13 fails")
    rng = np.random.default_rng((7, index))
    draws = rng.normal(size=(500, 3))
    return {"mean": draws.mean(0).tolist(), "q90": np.quantile(draws, 0.9, axis=0).tolist()}


def test_a_study_on_two_workers_writes_what_a_serial_one_writes(tmp_path):
    indices = range(8)
    serial = run_study(_problem, indices, tmp_path / "serial", scheduler="serial")
    marks = tmp_path / "marks"
    marks.mkdir()
    task = functools.partial(_problem, marks=str(marks))
    parallel = run_study(task, indices, tmp_path / "dask", workers=2)
    assert parallel == serial and [r["index"] for r in serial] == list(indices)
    assert len({name.split("-")[1] for name in os.listdir(marks)}) == 2  # both workers worked
    for index in indices:  # the files themselves are identical
        name = f"{index:06d}.json"
        assert (tmp_path / "serial" / RECORDS / name).read_bytes() == (
            tmp_path / "dask" / RECORDS / name
        ).read_bytes()


def test_a_rerun_computes_only_the_missing_records(tmp_path):
    run_study(_problem, range(6), tmp_path, scheduler="serial")
    (tmp_path / RECORDS / "000003.json").unlink()
    marks = tmp_path / "marks"
    marks.mkdir()
    again = run_study(
        functools.partial(_problem, marks=str(marks)), range(6), tmp_path, scheduler="serial"
    )
    assert [name.split("-")[0] for name in os.listdir(marks)] == ["3"]
    assert [r["index"] for r in again] == list(range(6))


def test_a_failing_problem_keeps_the_others_records_and_raises(tmp_path):
    with pytest.raises(RuntimeError, match="problem 13"):
        run_study(_problem, [11, 12, 13, 14], tmp_path, workers=2)
    kept = sorted(r["index"] for r in load_records(tmp_path))
    assert kept == [11, 12, 14]
    with pytest.raises(FileNotFoundError, match="000013"):
        load_records(tmp_path, [11, 13])
    assert json.loads((tmp_path / RECORDS / "000011.json").read_text())["index"] == 11


class _Shared:
    """A costly shared object that marks every unpickling (one per process that receives it)."""

    def __init__(self, marks: str, offset: float) -> None:
        self.marks, self.offset = marks, offset

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        open(
            os.path.join(self.marks, f"unpickled-{os.getpid()}-{len(os.listdir(self.marks))}"), "w"
        ).close()


def _shifted(index: int, shared: _Shared) -> dict:
    return {"value": _problem(index)["mean"][0] + shared.offset}


def test_a_shared_object_reaches_each_worker_once_and_every_task(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    shared = _Shared(str(marks), 10.0)
    serial = run_study(_shifted, range(8), tmp_path / "serial", scheduler="serial", shared=shared)
    assert os.listdir(marks) == []  # the serial run uses the object itself
    parallel = run_study(_shifted, range(8), tmp_path / "dask", workers=2, shared=shared)
    assert parallel == serial
    assert serial[0]["value"] == _problem(0)["mean"][0] + 10.0
    # sent once to each of the two workers, not once per task (dask's serialization may also
    # round-trip it in this process)
    workers = [
        p for p in (name.split("-")[1] for name in os.listdir(marks)) if p != str(os.getpid())
    ]
    assert len(workers) == len(set(workers)) <= 2


def _environment(index: int) -> dict:
    return {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")}


def test_local_workers_keep_glibc_adaptive_malloc_and_one_thread(tmp_path):
    # dask sets MALLOC_TRIM_THRESHOLD_ in its workers, which maps every large tensor anew
    import dask

    before = dask.config.get("distributed.nanny.pre-spawn-environ")
    (record,) = run_study(_environment, [0], tmp_path, workers=1)
    assert record["MALLOC_TRIM_THRESHOLD_"] is None and record["OMP_NUM_THREADS"] == "1"
    assert dask.config.get("distributed.nanny.pre-spawn-environ") == before
