"""Run folders: train a model on a dataset and leave its weights, history, report and figures."""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import xarray as xr

from pyro_dlatent import data, plots
from pyro_dlatent.calibration import COVERAGE_LEVELS as LEVELS
from pyro_dlatent.models.base import GuidedLatentModel
from pyro_dlatent.training import CHECKPOINT_NAME
from pyro_dlatent.utils import write_json

__all__ = [
    "MODELS",
    "RunFolderBusy",
    "build_model",
    "explain",
    "load_model",
    "open_dataset",
    "owned_folder",
    "process_rank",
    "run_lock",
    "train_run",
    "traversal_figure",
]

MODELS = {
    "auxvae": ("pyro_dlatent.models.auxvae", "AuxVAE"),
    "dlcfm": ("pyro_dlatent.models.dlcfm", "DLCFM"),
}
"""Model names accepted by :func:`build_model` and the classes they name."""

MODEL_FILE = "model.pt"
CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = ".lock"


def open_dataset(
    source: str | os.PathLike,
    *,
    num: int = 2048,
    size: int = 32,
    seed: int = 0,
    lazy: bool = False,
) -> xr.Dataset:
    """A dataset from a built-in simulator name or from a ``.nc``/``.zarr`` path.

    ``num``, ``size`` and ``seed`` apply to simulated data only; ``lazy`` opens a file without
    reading it (``fit`` then reads it chunk by chunk).
    """
    if str(source) in data.SIMULATORS:
        return data.simulate(str(source), num, size=size, seed=seed)
    path = Path(source)
    if not path.exists():
        raise ValueError(
            f"data {str(source)!r} is neither a built-in dataset {sorted(data.SIMULATORS)} "
            "nor an existing file"
        )
    return data.load(path, chunks={}) if lazy else data.load(path)


