"""Versioned, checksummed, atomically written checkpoints that load without unpickling code.

A checkpoint file is a ``torch.save`` archive of a small envelope::

    {"magic": "pyro_dlatent/checkpoint", "format_version": 1, "kind": "AuxVAE",
     "sha256": "<hex digest of payload>", "payload": uint8 tensor}

whose payload is itself a ``torch.save`` archive of::

    {"config": "<JSON>", "scaler": "<JSON>", "history": "<JSON>", "extra": "<JSON>",
     "state": nested dicts / lists of tensors and plain numbers}

Everything JSON-able is stored as a JSON string, so no Python object other than tensors,
containers and numbers is ever written; both layers are read with
``torch.load(..., weights_only=True)``, which refuses to import or call anything, so a crafted
pickle cannot execute. The digest catches truncated or corrupted files, and writes go to a
temporary file in the destination directory that is renamed over ``path`` only once complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pyro_dlatent.utils import atomic_write

__all__ = ["FORMAT_VERSION", "MAGIC", "Checkpoint", "load_checkpoint", "save_checkpoint"]

MAGIC = "pyro_dlatent/checkpoint"
"""Value of the ``magic`` field that marks a pyro_dlatent checkpoint."""

FORMAT_VERSION = 3
"""Current checkpoint format version; files of a newer version are refused.

