"""Checkpoint format: round trip, atomic writes, refusal of pickled code and damaged files."""

from __future__ import annotations

import os
import pickle
import re
import zipfile

import pyro
import pyro.optim
import pytest
import torch

from pyro_dlatent.checkpoint import (
    FORMAT_VERSION,
    MAGIC,
    load_checkpoint,
    save_checkpoint,
)
from tests.conftest import assert_close


def _write(path, **overrides):
    kwargs = {
        "kind": "Toy",
        "config": {"width": 8, "names": ["a", "b"]},
        "scaler": {"names": ["a"], "mean": [0.5], "std": [2.0]},
        "state": {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "step": 3},
        "history": [{"epoch": 0, "elbo": -1.5}],
        "extra": {"note": "x"},
    }
    kwargs.update(overrides)
    return save_checkpoint(path, **kwargs)


class _Payload:
    """Unpickling this object would call ``open(marker, "w")`` and so create a file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_round_trip(tmp_path):
    path = _write(tmp_path / "ckpt.pt")
    ckpt = load_checkpoint(path, kind="Toy")
    assert ckpt.kind == "Toy"
    assert ckpt.format_version == FORMAT_VERSION
    assert ckpt.config == {"width": 8, "names": ["a", "b"]}
    assert ckpt.scaler == {"names": ["a"], "mean": [0.5], "std": [2.0]}
    assert ckpt.history == [{"epoch": 0, "elbo": -1.5}]
    assert ckpt.extra == {"note": "x"}
    assert ckpt.state["step"] == 3
    assert_close(ckpt.state["model"]["w"], torch.arange(6.0).reshape(2, 3))


def test_pyro_optimizer_state_survives_weights_only_loading(tmp_path):
    weight = torch.nn.Parameter(torch.ones(3))
    pyro.param("toy.w", weight)
    optim = pyro.optim.ClippedAdam({"lr": 0.1, "clip_norm": 5.0})
    for _ in range(2):
        loss = (pyro.param("toy.w") ** 2).sum()
        loss.backward()
        optim([pyro.param("toy.w").unconstrained()])
        pyro.param("toy.w").unconstrained().grad = None
    state = optim.get_state()
    path = _write(tmp_path / "optim.pt", state={"optimizer": state})
    loaded = load_checkpoint(path).state["optimizer"]
    assert_close(loaded["toy.w"]["state"][0]["exp_avg"], state["toy.w"]["state"][0]["exp_avg"])
    assert loaded["toy.w"]["state"][0]["step"] == 2
    assert loaded["toy.w"]["param_groups"][0]["betas"] == state["toy.w"]["param_groups"][0]["betas"]
    fresh = pyro.optim.ClippedAdam({"lr": 0.1, "clip_norm": 5.0})
    fresh.set_state(loaded)
    (pyro.param("toy.w") ** 2).sum().backward()
    fresh([pyro.param("toy.w").unconstrained()])
    assert fresh.get_state()["toy.w"]["state"][0]["step"] == 3


def test_write_is_atomic_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = _write(tmp_path / "ckpt.pt")
    before = path.read_bytes()

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        _write(path, config={"width": 16})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert load_checkpoint(path).config["width"] == 8


def test_crafted_pickle_payload_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"magic": MAGIC, "format_version": 1, "payload": _Payload(str(marker))}, path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_checkpoint(path)
    assert not marker.exists()
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(_Payload(str(marker)), protocol=2))
    with pytest.raises(ValueError, match=re.escape(str(raw))):
        load_checkpoint(raw)
    assert not marker.exists()
    # Control: the payload is live; an unrestricted unpickler runs it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_crafted_pickle_inside_a_valid_envelope_is_not_executed(tmp_path):
    import hashlib
    import io

    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"config": "{}", "state": {"x": _Payload(str(marker))}}, buffer)
    data = buffer.getvalue()
    envelope = {
        "magic": MAGIC,
        "format_version": 1,
        "kind": "Toy",
        "sha256": hashlib.sha256(data).hexdigest(),
        "payload": torch.frombuffer(bytearray(data), dtype=torch.uint8),
    }
    path = tmp_path / "nested.pt"
    torch.save(envelope, path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_file_raises_naming_it(tmp_path):
    path = _write(tmp_path / "ckpt.pt")
    data = path.read_bytes()
    for length in (0, 10, len(data) // 2, len(data) - 5):
        path.write_bytes(data[:length])
        with pytest.raises(ValueError, match=re.escape(str(path))):
            load_checkpoint(path)


def test_corrupted_file_raises_naming_it(tmp_path):
    path = _write(tmp_path / "ckpt.pt")
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    # Flip bytes inside the largest stored record (the payload), past its local header.
    start = info.header_offset + 30 + len(info.filename) + 64
    for i in range(start, start + 16):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_checkpoint(path)


def test_foreign_files_raise_naming_them(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, plain)
    for path in (text, plain, tmp_path / "missing.pt"):
        with pytest.raises(ValueError, match=re.escape(str(path))):
            load_checkpoint(path)


def test_newer_version_and_wrong_kind_are_refused(tmp_path):
    path = _write(tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="holds a 'Toy'"):
        load_checkpoint(path, kind="AuxVAE")
    envelope = torch.load(path, weights_only=True)
    envelope["format_version"] = FORMAT_VERSION + 1
    torch.save(envelope, path)
    with pytest.raises(ValueError, match="newer"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"config": {"x": float("nan")}}, ValueError, "config"),
        ({"config": {"x": object()}}, ValueError, "config"),
        ({"state": {"f": lambda: 0}}, TypeError, "state"),
        ({"kind": ""}, ValueError, "kind"),
    ],
)
def test_unstorable_content_is_refused_before_writing(tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        _write(tmp_path / "ckpt.pt", **overrides)
    assert not (tmp_path / "ckpt.pt").exists()


def test_missing_directory_raises(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        _write(tmp_path / "nowhere" / "ckpt.pt")