def build_model(name: str, dataset: xr.Dataset, **kwargs: Any) -> GuidedLatentModel:
    """Build the model ``name`` (a key of :data:`MODELS`) sized and scaled for ``dataset``."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    module, cls = MODELS[name]
    klass = getattr(importlib.import_module(module), cls)
    return klass.from_dataset(dataset, **kwargs)


def load_model(
    path: str | os.PathLike, *, device: str | None = None, weights: str | None = None
) -> GuidedLatentModel:
    """Load a model from a checkpoint file or a run folder (its ``model.pt``).

    ``weights`` picks the averaged or the live weights of a weight-averaged fit (see
    :meth:`GuidedLatentModel.load`).
    """
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise ValueError(f"model {str(path)!r} does not exist")
    for module, _ in MODELS.values():
        try:
            importlib.import_module(module)
        except ImportError:
            continue
    return GuidedLatentModel.load(path, device=device, weights=weights)


def traversal_figure(model: GuidedLatentModel, *, span: float = 2.5, steps: int = 7, base=None):
    """Latent traversal of ``model`` around ``base`` (a latent code; default the prior centre).

    Guided rows are labelled with the physical variable and each panel with its physical value
    (``scaler`` inverse of the standardized coordinate).
    """
    generator = model.generator()
    parameter = next(generator.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    if base is None:
        z_aux0, z_rec0 = np.zeros(model.aux_dim), np.zeros(model.residual_dim)
    else:
        z_aux0, z_rec0 = base

    def decode(z_aux: np.ndarray, z_rec: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = generator(
                torch.as_tensor(z_aux, dtype=torch.float32, device=device),
                torch.as_tensor(z_rec, dtype=torch.float32, device=device),
            )
        return out.cpu().numpy()

    scaler = model.scaler
    grid = np.linspace(-span, span, steps)
    values = np.empty((model.aux_dim, steps))
    for j in range(model.aux_dim):
        standardized = np.repeat(np.asarray(z_aux0, dtype=np.float64)[None], steps, axis=0)
        standardized[:, j] = grid
        values[j] = scaler.inverse_transform(standardized)[:, j]
    labels = [f"{n} [{u}]" if u else n for n, u in zip(scaler.names, scaler.units, strict=True)]
    return plots.latent_traversal(
        decode, z_aux0, z_rec0, span=span, steps=steps, aux_labels=labels, aux_values=values
    )


def explain(model: GuidedLatentModel, dataset: xr.Dataset, out: str | os.PathLike) -> dict:
    """Write ``traversal.png``, ``scatter.png``, ``calibration.png``, ``history.png`` and
    ``report.json`` into ``out``.

    The scatter's first column is each auxiliary against its reported mean with 90% intervals;
    ``calibration.png`` is the empirical coverage of the reported 50/80/90/95% intervals against
    their nominal level. Returns the alignment report (see
    :func:`pyro_dlatent.report.alignment_report`).
    """
    from pyro_dlatent.report import alignment_report, save_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = alignment_report(model, dataset)
    save_report(report, out / "report.json")
    plots.save_figure(traversal_figure(model), out / "traversal.png")
    encoding = model.encode(dataset)
    latents = torch.cat([encoding.z_aux_loc, encoding.z_rec_loc], dim=-1).cpu().numpy()
    scaler = model.scaler
    labels = [f"{n} [{u}]" if u else n for n, u in zip(scaler.names, scaler.units, strict=True)]
    predicted = model.predict_aux(dataset, quantiles=(0.05, 0.95))
    columns = [
        np.stack([predicted[f"{name}{suffix}"].values for name in scaler.names], -1)
        for suffix in ("", "_q05", "_q95")
    ]
    fig = plots.aux_scatter(
        latents,
        data.aux_array(dataset),
        aux_labels=labels,
        aux_dim=model.aux_dim,
        predicted=tuple(columns),
    )
    plots.save_figure(fig, out / "scatter.png")
    variables = report["variables"]
    coverage = {
        label: [variables[name]["calibration"]["coverage"].get(str(level)) for level in LEVELS]
        for name, label in zip(scaler.names, labels, strict=True)
    }
    coverage = {k: [np.nan if v is None else v for v in values] for k, values in coverage.items()}
    fig = plots.calibration_curve(LEVELS, coverage, n=report["n"])
    plots.save_figure(fig, out / "calibration.png")
    if model.history:
        plots.save_figure(plots.training_history(model.history), out / "history.png")
    return report


def process_rank() -> int:
    """This process's rank in an initialized :mod:`torch.distributed` process group, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder's lock."""


@contextlib.contextmanager
def run_lock(out: str | os.PathLike) -> Iterator[None]:
    """Hold an OS-level lock on the run folder ``out`` (``out/.lock``) for the block.

    A second writer fails at once with :class:`RunFolderBusy` naming the holder's process id. The
    operating system releases the lock when its holder exits, however it exits, so a crash leaves
    no stale lock; a lock file left by one is reported and taken over.
    """
    import fcntl

    path = Path(out) / LOCK_FILE
    handle = open(path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RunFolderBusy(
                f"run folder {str(out)!r} is in use by process {holder}; wait for it to finish "
                "or use another --out"
            ) from None
        handle.seek(0)
        previous = handle.read().strip()
        if previous:
            warnings.warn(
                f"run folder {str(out)!r}: process {previous} ended without releasing it (a "
                "crash or a kill); taking it over",
                stacklevel=3,
            )
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            handle.flush()
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    finally:
        handle.close()


def _snapshot(out: Path, backup: Path) -> list[Path]:
    """Hard links (copies where the file system has none) of ``out``'s files under ``backup``."""
    saved = []
    for path in sorted(out.rglob("*")):
        relative = path.relative_to(out)
        if (
            not path.is_file()
            or path.is_symlink()
            or relative.parts[0] == backup.name
            or path.name == LOCK_FILE
            or path.name.endswith(".tmp")
        ):
            continue
        target = backup / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
        saved.append(relative)
    return saved


def _roll_back(out: Path, backup: Path, saved: list[Path]) -> None:
    """Put ``out`` back as :func:`_snapshot` found it: new files removed, replaced ones restored."""
    kept = set(saved)
    for path in sorted(out.rglob("*"), reverse=True):
        relative = path.relative_to(out)
        if relative.parts[0] == backup.name or path.name == LOCK_FILE:
            continue
        if path.is_file() or path.is_symlink():
            if relative not in kept:
                path.unlink(missing_ok=True)
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    for relative in saved:
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        os.replace(backup / relative, out / relative)