Files of versions 2 and 3 hold every buffer of the model that wrote them; a model loads them
strictly. Version 3 keeps the generation map in its own module (``generation.*`` keys, where
version 2 had ``guided_*`` on the model). Version 1 files come from the package's first months,
whose models gained buffers and options one by one; loading one resets what the file predates
(``pyro_dlatent.models.persistence.migrate_v1``). A change to the format bumps the version and
adds a migration (``pyro_dlatent.models.persistence.upgrade_state``).
"""

_JSON_FIELDS = ("config", "scaler", "history", "extra")


@dataclass
class Checkpoint:
    """Contents of a checkpoint file.

    Attributes
    ----------
    kind : str
        What wrote it (a model class name such as ``"AuxVAE"``).
    config : dict
        Constructor configuration.
    scaler : dict or None
        :meth:`pyro_dlatent.latent.AuxScaler.state_dict` output.
    state : dict
        Nested tensors: weights, optimizer state.
    history : list of dict
        Per-epoch training records.
    extra : dict
        Anything else JSON-able (training settings, epoch counter).
    format_version : int
        Format version of the file.
    path : Path or None
        Where it was read from.
    """

    kind: str
    config: dict[str, Any]
    scaler: dict[str, Any] | None
    state: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    path: Path | None = None


def _check_state(value: Any, where: str) -> None:
    """Allow only what ``weights_only`` loading can read back: tensors, containers, scalars."""
    if isinstance(value, torch.Tensor) or value is None:
        return
    if isinstance(value, bool | int | float | str):
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str | int):
                raise TypeError(f"state key {key!r} at {where} must be a str or int")
            _check_state(item, f"{where}[{key!r}]")
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_state(item, f"{where}[{i}]")
        return
    raise TypeError(
        f"state at {where} holds a {type(value).__name__}; only tensors, dicts, lists, tuples, "
        "numbers, strings and None can be stored"
    )


def _to_json(value: Any, name: str) -> str:
    try:
        return json.dumps(value, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be JSON-serializable with finite numbers: {err}") from err


def save_checkpoint(
    path: str | os.PathLike,
    *,
    kind: str,
    config: Mapping[str, Any],
    scaler: Mapping[str, Any] | None,
    state: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]] = (),
    extra: Mapping[str, Any] | None = None,
    format_version: int = FORMAT_VERSION,
) -> Path:
    """Write a checkpoint atomically.

    Parameters
    ----------
    path : path-like
        Destination file (conventionally ``*.pt``); its directory must exist. An existing file is
        replaced only once the new one is completely written.
    kind : str
        What writes it (a model class name); :func:`load_checkpoint` can require it.
    config, scaler, history, extra
        JSON-serializable parts (finite numbers only), stored as JSON strings.
    state : mapping
        Nested dicts / lists / tuples of tensors, numbers, strings and ``None`` (for example
        ``{"model": module.state_dict(), "optimizer": optim.get_state()}``). Tensors are stored
        on the CPU.
    format_version : int
        The format the contents follow (default the current one; an older one only to write a
        file as an older package did, e.g. to test its migration).

    Returns
    -------
    Path
    """
    path = Path(path)
    if isinstance(format_version, bool) or format_version not in range(1, FORMAT_VERSION + 1):
        raise ValueError(f"expected format_version in 1..{FORMAT_VERSION}, got {format_version!r}")
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"expected kind a non-empty str, got {kind!r}")
    if not path.parent.is_dir():
        raise ValueError(f"path {str(path)!r}: directory {str(path.parent)!r} does not exist")
    _check_state(state, "state")
    payload = {
        "config": _to_json(dict(config), "config"),
        "scaler": _to_json(None if scaler is None else dict(scaler), "scaler"),
        "history": _to_json([dict(h) for h in history], "history"),
        "extra": _to_json(dict(extra or {}), "extra"),
        "state": _to_cpu(state),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    envelope = {
        "magic": MAGIC,
        "format_version": format_version,
        "kind": kind,
        "sha256": hashlib.sha256(data).hexdigest(),
        "payload": torch.frombuffer(bytearray(data), dtype=torch.uint8),
    }
    return atomic_write(path, lambda tmp: torch.save(envelope, tmp))


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, Mapping):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(item) for item in value)
    return value


def _safe_load(source: Any, map_location: Any, what: str) -> Any:
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:  # torch's message advises weights_only=False: never
        raise ValueError(
            f"{what} holds pickled objects other than tensors and plain data; it is refused, "
            "since loading them could run code"
        ) from err
    except Exception as err:  # any reader failure means an unusable file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{what} is not a readable pyro_dlatent checkpoint: {reason}") from err


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name}")


def load_checkpoint(
    path: str | os.PathLike,
    *,
    kind: str | Sequence[str] | None = None,
    map_location: str | torch.device | None = "cpu",
) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Parameters
    ----------
    path : path-like
    kind : str or sequence of str, optional
        Accepted writer kinds; a file of another kind raises ``ValueError``.
    map_location : str or torch.device, optional
        Where tensors are placed (default CPU).

    Returns
    -------
    Checkpoint

    Raises
    ------
    ValueError
        Naming the file, when it does not exist, is truncated or corrupted, is not a
        pyro_dlatent checkpoint, holds anything but tensors and plain data (a pickle payload
        that would import or call code), or has a newer format version or another kind.
    """
    path = Path(path)
    what = f"checkpoint file {str(path)!r}"
    if not path.is_file():
        raise ValueError(f"{what} does not exist")
    envelope = _safe_load(path, "cpu", what)
    if not isinstance(envelope, dict) or envelope.get("magic") != MAGIC:
        raise ValueError(f"{what} is not a pyro_dlatent checkpoint (no {MAGIC!r} marker)")
    version = envelope.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"{what} has an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{what} has format version {version}, newer than this package reads "
            f"({FORMAT_VERSION}); upgrade pyro_dlatent"
        )
    file_kind = envelope.get("kind")
    if not isinstance(file_kind, str):
        raise ValueError(f"{what} has no valid kind")
    if kind is not None:
        accepted = [kind] if isinstance(kind, str) else list(kind)
        if file_kind not in accepted:
            raise ValueError(f"{what} holds a {file_kind!r}, expected one of {accepted}")
    payload = envelope.get("payload")
    digest = envelope.get("sha256")
    if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or payload.dim() != 1:
        raise ValueError(f"{what} has no valid payload")
    data = payload.numpy().tobytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise ValueError(f"{what} is corrupted (checksum mismatch)")
    inner = _safe_load(io.BytesIO(data), map_location, what)
    if not isinstance(inner, dict) or "state" not in inner:
        raise ValueError(f"{what} has a malformed payload")
    parsed: dict[str, Any] = {}
    for name in _JSON_FIELDS:
        text = inner.get(name)
        if not isinstance(text, str):
            raise ValueError(f"{what} lacks its {name} JSON")
        try:
            parsed[name] = json.loads(text, parse_constant=_reject_constant)
        except ValueError as err:
            raise ValueError(f"{what} has malformed {name} JSON: {err}") from err
    if not isinstance(parsed["config"], dict) or not isinstance(parsed["extra"], dict):
        raise ValueError(f"{what} has a malformed config or extra (expected JSON objects)")
    if parsed["scaler"] is not None and not isinstance(parsed["scaler"], dict):
        raise ValueError(f"{what} has a malformed scaler (expected a JSON object)")
    if not isinstance(parsed["history"], list):
        raise ValueError(f"{what} has a malformed history (expected a JSON list)")
    if not isinstance(inner["state"], dict):
        raise ValueError(f"{what} has a malformed state (expected a dict)")
    return Checkpoint(
        kind=file_kind,
        config=parsed["config"],
        scaler=parsed["scaler"],
        state=inner["state"],
        history=parsed["history"],
        extra=parsed["extra"],
        format_version=version,
        path=path,
    )
