"""The one atomic write: concurrent writers never collide, a failed write changes nothing."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest

from pyro_dlatent.utils import _malloc_trim, atomic_write, release_free_memory, write_json

WRITES = 300


def _writer(path: str, tag: int, start: float) -> int:
    while time.time() < start:  # both processes write at the same time
        time.sleep(0.001)
    failures = 0
    for i in range(WRITES):
        try:
            write_json({"writer": tag, "i": i, "pad": "x" * 2000}, path)
        except OSError:
            failures += 1
        try:
            json.loads(Path(path).read_text())
        except (OSError, ValueError):
            failures += 1
    return failures


def test_two_processes_writing_one_json_file_never_collide(tmp_path):
    # With one fixed temporary name, two writers renamed each other's half-written files
    # (FileNotFoundError, invalid JSON read back).
    path = tmp_path / "state.json"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        start = time.time() + 5.0
        failures = pool.starmap(_writer, [(str(path), 0, start), (str(path), 1, start)])
    assert failures == [0, 0]
    record = json.loads(path.read_text())
    assert record["writer"] in (0, 1) and record["i"] == WRITES - 1
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "state.json"
    write_json({"a": 1}, path)

    def broken(tmp):
        tmp.write_text("{half")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        atomic_write(path, broken)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_full_disk_is_named_and_the_old_file_kept(tmp_path, monkeypatch):
    # torch.save on a full disk raised "[enforce fail at inline_container.cc:672] . unexpected
    # pos 896 vs 790", naming neither the disk nor the file.
    import shutil
    from collections import namedtuple

    path = tmp_path / "last.pt"
    write_json({"epoch": 3}, path)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: usage(10, 10, 0))

    def torch_like(tmp):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 896 vs 790")

    with pytest.raises(OSError, match=r"no space left .* 'last\.pt'") as info:
        atomic_write(path, torch_like)
    assert "\n" not in str(info.value)
    assert json.loads(path.read_text()) == {"epoch": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_folder_without_write_permission_is_named(tmp_path, monkeypatch):
    # (simulated: this suite may run as root, who writes into read-only folders)
    import tempfile

    def denied(**kwargs):
        raise PermissionError(13, "Permission denied", kwargs["dir"])

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(PermissionError, match=r"cannot write 'x\.json' into .*: permission denied"):
        write_json({}, tmp_path / "x.json")


@pytest.mark.skipif(_malloc_trim() is None, reason="not glibc")
def test_freed_heap_pages_go_back_to_the_system():
    import numpy as np
    import psutil

    def rss() -> float:
        return psutil.Process().memory_info().rss / 2**20

    blocks = [np.ones(4096) for _ in range(6000)]  # 32 KiB each, from the heap: 188 MiB
    kept = blocks[::50]  # a few stay alive among the freed ones
    del blocks
    before = rss()
    release_free_memory()
    # glibc alone keeps most of the freed 184 MiB; the trim returns it
    assert before - rss() > 100, (before, rss())
    assert len(kept) == 120