@contextlib.contextmanager
def owned_folder(
    out: str | os.PathLike, *, keep: Callable[[], bool] | None = None
) -> Iterator[Path]:
    """Create (if needed) and lock the results folder ``out`` while a command writes it.

    The lock is :func:`run_lock`; temporary files that a killed write left are removed first. When
    the block fails (other than by Ctrl-C, which keeps what is done), the folder is put back as
    it was unless ``keep()`` says it now holds something worth keeping (an interrupted training's
    checkpoint): a folder this call created is removed, and in one that existed the files the
    command added are removed and the ones it replaced restored (from hard links taken at the
    start, so the snapshot costs no copy).
    """
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    backup = out / f".before-{os.getpid()}"
    held = False
    try:
        with run_lock(out):
            held = True
            for stray in out.glob(".*.tmp"):
                stray.unlink(missing_ok=True)
            for old in out.glob(".before-*"):
                shutil.rmtree(old, ignore_errors=True)  # a crashed command's snapshot
            saved = None if created else _snapshot(out, backup)
            try:
                yield out
            except KeyboardInterrupt:
                raise
            except BaseException:
                if saved is not None and not (keep is not None and keep()):
                    _roll_back(out, backup, saved)
                raise
            finally:
                shutil.rmtree(backup, ignore_errors=True)
    except KeyboardInterrupt:
        raise
    except BaseException:
        if created and not (keep is not None and keep()):
            shutil.rmtree(out, ignore_errors=True)
        elif held:
            (out / LOCK_FILE).unlink(missing_ok=True)  # ours, released: not another's
        raise
    (out / LOCK_FILE).unlink(missing_ok=True)


def train_run(
    dataset: xr.Dataset,
    out: str | os.PathLike,
    *,
    model: str = "auxvae",
    model_kwargs: Mapping[str, Any] | None = None,
    fit_kwargs: Mapping[str, Any] | None = None,
    held_out: xr.Dataset | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> GuidedLatentModel:
    """Train ``model`` on ``dataset`` into the run folder ``out``.

    The folder receives ``run.json`` (the settings), ``checkpoints/last.pt`` after every epoch
    (so an interrupted run continues with ``resume=True``), ``model.pt``, ``history.json`` and
    what :func:`explain` writes, computed on ``held_out`` when given, else on the validation part
    the fit held out (never on images it trained on).

    The folder is owned while the run lasts (:func:`run_lock`). A finished run, or an interrupted
    one, is kept unless ``overwrite`` (or, for an interrupted one, ``resume``); a run that fails
    (other than by Ctrl-C) before its first epoch is saved removes the folder it created.

    In a :mod:`torch.distributed` process group every process calls this with the same
    arguments and trains its part (see :class:`~pyro_dlatent.training.Trainer`); process 0 alone
    owns and writes the folder, the others only read a checkpoint to resume.
    """
    out = Path(out)
    model_kwargs = dict(model_kwargs or {})
    fit_kwargs = dict(fit_kwargs or {})
    checkpoints = out / CHECKPOINT_DIR
    if not (overwrite or resume):
        if (out / MODEL_FILE).exists():
            raise FileExistsError(
                f"run folder {str(out)!r} already holds a trained model; pass overwrite "
                "(--overwrite) to replace it"
            )
        if (checkpoints / CHECKPOINT_NAME).exists():
            raise FileExistsError(
                f"run folder {str(out)!r} holds an interrupted run ({CHECKPOINT_DIR}/"
                f"{CHECKPOINT_NAME}); pass resume (--resume) to continue it or overwrite "
                "(--overwrite) to start over"
            )
    if process_rank() != 0:
        net = build_model(model, dataset, **model_kwargs)
        net.fit(dataset, checkpoint_dir=checkpoints, resume=True if resume else None, **fit_kwargs)
        return net
    with owned_folder(out, keep=(checkpoints / CHECKPOINT_NAME).exists):
        for stray in checkpoints.glob(".*.tmp"):
            stray.unlink(missing_ok=True)  # left by a checkpoint write that a kill interrupted
        if overwrite and not resume:
            (checkpoints / CHECKPOINT_NAME).unlink(missing_ok=True)
        settings = {"model": model, "model_kwargs": model_kwargs, "fit_kwargs": fit_kwargs}
        if not (resume and (out / "run.json").exists()):
            write_json(settings, out / "run.json")
        net = build_model(model, dataset, **model_kwargs)
        net.fit(dataset, checkpoint_dir=checkpoints, resume=True if resume else None, **fit_kwargs)
        net.save(out / MODEL_FILE)
        write_json(net.history, out / "history.json")
        if held_out is None:
            fraction = fit_kwargs.get("val_fraction", 0.1)
            held_out = (
                data.split(dataset, fraction, seed=fit_kwargs.get("seed", 0))[1]
                if fraction > 0
                else dataset
            )
        explain(net, held_out, out)
    return net
