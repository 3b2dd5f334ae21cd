"""Training of the guided-latent models: a frozen fit configuration and the trainer that runs it.

:class:`FitConfig` holds what a fit is (optimizer, schedule, split, weight averaging), validated
once and recorded in every epoch checkpoint so that a resumed run can be checked against it.
:class:`Trainer` runs stochastic variational inference on a :class:`GuidedLatentModel`'s Pyro
model and guide: ``Trace_ELBO`` with a clipped Adam (one fused update over all parameters),
steps that refuse a non-finite loss or gradient, an optional exponential moving average of the
weights, an RNG stream per epoch (so a resumed run ends where the uninterrupted one would) and,
once training ends, the model's post-fit calibrations. ``GuidedLatentModel.fit`` is the usual
entry point; it builds the config from its arguments and the class's ``fit_defaults``.

When a :mod:`torch.distributed` process group is initialized (as under ``torchrun``), the
trainer runs data parallel: every process steps on its share of each batch, and
:class:`~torch.nn.parallel.DistributedDataParallel` averages the gradients (see
:class:`Trainer`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
import xarray as xr
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from pyro_dlatent.checkpoint import load_checkpoint
from pyro_dlatent.data.io import check_dataset, load, split
from pyro_dlatent.distributed import ELBOLoss as _ELBOLoss
from pyro_dlatent.distributed import World as _World
from pyro_dlatent.optim import ForeachClippedAdam as _ForeachClippedAdam
from pyro_dlatent.optim import WeightAverage
from pyro_dlatent.utils import release_free_memory
from pyro_dlatent.validation import check_float, check_int

if TYPE_CHECKING:
    from pyro_dlatent.models.base import GuidedLatentModel, ModelTensors

__all__ = [
    "CHECKPOINT_NAME",
    "FitConfig",
    "NonFiniteLossError",
    "Trainer",
    "WeightAverage",
    "dataset_fingerprint",
    "forked_rng",
]

CHECKPOINT_NAME = "last.pt"
"""File name of the epoch checkpoint in a fit's ``checkpoint_dir``."""
_FINGERPRINT_PIXELS = 2**22
"""Pixels hashed at a time by :func:`dataset_fingerprint` (16 MiB of float32)."""
POST_FIT_ROWS = 8192
"""Training images a fit read chunk by chunk loads for its post-fit calibrations (a seeded
subset, as many as the package's studies train on), so those steps hold a bounded part of the
dataset however large it is."""
_SETTINGS_BEFORE = {
    "ema_decay": 0.0,
    "data_workers": 2,
}  # fit settings added since, as checkpoints without them ran


class NonFiniteLossError(FloatingPointError):
    """Training produced a non-finite loss or gradient; the parameters were not updated.

    Attributes
    ----------
    epoch, step : int
        Where it happened (0-based).
    checkpoint : Path or None
        The last good checkpoint, if one was written.
    """

    def __init__(self, message: str, *, epoch: int, step: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.epoch = epoch
        self.step = step
        self.checkpoint = checkpoint


class _NonFiniteStep(FloatingPointError):
    pass


class _GuardedSVI(SVI):
    """``SVI`` whose step refuses to apply a non-finite loss or gradient (it raises instead).

    With ``replicas`` (the ELBO as a :class:`_ELBOLoss` wrapped in ``DistributedDataParallel``)
    the loss goes through it, so the gradients are averaged over the processes, and the step's
    loss is averaged too: every process sees the same loss and gradients and takes the same
    decision.
    """

    def __init__(self, *args: Any, replicas: DistributedDataParallel | None = None) -> None:
        super().__init__(*args)
        self.replicas = replicas

    def step(self, *args: Any, **kwargs: Any) -> float:
        with poutine.trace(param_only=True) as capture:
            if self.replicas is None:
                loss = self.loss_and_grads(self.model, self.guide, *args, **kwargs)
            else:
                loss = self._replicated_loss_and_grads(*args, **kwargs)
        params = {site["value"].unconstrained() for site in capture.trace.nodes.values()}
        grads = [p.grad for p in params if p.grad is not None]
        finite = math.isfinite(loss)
        if finite and grads:
            finite = bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
        if not finite:
            torch._foreach_zero_(grads)
            raise _NonFiniteStep(f"loss {loss}")
        self.optim(params)
        torch._foreach_zero_(grads)
        return loss

    def _replicated_loss_and_grads(self, *args: Any, **kwargs: Any) -> float:
        loss = self.replicas(*args, **kwargs)
        loss.backward()
        total = loss.detach().to(torch.float64)
        dist.all_reduce(total)
        return total.item() / dist.get_world_size()


@contextlib.contextmanager
def forked_rng(device: torch.device) -> Iterator[None]:
    """Run a block with private copies of the CPU (and ``device``'s) RNG state."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index], device_type="cuda"):
            yield
    else:
        with torch.random.fork_rng(devices=[]):
            yield


def reseed(seed: int, device: torch.device) -> None:
    """Seed torch's global CPU generator (and ``device``'s) with ``seed``."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The RNG seed of ``epoch`` of a fit seeded by ``seed`` (independent streams per epoch).

    ``rank`` > 0 gives process ``rank`` of a data-parallel fit its own stream for the epoch's
    Monte Carlo noise; rank 0 draws from the epoch's stream itself.
    """
    entropy = [seed, epoch] if rank == 0 else [seed, epoch, rank]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def dataset_fingerprint(ds: xr.Dataset) -> str:
    """SHA-256 of a dataset's images and auxiliaries: a resumed fit must see the same data.

    Read a block of images at a time, so a dataset on disk is hashed without being loaded.
    """
    digest = hashlib.sha256()
    images = ds["image"]
    step = max(1, _FINGERPRINT_PIXELS // max(1, math.prod(images.shape[1:])))
    for start in range(0, images.sizes["sample"], step):
        block = images.isel(sample=slice(start, start + step)).values
        digest.update(np.ascontiguousarray(block, dtype=np.float32).tobytes())
    for name in ds.attrs["aux_names"]:
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(ds[name].values, dtype=np.float64).tobytes())
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """What a fit is; checked on construction, recorded in its checkpoints.

    Attributes
    ----------
    epochs : int
        Total number of epochs (a resumed run continues up to it).
    batch_size : int
        Minibatch size (>= 2, since the penalties are batch correlations); an epoch splits the
        shuffled training set into ``ceil(n / batch_size)`` near-equal batches. In a
        data-parallel fit it is the global batch, of which each of the ``W`` processes steps on
        a near-equal share (at least 2 images each).
    lr : float
        Initial Adam learning rate.
    lr_decay : float
        Learning rate at the last step divided by ``lr``, in ``(0, 1]``: the rate decays
        exponentially, by ``lr_decay ** (1 / (epochs * batches_per_epoch))`` per step
        (``ClippedAdam``'s ``lrd``); 1 keeps it constant.
    val_fraction : float
        Held-out fraction in ``[0, 1)``: scored every epoch and, once the fit ends, the images
        the model's uncertainty is calibrated on; 0 disables both.
    seed : int
        Seed of the split, the shuffling and the Monte Carlo noise.
    clip_norm : float or None
        Each gradient component is clipped to ``[-clip_norm, clip_norm]`` (``None``: off).
    eval_batch_size : int, optional
        Batch size of the validation pass and the post-fit calibrations; default
        ``batch_size``, so that neither needs more memory than a training step.
    ema_decay : float
        Decay in ``[0, 1)`` of an exponential moving average of the networks' weights, updated
        after every step; the model keeps the average when the fit ends (the live weights stay
        in the checkpoint). 0 turns it off.
    data_workers : int
        DataLoader worker processes that read a dataset stored on disk chunk by chunk (see
        :class:`Trainer`); the order of its minibatches depends on it. 0 reads in the training
        process.
    """

    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    lr_decay: float = 1.0
    val_fraction: float = 0.1
    seed: int = 0
    clip_norm: float | None = 10.0
    eval_batch_size: int | None = None
    ema_decay: float = 0.0
    data_workers: int = 2

    def __post_init__(self) -> None:
        checked = {
            "epochs": check_int(self.epochs, "epochs", 1),
            "batch_size": check_int(self.batch_size, "batch_size", 2),
            "lr": check_float(self.lr, "lr", minimum=0.0, strict=True),
            "lr_decay": check_float(self.lr_decay, "lr_decay", minimum=0.0, strict=True),
            "seed": check_int(self.seed, "seed", 0),
            "eval_batch_size": check_int(
                self.batch_size if self.eval_batch_size is None else self.eval_batch_size,
                "eval_batch_size",
                1,
            ),
            "ema_decay": check_float(self.ema_decay, "ema_decay", minimum=0.0, strict=False),
            "data_workers": check_int(self.data_workers, "data_workers", 0),
        }
        if checked["lr_decay"] > 1.0:
            raise ValueError(f"expected 0 < lr_decay <= 1, got {self.lr_decay!r}")
        fraction = self.val_fraction
        if not (isinstance(fraction, int | float) and not isinstance(fraction, bool)):
            raise ValueError(f"expected 0 <= val_fraction < 1, got {fraction!r}")
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"expected 0 <= val_fraction < 1, got {fraction!r}")
        checked["val_fraction"] = float(fraction)
        if self.clip_norm is not None:
            checked["clip_norm"] = check_float(
                self.clip_norm, "clip_norm", minimum=0.0, strict=True
            )
        if checked["ema_decay"] >= 1.0:
            raise ValueError(f"expected 0 <= ema_decay < 1, got {self.ema_decay!r}")
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def settings(self) -> dict[str, Any]:
        """What a resumed run must share with the run it continues.

        All but ``epochs`` and ``eval_batch_size``: every epoch reseeds, so how the validation
        pass is batched does not change the training.
        """
        free = {"epochs", "eval_batch_size"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in free}


class _Streamed:
    """The training part of a dataset on disk, read chunk by chunk by DataLoader workers.

    Minibatches come from a :class:`~pyro_dlatent.data.stream.MinibatchStream` (chunk-wise
    shuffles, sharded over the processes of a data-parallel fit: each steps on its own
    ``ceil(batch_size / W)``-image batches) with the model's scaler applied in the workers.
    """

    def __init__(
        self, model: GuidedLatentModel, train: xr.Dataset, config: FitConfig, world: Any
    ) -> None:
        from torch.utils.data import DataLoader

        from pyro_dlatent.data.stream import MinibatchStream, StandardizeAux

        size = 1 if world is None else world.size
        self.model, self.train, self.seed = model, train, config.seed
        self.stream = MinibatchStream(
            train,
            math.ceil(config.batch_size / size),
            seed=config.seed,
            rank=0 if world is None else world.rank,
            world_size=size,
            aux_names=model.scaler.names,
            transform=StandardizeAux(model.scaler),
        )
        self.num_samples = self.stream.num_samples
        workers = config.data_workers
        self.loader = DataLoader(
            self.stream, batch_size=None, num_workers=workers, persistent_workers=workers > 0
        )

    def epoch(
        self, epoch: int, device: torch.device
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]]:
        """``(images, aux, mask, index)`` of each step of ``epoch``."""
        self.stream.set_epoch(epoch)
        for batch in self.loader:
            images, aux, mask = batch.tensors(device)
            yield images, aux, mask, torch.from_numpy(batch.index).to(device)

    def close(self) -> None:
        """Stop the worker processes."""
        self.loader = None

    def post_fit_rows(self) -> ModelTensors:
        """A seeded subset of :data:`POST_FIT_ROWS` training images, loaded."""
        n = self.num_samples
        rows = np.arange(n)
        if n > POST_FIT_ROWS:
            rng = np.random.default_rng((self.seed, 1))
            rows = np.sort(rng.choice(n, POST_FIT_ROWS, replace=False))
        return self.model.prepare(self.train.isel(sample=rows), name="dataset")


class Trainer:
    """Runs a :class:`FitConfig` on a model: SVI epochs, checkpoints, resume, post-fit steps.

    When a :mod:`torch.distributed` process group is initialized, the fit is data parallel over
    its ``W`` processes (each calls :meth:`fit` with the same model config, dataset and
    settings, which is checked):

    - every process shuffles the training set with the epoch's seed, so all hold the same order,
      and steps on its near-equal share of each batch (``batch_size`` is the global batch);
      the ELBO of a share is still scaled to the whole training set;
    - the loss is wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`, which starts
      every process from process 0's weights and averages the gradients, so the processes keep
      identical weights and optimizer states; a step is refused on all of them when its
      averaged loss or gradient is not finite;
    - the alignment and decorrelation penalties are batch correlations over each process's
      share (not over the global batch);
    - process 0 alone scores the validation part, draws the progress bar and writes the
      checkpoints; every epoch's history record is process 0's, sent to all;
    - the post-fit calibrations run on every process, then process 0's model state is sent to
      all, so every process returns the same model;
    - a resumed fit loads the same checkpoint on every process (a file system they share).

    Process 0 draws its Monte Carlo noise as a single process does and the others from streams
    of their own (:func:`epoch_seed` with their rank), so a fit is reproducible for a given
    seed and number of processes, and one process in a group trains exactly as without one.

    Parameters
    ----------
    model : GuidedLatentModel
    config : FitConfig
    """

    def __init__(self, model: GuidedLatentModel, config: FitConfig) -> None:
        if not isinstance(config, FitConfig):
            raise ValueError(f"config must be a FitConfig, got {type(config).__name__}")
        self.model, self.config = model, config
        self._world: _World | None = None

    def fit(
        self,
        dataset: xr.Dataset,
        *,
        progress: bool = True,
        device: str | torch.device | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        resume: str | os.PathLike | bool | None = None,
    ) -> list[dict[str, Any]]:
        """Train on ``dataset``; arguments and returns as :meth:`GuidedLatentModel.fit`.

        In a data-parallel fit a CUDA ``device`` without an index means the process's current
        device (``torch.cuda.set_device``).
        """
        model, config = self.model, self.config
        world = self._world = _World.current()
        lead = world is None or world.rank == 0
        if isinstance(dataset, str | os.PathLike):
            dataset = load(dataset, chunks={})  # lazy: read chunk by chunk below
        ds = check_dataset(dataset, name="dataset")
        device = model.device if device is None else torch.device(device)
        if world is not None and device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        model.to(device)
        if config.val_fraction > 0:
            train_ds, val_ds = split(ds, config.val_fraction, seed=config.seed)
        else:
            train_ds, val_ds = ds, None
        val = None if val_ds is None else model.prepare(val_ds)
        train: ModelTensors | _Streamed
        if ds["image"].chunks is None:
            train = model.prepare(train_ds)
            n = train.images.shape[0]
            num_batches = math.ceil(n / config.batch_size)
        else:
            train = _Streamed(model, train_ds, config, world)
            n, num_batches = train.num_samples, len(train.stream)
        settings = config.settings()
        checkpoint = None
        if checkpoint_dir is not None:
            if lead:
                Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
            checkpoint = Path(checkpoint_dir) / CHECKPOINT_NAME
        resume_path = resume_checkpoint(resume, checkpoint)
        # read by checkpoints, resume and the processes' agreement check only: a fit without
        # them does not pass over a stored dataset once more to hash it
        needed = checkpoint is not None or resume_path is not None or world is not None
        fingerprint = dataset_fingerprint(ds) if needed else None

        if world is not None and world.size > 1 and n // num_batches < 2 * world.size:
            raise ValueError(
                f"batch_size={config.batch_size} is the global batch: shared by {world.size} "
                f"processes, its {n // num_batches} images leave some process fewer than 2 per "
                f"step; use batch_size >= {2 * world.size}"
            )
        total = config.epochs * num_batches
        first_share = config.ema_decay ** (total - 1) if config.ema_decay > 0 else 0.0
        if first_share > 0.05 and lead:
            warnings.warn(
                f"ema_decay={config.ema_decay!r} leaves {first_share:.0%} of the first step's "
                f"weights in the average after this fit's {total} steps; lower it so that "
                "1 / (1 - ema_decay) steps is a small part of the run",
                stacklevel=3,  # Trainer.fit <- GuidedLatentModel.fit <- the caller
            )
        model._forget_params()
        model._optim = _ForeachClippedAdam(
            lr=config.lr,
            lrd=config.lr_decay ** (1.0 / total),
            clip_norm=math.inf if config.clip_norm is None else config.clip_norm,
        )
        history: list[dict[str, Any]] = []
        saved_average = None
        if resume_path is not None:
            history, saved_average = self._restore(resume_path, settings, fingerprint)
        if world is not None:
            world.check_same(
                {
                    "model": {k: v for k, v in model.config.items() if k != "seed"},
                    "fit settings": settings,
                    "dataset": fingerprint,
                    "epochs done": len(history),
                }
            )
        model.history = history
        model._average = None
        if config.ema_decay > 0:
            model._average = WeightAverage(model, config.ema_decay)
            if saved_average is not None:
                model._average.restore(saved_average, f"resume checkpoint {str(resume_path)!r}")
        elbo = Trace_ELBO()
        replicas = None
        if world is not None:  # starts every process from process 0's weights and buffers
            replicas = DistributedDataParallel(
                _ELBOLoss(model, elbo),
                device_ids=None if device.type == "cpu" else [device],
                forward_sync_buffers=False,  # buffers change only after the fit
            )
        svi = _GuardedSVI(model.model, model.guide, model._optim, elbo, replicas=replicas)

        extra = {"fit": settings, "dataset_sha256": fingerprint}
        bar = tqdm(
            total=total,
            initial=min(len(history), config.epochs) * num_batches,
            disable=not progress or not lead,
            desc=f"{type(model).__name__} fit",
            unit="step",
        )
        try:
            with forked_rng(device):
                for epoch in range(len(history), config.epochs):
                    record = self._train_epoch(svi, train, epoch, num_batches, bar, checkpoint)
                    if val is not None and lead:
                        evaluation = model.evaluate(val, batch_size=config.eval_batch_size)
                        record.update({f"val_{k}": v for k, v in evaluation.items()})
                    if world is not None:
                        record = world.from_lead(record)
                    history.append(record)
                    if checkpoint is not None and lead:
                        model.save(checkpoint, extra={"epoch": len(history), **extra})
                    bar.set_postfix(
                        {k: f"{record[k]:.4g}" for k in ("elbo", "val_elbo") if k in record}
                    )
        finally:
            bar.close()
            model.eval()
        del svi, replicas
        streamed = isinstance(train, _Streamed)
        if streamed:  # a dataset larger than memory: keep each phase's peak its own
            train.close()
            release_free_memory()
            train = train.post_fit_rows()
        self._after_fit(train, val, release=streamed)
        if checkpoint is not None and lead:
            model.save(checkpoint, extra={"epoch": len(history), **extra})
        if world is not None:  # after the save: no process returns before the file is whole
            world.share_state(model)
        return history

    def _after_fit(
        self, train: ModelTensors, val: ModelTensors | None, *, release: bool = False
    ) -> None:
        """The model's post-fit steps: generation map, uncertainty, collapsed prior.

        ``release``: give freed memory back to the system before the collapsed prior's fit.
        """
        model, batch_size = self.model, self.config.eval_batch_size
        complete = train.images.shape[0] if train.mask is None else int(train.mask.all(1).sum())
        calibrated = model.calibrate_after_fit and complete >= model.aux_dim + 2
        if model._average is not None:
            # the live weights' own maps, kept for load(..., weights="live")
            if calibrated:
                model.calibrate_generation(train, batch_size=batch_size)
                model._average.generation = model._generation_state()
            if val is not None:
                model.calibrate_uncertainty(train, val, batch_size=batch_size)
                model._average.uncertainty = model._uncertainty_state()
            model._average.swap()
        if calibrated:
            model.calibrate_generation(train, batch_size=batch_size)
        else:
            model.reset_generation()
        if val is not None:
            model.calibrate_uncertainty(train, val, batch_size=batch_size)
        else:
            model.aux_calibration.reset()
        if model.residual_after_fit:
            if release:
                release_free_memory()
            model.fit_collapsed_prior(train, seed=self.config.seed)

    def _tensor_batches(
        self, train: ModelTensors, num_batches: int, device: torch.device
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]]:
        """``(images, aux, mask, index)`` of each step of an epoch on tensors in memory.

        The epoch's RNG must be seeded: the shuffled order of the training rows is then the
        same on every process, cut into ``num_batches`` near-equal batches, of which a
        data-parallel process takes its near-equal share. The order is drawn here, before the
        first batch is used.
        """
        batches = torch.tensor_split(
            torch.randperm(train.images.shape[0], device=device), num_batches
        )
        world = self._world
        if world is not None:
            batches = tuple(torch.tensor_split(b, world.size)[world.rank] for b in batches)
        mask = train.mask
        return (
            (train.images[i], train.aux[i], None if mask is None else mask[i], i) for i in batches
        )

    def _train_epoch(
        self,
        svi: _GuardedSVI,
        train: ModelTensors | _Streamed,
        epoch: int,
        num_batches: int,
        bar: Any,
        checkpoint: Path | None,
    ) -> dict[str, Any]:
        model, world = self.model, self._world
        device = model.device
        reseed(epoch_seed(self.config.seed, epoch), device)
        model.train()
        start = time.perf_counter()
        loss_sum = 0.0
        penalty_sum = torch.zeros(2, device=device)
        if isinstance(train, _Streamed):
            n, batches = train.num_samples, train.epoch(epoch, device)
        else:
            n = train.images.shape[0]
            batches = self._tensor_batches(train, num_batches, device)
        if world is not None and world.rank > 0:
            reseed(epoch_seed(self.config.seed, epoch, world.rank), device)
        for step, (images, aux, mask, index) in enumerate(batches):
            encoded = model.encoder_params(images)
            try:
                loss = svi.step(images, aux, mask, num_data=n, subsample=index, encoded=encoded)
            except (_NonFiniteStep, ValueError) as err:
                # With validation on, a NaN/inf distribution parameter raises ValueError
                # ("... found invalid values") before any loss exists: the same divergence.
                if isinstance(err, ValueError) and "invalid values" not in str(err):
                    raise
                kept = checkpoint if checkpoint is not None and checkpoint.exists() else None
                where = f"; last good checkpoint: {str(kept)!r}" if kept is not None else ""
                cause = err if isinstance(err, _NonFiniteStep) else "distribution parameter"
                raise NonFiniteLossError(
                    f"non-finite {cause} at epoch {epoch}, step {step}; parameters were not "
                    f"updated by this step{where}. Try a smaller lr or a clip_norm.",
                    epoch=epoch,
                    step=step,
                    checkpoint=kept,
                ) from err
            if model._average is not None:
                model._average.update()
            with torch.no_grad():
                penalty_sum += torch.stack(model.penalties(encoded[0], aux, mask))
            loss_sum += loss
            bar.update(1)
        if world is not None:  # the processes' mean of their shares' penalties
            dist.all_reduce(penalty_sum)
            penalty_sum /= world.size
        alignment, decorrelation = (penalty_sum / num_batches).tolist()
        objective = -loss_sum / (num_batches * n)
        elbo = objective + model.weighted_penalty(alignment, decorrelation)
        return {
            "epoch": epoch,
            "elbo": elbo,
            "objective": objective,
            "alignment": alignment,
            "decorrelation": decorrelation,
            "tau": model.tau,
            "time_s": time.perf_counter() - start,
        }

    def _restore(
        self, path: Path, settings: dict[str, Any], fingerprint: str | None
    ) -> tuple[list[dict[str, Any]], Any]:
        """Load a resume checkpoint after checking it was this config on this dataset."""
        model = self.model
        ckpt = load_checkpoint(path, kind=type(model).__name__, map_location=model.device)
        what = f"resume checkpoint {str(path)!r}"
        ignore = {"seed"}
        mine = {k: v for k, v in model.config.items() if k not in ignore}
        # an option added after the checkpoint was written counts at its default
        defaults = model.config_class().to_dict()
        theirs = {k: v for k, v in {**defaults, **ckpt.config}.items() if k not in ignore}
        theirs = {k: v for k, v in theirs.items() if k in mine or k in ckpt.config}
        if mine != theirs:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ValueError(f"{what} was written by a model with a different config {diff}")
        if ckpt.scaler != model.scaler.state_dict():
            raise ValueError(f"{what} was written with a different auxiliary scaler")
        fit = ckpt.extra.get("fit", {})
        for key, value in settings.items():
            saved = fit.get(key, _SETTINGS_BEFORE.get(key))
            if saved != value:
                raise ValueError(
                    f"{what} was trained with {key}={saved!r}; pass {key}={saved!r} "
                    f"to resume it (got {value!r})"
                )
        if ckpt.extra.get("dataset_sha256") != fingerprint:
            raise ValueError(f"{what} was trained on a different dataset")
        model._load_state(ckpt.state, what, ckpt.format_version)
        if settings.get("ema_decay", 0.0) > 0 and "average" not in ckpt.state:
            raise ValueError(f"{what} holds no averaged weights")
        return [dict(h) for h in ckpt.history], ckpt.state.get("average")


def resume_checkpoint(
    resume: str | os.PathLike | bool | None, checkpoint: Path | None
) -> Path | None:
    """The checkpoint file a fit's ``resume`` argument names, or ``None`` for a fresh start."""
    if resume is None or resume is False:
        return None
    if resume is True:
        if checkpoint is None:
            raise ValueError("resume=True needs a checkpoint_dir")
        return checkpoint if checkpoint.exists() else None
    path = Path(resume)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise ValueError(f"resume checkpoint {str(path)!r} does not exist")
    return path
