"""Shared base of the guided-latent models: encoder ``q(z | x)``, latent split, penalties, training.

A subclass supplies only the likelihood of an image given its latent code
(:meth:`GuidedLatentModel.likelihood`) and a frozen generator
(:meth:`GuidedLatentModel.generator`); everything else lives here:

.. math::

    \\text{model:}\\quad z_{aux} \\mid u \\sim \\mathcal{N}(\\tilde u, \\tau^2 I), \\quad
    z_{rec} \\sim \\mathcal{N}(0, I), \\quad x \\sim p_\\theta(x \\mid z_{aux}, z_{rec}),

    \\text{guide:}\\quad q_\\phi(z \\mid x) = \\mathcal{N}(\\mu_\\phi(x), \\mathrm{diag}\\,
    \\sigma_\\phi(x)^2),

with the encoder seeing the image only, so that :meth:`~GuidedLatentModel.encode` is an
estimator of the auxiliaries with uncertainty. The model also carries the two penalties of the
Aux-VAE paper as factors on the encoder means :math:`\\mu = (\\mu_{aux}, \\mu_{rec})`,

.. math::

    \\log f = -N H W \\bigl(w_{align}\\, \\mathcal{A}(\\mu_{aux}, \\tilde u)
                   + w_{decor}\\, \\mathcal{D}(\\mu_{rec}, \\tilde u)\\bigr),

(sites ``"alignment"`` and ``"decorrelation"``, see :mod:`pyro_dlatent.penalties`), so
``Trace_ELBO`` maximizes ``ELBO - N H W (w_align A + w_decor D)`` where ``N`` is the number of
training images and ``H W`` the pixels per image. The weights are thus *per pixel*: the image
likelihood is a sum over pixels, so a weight keeps its balance against reconstruction at any
image size and dataset size. The ELBO alone is reported by adding the weighted penalties back
(training) or by hiding the factor sites with ``poutine.block`` (evaluation).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np
import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
import xarray as xr
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.nn import PyroModule

from pyro_dlatent.calibration import (
    AuxCalibration,
)
from pyro_dlatent.checkpoint import FORMAT_VERSION
from pyro_dlatent.data.io import check_dataset
from pyro_dlatent.latent import AUX_SITE, REC_SITE, AuxScaler, LatentSplit
from pyro_dlatent.models import generation as _generation
from pyro_dlatent.models import persistence
from pyro_dlatent.models.config import ModelConfig
from pyro_dlatent.models.generation import (
    GenerationMap,
    GenerationSampling,
)
from pyro_dlatent.models.prediction import AuxPrediction
from pyro_dlatent.models.tensors import Encoding, ModelTensors
from pyro_dlatent.nn import ConvEncoder, check_image_size
from pyro_dlatent.optim import ForeachClippedAdam, WeightAverage
from pyro_dlatent.penalties import (
    alignment_penalty,
    decorrelation_penalty,
)
from pyro_dlatent.residual import ResidualField, fit_residuals
from pyro_dlatent.training import (
    FitConfig,
    NonFiniteLossError,
    Trainer,
    forked_rng,
)
from pyro_dlatent.validation import check_int

__all__ = [
    "ALIGN_SITE",
    "DECOR_SITE",
    "IMAGE_SITE",
    "MAX_STANDARDIZED",
    "OBS_SITE",
    "Encoding",
    "GuidedLatentModel",
    "ModelTensors",
    "NonFiniteLossError",
]

OBS_SITE = "x"
"""Name of the observation site (or likelihood factor) of the images."""
IMAGE_SITE = "image"
"""Deterministic site of a generated image in the dataset's units (``model(None, aux)``)."""
MAX_STANDARDIZED = 10.0
"""Largest standardized auxiliary :meth:`GuidedLatentModel.model` accepts, in training sds."""
ALIGN_SITE = "alignment"
"""Name of the alignment-penalty factor site."""
DECOR_SITE = "decorrelation"
"""Name of the decorrelation-penalty factor site."""

_MIN_SCALE = 1e-4
_INSTANCES = itertools.count(1)


@contextlib.contextmanager
def _initialization_rng(seed: int | None) -> Iterator[None]:
    """Network initialization from ``seed`` without touching the caller's global RNG."""
    if seed is None:
        yield
        return
    with forked_rng(torch.device("cpu")):
        torch.default_generator.manual_seed(seed)
        yield


def _check_standardized(aux: Any, mask: Any) -> None:
    """Refuse auxiliaries far outside the training range: physical units passed by mistake."""
    if not isinstance(aux, torch.Tensor) or not aux.is_floating_point():
        return  # LatentSplit.check_aux names the problem
    values = aux.detach()
    if isinstance(mask, torch.Tensor) and mask.shape == values.shape:
        values = values[mask]
    values = values[torch.isfinite(values)]
    if values.numel() and float(values.abs().max()) > MAX_STANDARDIZED:
        raise ValueError(
            f"aux holds a value {float(values.abs().max()):.4g} standard deviations from the "
            f"training mean (> {MAX_STANDARDIZED:g}); the model takes standardized auxiliaries: "
            "pass model.scaler.transform(physical values)"
        )


class GuidedLatentModel(AuxPrediction, GenerationSampling, PyroModule):
    """Base of the models on the guided/residual latent split (Aux-VAE, DL-CFM).

    Owns the :class:`~pyro_dlatent.latent.AuxScaler`, the
    :class:`~pyro_dlatent.latent.LatentSplit` (sites ``"z_aux"``, ``"z_rec"``), the image-only
    encoder of the guide, the alignment and decorrelation factors, training with SVI
    (:meth:`fit`), evaluation, encoding, auxiliary prediction in physical units and
    checkpoints. A subclass implements :meth:`likelihood` (which must register its networks with
    :meth:`_register`), :meth:`generator`, and optionally :meth:`_evaluation_terms`; its options
    are the fields of its :attr:`config_class` (a subclass of
    :class:`~pyro_dlatent.models.config.ModelConfig`).

    Images are standardized with one global location and scale (``image_loc``,
    ``image_scale``) before the networks see them; likelihoods and ELBOs are those of the
    standardized images (the ELBO in the dataset's units differs by the constant
    ``-H W log(image_scale)`` per image).

    Parameters
    ----------
    scaler : AuxScaler
        Fitted scaler of the auxiliaries (names, units, transforms, training mean/std).
    image_size : int
        ``H = W``, a power of two ``>= 16``.
    residual_dim : int, optional
        Dimension of the residual block ``z_rec`` (default: the config's).
    config : ModelConfig, optional
        Options as one object of the class's :attr:`config_class`.
    **options
        Options by name, the fields of :attr:`config_class`
        (:class:`~pyro_dlatent.models.config.ModelConfig` here); they replace those of
        ``config``.
    """

    _networks: tuple[str, ...] = ("encoder",)
    """Attributes holding the plain ``nn.Module`` networks that :meth:`_register` registers."""

    fit_defaults: ClassVar[Mapping[str, float]] = MappingProxyType({"lr": 1e-3, "lr_decay": 1.0})
    """Learning-rate settings :meth:`fit` uses when its ``lr``/``lr_decay`` are left at None."""

    config_class: ClassVar[type[ModelConfig]] = ModelConfig
    """The options this class takes."""

    calibrate_after_fit: ClassVar[bool] = False
    """Whether :meth:`fit` ends with :meth:`calibrate_generation` on its training part."""
    residual_after_fit: ClassVar[bool] = False
    """Whether :meth:`fit` ends with :meth:`fit_collapsed_prior` (the collapsed deep prior's)."""
    _collapsed_parts: ClassVar[tuple[str, ...]] = ()
    """Submodules that only the collapsed deep prior uses (optional in older checkpoints)."""

    def __init__(
        self,
        scaler: AuxScaler,
        image_size: int,
        residual_dim: int | None = None,
        *,
        config: ModelConfig | None = None,
        **options: Any,
    ) -> None:
        super().__init__(name=f"{type(self).__name__}_{next(_INSTANCES)}")
        if residual_dim is not None:
            options["residual_dim"] = residual_dim
        opts = self.config_class.build(config, **options)
        if not isinstance(scaler, AuxScaler):
            raise TypeError(f"scaler must be an AuxScaler, got {type(scaler).__name__}")
        if not scaler.fitted:
            raise ValueError("scaler must be fitted (call scaler.fit or use make_scaler)")
        check_image_size(image_size)
        self.options = opts
        self.scaler = scaler
        self.image_size = image_size
        self.align_weight = opts.align_weight
        self.decor_weight = opts.decor_weight
        self.decor_form = opts.decor_form
        self.degree = opts.degree
        self.split = LatentSplit(
            scaler.dim, opts.residual_dim, tau=opts.tau, learn_tau=opts.learn_tau
        )
        self.register_buffer("image_loc", torch.tensor(opts.image_loc))
        self.register_buffer("image_scale", torch.tensor(opts.image_scale))
        # Generation map of the guided block (see calibrate_generation); unfitted until then.
        self.generation = GenerationMap(scaler.dim)
        # Predictive distribution of the auxiliaries given an image (see calibrate_uncertainty).
        self.aux_calibration = AuxCalibration(scaler.dim, opts.residual_dim)
        # What G(u~, 0) leaves in the training fields (see fit_residual_field).
        self.residual_field = ResidualField(image_size, scaler.dim)
        with _initialization_rng(opts.seed):
            self.encoder = ConvEncoder(
                image_size,
                2 * self.split.latent_dim,
                width=opts.width,
                hidden=opts.hidden,
                depth=opts.depth if opts.encoder_depth is None else opts.encoder_depth,
                activation=opts.activation,
                norm=opts.norm,
            )
        self.history: list[dict[str, Any]] = []
        self._optim: ForeachClippedAdam | None = None
        self._average: WeightAverage | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        persistence.MODEL_CLASSES[cls.__name__] = cls

    # ------------------------------------------------------------------ properties
    @property
    def aux_dim(self) -> int:
        """Number of guided coordinates (one per auxiliary)."""
        return self.split.aux_dim

    @property
    def residual_dim(self) -> int:
        """Number of residual coordinates."""
        return self.split.residual_dim

    @property
    def latent_dim(self) -> int:
        """``aux_dim + residual_dim``."""
        return self.split.latent_dim

    @property
    def aux_names(self) -> list[str]:
        """Auxiliary names, in latent order."""
        return list(self.scaler.names)

    @property
    def tau(self) -> float:
        """Current prior sd of the guided block."""
        return float(self.split.tau.detach())

    @property
    def device(self) -> torch.device:
        """Device of the model's tensors."""
        return self.image_loc.device

    @property
    def config(self) -> dict[str, Any]:
        """JSON-able constructor arguments (with ``"class"``), enough to rebuild the model."""
        return {
            "class": type(self).__name__,
            "image_size": self.image_size,
            **self.options.to_dict(),
        }

    @property
    def _penalized(self) -> bool:
        return self.align_weight > 0 or self.decor_weight > 0

    # ------------------------------------------------------------------ pieces of the model
    def _register(self, name: str, module: torch.nn.Module) -> None:
        """Register the network ``self.<name>`` with Pyro under this instance's unique prefix.

        ``name`` must be the attribute name and be listed in :attr:`_networks`.
        """
        pyro.module(f"{self._pyro_name}.{name}", module)

    def _forget_params(self) -> None:
        """Drop this instance's param-store entries so that its own tensors get registered anew."""
        store = pyro.get_param_store()
        prefix = f"{self._pyro_name}."
        for name in [n for n in store.keys() if n.startswith(prefix)]:
            del store[name]

    def standardize_images(self, images: torch.Tensor) -> torch.Tensor:
        """``(images - image_loc) / image_scale``, shape preserved."""
        return (images - self.image_loc) / self.image_scale

    def encoder_params(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Location and scale of ``q(z | x)``.

        Parameters
        ----------
        images : Tensor, shape ``(batch, H, W)``
            Images in the dataset's units.

        Returns
        -------
        loc, scale : Tensor, shape ``(batch, latent_dim)``
            The first ``aux_dim`` columns belong to ``z_aux``; ``scale >= 1e-4``.
        """
        out = self.encoder(self.standardize_images(images))
        loc, raw = out.split(self.latent_dim, dim=-1)
        return loc, F.softplus(raw) + _MIN_SCALE

    def penalties(
        self, loc: torch.Tensor, aux: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Alignment and decorrelation penalties of encoder means on a batch.

        Parameters
        ----------
        loc : Tensor, shape ``(batch, latent_dim)``
            Encoder means.
        aux : Tensor, shape ``(batch, aux_dim)``
            Standardized auxiliaries.
        mask : Tensor of bool, shape ``(batch, aux_dim)``, optional

        Returns
        -------
        alignment, decorrelation : Tensor, shape ``()``
        """
        mu_aux, mu_rec = loc.split([self.aux_dim, self.residual_dim], dim=-1)
        return (
            alignment_penalty(mu_aux, aux, mask, degree=self.degree),
            decorrelation_penalty(mu_rec, aux, mask, degree=self.degree, form=self.decor_form),
        )

    def weighted_penalty(self, alignment: float, decorrelation: float) -> float:
        """Per-image penalty subtracted from the ELBO: ``H W (w_align A + w_decor D)``."""
        return self.image_size**2 * (
            self.align_weight * alignment + self.decor_weight * decorrelation
        )

    def _plate(
        self, batch: int, num_data: int | None, subsample: torch.Tensor | None, device: torch.device
    ) -> pyro.plate:
        if num_data is None:
            return pyro.plate("data", batch)
        if subsample is None:
            subsample = torch.arange(batch, device=device)
        return pyro.plate("data", num_data, subsample=subsample)

    def likelihood(
        self, images_std: torch.Tensor | None, z_aux: torch.Tensor, z_rec: torch.Tensor
    ) -> None:
        """Observe the standardized images given the latent code (implemented by subclasses).

        Called inside the ``"data"`` plate of :meth:`model`; it must register its networks
        with :meth:`_register` and emit the site :data:`OBS_SITE` (a ``pyro.sample`` with
        ``obs=`` or a ``pyro.factor`` surrogate) with batch shape ``(*lead, batch)``; with
        ``images_std=None`` it generates the image instead and also records it in the
        dataset's units as :data:`IMAGE_SITE`. ``z_aux`` and ``z_rec`` may carry leading
        dimensions ``lead`` (parallel predictive draws, vectorized particles).

        Parameters
        ----------
        images_std : Tensor, shape ``(batch, H, W)``, or None
        z_aux : Tensor, shape ``(*lead, batch, aux_dim)``
        z_rec : Tensor, shape ``(*lead, batch, residual_dim)``
        """
        raise NotImplementedError(f"{type(self).__name__} must implement likelihood()")

    def generator(self) -> torch.nn.Module:
        """A frozen, deterministic ``G(z_aux, z_rec) -> images`` (implemented by subclasses).

        The module maps ``z_aux`` ``(batch, aux_dim)`` and ``z_rec`` ``(batch, residual_dim)``
        to images ``(batch, H, W)`` in the dataset's units and has the attributes ``aux_dim``,
        ``residual_dim``, ``image_size`` and ``scaler``.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement generator()")

    def _evaluation_terms(
        self, images: torch.Tensor, encoded: tuple[torch.Tensor, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Per-batch *sums* of extra per-image metrics for :meth:`evaluate` (none here)."""
        return {}

    # ------------------------------------------------------------------ model and guide
    def model(
        self,
        images: torch.Tensor | None,
        aux: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        *,
        num_data: int | None = None,
        subsample: torch.Tensor | None = None,
        encoded: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Generative model with the penalty factors.

        ``model(None, aux)`` is the generative model alone: it draws the latent code given the
        auxiliaries and then the image, site :data:`OBS_SITE` in standardized units and
        :data:`IMAGE_SITE` in the dataset's units, so ``Predictive(vae.model, num_samples=k)
        (None, aux)`` returns ``k`` images per row of ``aux``. Extra leading batch dimensions
        (``Predictive(..., parallel=True)``, vectorized ELBO particles) pass through.

        Parameters
        ----------
        images : Tensor, shape ``(batch, H, W)``, or None
            Images in the dataset's units; ``None`` generates them (``aux`` then sets the
            batch).
        aux : Tensor, shape ``(batch, aux_dim)``, optional
            Standardized auxiliaries (``scaler.transform`` of physical values; a value beyond
            :data:`MAX_STANDARDIZED` sds is refused as physical units passed by mistake);
            ``None`` uses the marginal prior of ``z_aux`` and drops the penalties.
        mask : Tensor of bool, shape ``(batch, aux_dim)``, optional
            True where ``aux`` is observed.
        num_data : int, optional
            Size of the full dataset when ``images`` is a minibatch: the ``"data"`` plate and
            the penalty factors are scaled by ``num_data / batch`` and ``num_data``.
        subsample : Tensor of int, shape ``(batch,)``, optional
            Indices of the minibatch in the dataset (recorded by the plate).
        encoded : (loc, scale), optional
            Encoder output for ``images``, computed once per step by :meth:`fit` and shared with
            the guide; computed here when absent.
        """
        if aux is not None:
            _check_standardized(aux, mask)
        if images is None:
            if aux is None:
                raise ValueError("model(None, aux) generates images: aux sets the batch, got None")
            batch, device, images_std = aux.shape[0], self.device, None
        else:
            batch, device = images.shape[0], images.device
            images_std = self.standardize_images(images)
        with self._plate(batch, num_data, subsample, device):
            z_aux, z_rec = self.split(aux, mask)
            self.likelihood(images_std, z_aux, z_rec)
        if images is None or aux is None or not self._penalized:
            return
        if encoded is None:
            self._register("encoder", self.encoder)
            encoded = self.encoder_params(images)
        alignment, decorrelation = self.penalties(encoded[0], aux, mask)
        pixels = self.image_size**2
        with poutine.scale(scale=float(num_data if num_data is not None else batch)):
            if self.align_weight > 0:
                pyro.factor(ALIGN_SITE, -pixels * self.align_weight * alignment)
            if self.decor_weight > 0:
                pyro.factor(DECOR_SITE, -pixels * self.decor_weight * decorrelation)

    def guide(
        self,
        images: torch.Tensor,
        aux: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        *,
        num_data: int | None = None,
        subsample: torch.Tensor | None = None,
        encoded: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Amortized guide ``q(z_aux, z_rec | x)``: the encoder sees the images only.

        Takes the arguments of :meth:`model` (``aux`` and ``mask`` are ignored).
        """
        self._register("encoder", self.encoder)
        loc, scale = encoded if encoded is not None else self.encoder_params(images)
        k = self.aux_dim
        with self._plate(images.shape[0], num_data, subsample, images.device):
            pyro.sample(AUX_SITE, dist.Normal(loc[..., :k], scale[..., :k]).to_event(1))
            pyro.sample(REC_SITE, dist.Normal(loc[..., k:], scale[..., k:]).to_event(1))

    # ------------------------------------------------------------------ inputs
    def _as_images(self, images: Any, *, name: str = "images") -> torch.Tensor:
        """Validate images ``(n, H, W)`` and return them as float32 on the model's device."""
        if isinstance(images, xr.Dataset):
            if "image" not in images:
                raise ValueError(f"{name} is a Dataset without an 'image' variable")
            images = images["image"]
        if isinstance(images, xr.DataArray):
            images = images.values
        if isinstance(images, torch.Tensor):
            tensor = images.detach()
        else:
            try:
                array = np.asarray(images)
            except (TypeError, ValueError) as err:
                raise TypeError(f"{name} must be a numeric array of shape (n, H, W)") from err
            if array.dtype.kind not in "fiu":
                raise TypeError(f"{name} must be numeric, got dtype {array.dtype}")
            tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        if not (tensor.is_floating_point() or tensor.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a real tensor, got dtype {tensor.dtype}")
        size = self.image_size
        if tensor.dim() != 3 or tuple(tensor.shape[1:]) != (size, size):
            raise ValueError(
                f"{name} must have shape (n, {size}, {size}) for this model, "
                f"got {tuple(tensor.shape)}"
            )
        if tensor.shape[0] == 0:
            raise ValueError(f"{name} is empty")
        tensor = tensor.to(device=self.device, dtype=torch.float32)
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name} contains non-finite values")
        return tensor

    def prepare(self, dataset: xr.Dataset, *, name: str = "dataset") -> ModelTensors:
        """Validate a dataset and convert it to :class:`ModelTensors` on the model's device."""
        ds = check_dataset(dataset, name=name)
        names = list(ds.attrs["aux_names"])
        if sorted(names) != sorted(self.scaler.names):
            raise ValueError(
                f"{name} has auxiliaries {names}, but the model was built for {self.scaler.names}"
            )
        images = self._as_images(ds["image"].values, name=f"{name}['image']")
        physical = np.stack([ds[n].values.astype(np.float64) for n in self.scaler.names], -1)
        standardized = self.scaler.transform(physical)
        observed = np.isfinite(standardized)
        aux = torch.as_tensor(np.where(observed, standardized, 0.0), dtype=torch.float32)
        mask = None if observed.all() else torch.as_tensor(observed)
        return ModelTensors(
            images,
            aux.to(self.device),
            None if mask is None else mask.to(self.device),
        )

    # ------------------------------------------------------------------ training
    def fit(
        self,
        dataset: xr.Dataset | str | os.PathLike,
        *,
        epochs: int = 20,
        batch_size: int = 128,
        lr: float | None = None,
        lr_decay: float | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        progress: bool = True,
        device: str | torch.device | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        resume: str | os.PathLike | bool | None = None,
        clip_norm: float | None = 10.0,
        eval_batch_size: int | None = None,
        ema_decay: float = 0.0,
        data_workers: int = 2,
    ) -> list[dict[str, Any]]:
        """Train with SVI (``Trace_ELBO`` + ``ClippedAdam``) on minibatches of ``dataset``.

        Builds a :class:`~pyro_dlatent.training.FitConfig` from the arguments (``lr`` and
        ``lr_decay`` default to the class's :attr:`fit_defaults`) and runs a
        :class:`~pyro_dlatent.training.Trainer`.

        The dataset is split once (:func:`pyro_dlatent.data.split` with ``seed``) into training
        and validation parts and moved to ``device`` as tensors; minibatches are indexed there.
        A dataset on disk (a path, or a dataset opened lazily, ``data.load(path, chunks={})``)
        is not loaded: its training part is read chunk by chunk by ``data_workers`` processes
        (:class:`~pyro_dlatent.data.stream.MinibatchStream`; shuffled within a few chunks at a
        time), its validation part and a subset of
        :data:`~pyro_dlatent.training.POST_FIT_ROWS` training images are loaded for scoring and
        the post-fit calibrations. Epoch ``e`` draws its shuffling and Monte Carlo noise from a
        private RNG seeded by ``(seed, e)``, so a run resumed from an epoch checkpoint ends
        exactly where the uninterrupted run would; the caller's global RNG state is restored
        afterwards.

        Parameters
        ----------
        dataset : xarray.Dataset or path-like
            Images ``(sample, y, x)`` and the model's auxiliaries (``NaN`` = missing); a path
            to a ``.zarr`` store or netCDF file is read chunk by chunk.
        epochs : int
            Total number of epochs (a resumed run continues up to it).
        batch_size : int
            Minibatch size (>= 2, since the penalties are batch correlations); an epoch splits
            the shuffled training set into ``ceil(n / batch_size)`` near-equal batches. In a
            ``torch.distributed`` process group it is the global batch, shared among the
            processes (the penalties are then correlations over each process's share).
        lr : float, optional
            Initial Adam learning rate (default: the class's :attr:`fit_defaults`).
        lr_decay : float, optional
            Learning rate at the last step divided by ``lr``, in ``(0, 1]``: the rate decays
            exponentially, by ``lr_decay ** (1 / (epochs * batches_per_epoch))`` per step
            (``ClippedAdam``'s ``lrd``); 1 keeps it constant (default: the class's
            :attr:`fit_defaults`). A resumed run keeps the decay of the run it continues.
        val_fraction : float
            Held-out fraction in ``[0, 1)``: scored every epoch and, once the fit ends, the
            images :meth:`calibrate_uncertainty` calibrates :meth:`predict_aux` on (at least 20
            labelled ones are needed); 0 disables both.
        seed : int
            Seed of the split, the shuffling and the Monte Carlo noise.
        progress : bool
            Show a tqdm progress bar.
        device : str or torch.device, optional
            Where to train (default: where the model is); the model stays there afterwards.
        checkpoint_dir : path-like, optional
            Directory (created if needed) where ``last.pt`` is written atomically after every
            epoch: weights, optimizer state, history and fit settings.
        resume : path-like or bool, optional
            A checkpoint file (or a directory holding ``last.pt``) to continue from, or
            ``True`` to continue from ``checkpoint_dir/last.pt`` when it exists. Its config,
            dataset and settings must match this call.
        clip_norm : float or None
            Each gradient component is clipped to ``[-clip_norm, clip_norm]`` (``None``: off).
        eval_batch_size : int, optional
            Batch size of the validation pass and the post-fit calibrations (default
            ``batch_size``: neither then needs more memory than a training step).
        ema_decay : float
            Decay in ``[0, 1)`` of an exponential moving average of the networks' weights,
            updated after every step; when the fit ends the model keeps the average (the live
            weights stay in the checkpoint, so a resumed run continues from them). 0 turns it
            off. Validation during training scores the live weights. The average starts from
            the first step's weights, so its horizon ``1 / (1 - ema_decay)`` steps should be a
            small part of the run (a warning says when they keep over 5% of the average).
            ``load(..., weights="live")`` brings back the live weights with their own
            generation map. docs/history.md has its measurements on ``halos``.
        data_workers : int
            Processes that read a dataset on disk (0: this process); the minibatch order
            depends on it, so a resumed run must keep it.

        Returns
        -------
        list of dict
            :attr:`history`, one record per epoch: ``epoch``, ``elbo`` (per image, training
            minibatch estimate), ``objective`` (ELBO minus weighted penalties, per image),
            ``alignment``, ``decorrelation`` (training means), ``tau``, ``time_s``, and when
            validating ``val_elbo``, ``val_alignment``, ``val_decorrelation`` plus the
            subclass's metrics (``val_recon_mse`` for the Aux-VAE).

        Raises
        ------
        NonFiniteLossError
            When a step's loss or gradient is not finite; nothing is updated by that step and
            the last epoch checkpoint (if any) is kept.
        """
        defaults = self.fit_defaults
        config = FitConfig(
            epochs=epochs,
            batch_size=batch_size,
            lr=defaults["lr"] if lr is None else lr,
            lr_decay=defaults["lr_decay"] if lr_decay is None else lr_decay,
            val_fraction=val_fraction,
            seed=seed,
            clip_norm=clip_norm,
            eval_batch_size=eval_batch_size,
            ema_decay=ema_decay,
            data_workers=data_workers,
        )
        return Trainer(self, config).fit(
            dataset,
            progress=progress,
            device=device,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
        )

    # ------------------------------------------------------------------ evaluation
    def evaluate(
        self, data: xr.Dataset | ModelTensors, *, batch_size: int = 256
    ) -> dict[str, float]:
        """ELBO (alone), penalties and subclass metrics on a dataset, per image.

        The ELBO is a one-sample Monte Carlo estimate with the penalty factors hidden by
        ``poutine.block``; the penalties are computed once over the whole set of encoder means.

        Returns
        -------
        dict
            ``elbo``, ``alignment``, ``decorrelation``, ``objective`` and the subclass's metrics.
        """
        tensors = data if isinstance(data, ModelTensors) else self.prepare(data)
        batch_size = check_int(batch_size, "batch_size", 1)
        was_training = self.training
        self.eval()
        blocked = poutine.block(self.model, hide=[ALIGN_SITE, DECOR_SITE])
        estimator = Trace_ELBO()
        n = tensors.images.shape[0]
        elbo_sum = 0.0
        sums: dict[str, torch.Tensor] = {}
        locs = []
        with torch.no_grad():
            for start in range(0, n, batch_size):
                rows = slice(start, start + batch_size)
                images, aux = tensors.images[rows], tensors.aux[rows]
                mask = None if tensors.mask is None else tensors.mask[rows]
                encoded = self.encoder_params(images)
                elbo_sum -= estimator.loss(blocked, self.guide, images, aux, mask, encoded=encoded)
                locs.append(encoded[0])
                for key, value in self._evaluation_terms(images, encoded).items():
                    sums[key] = sums.get(key, 0.0) + value
            alignment, decorrelation = self.penalties(torch.cat(locs), tensors.aux, tensors.mask)
        self.train(was_training)
        elbo = elbo_sum / n
        result = {
            "elbo": elbo,
            "alignment": float(alignment),
            "decorrelation": float(decorrelation),
            "objective": elbo - self.weighted_penalty(float(alignment), float(decorrelation)),
        }
        result.update({key: float(value) / n for key, value in sums.items()})
        return result

    # ------------------------------------------------------------------ encoding
    def encode(self, images: Any, *, batch_size: int = 256) -> Encoding:
        """Posterior means and sds of ``z_aux`` and ``z_rec`` (standardized latent units).

        Parameters
        ----------
        images : array-like, Tensor, DataArray or Dataset, shape ``(n, H, W)``
            Images in the dataset's units.
        batch_size : int

        Returns
        -------
        Encoding
            Tensors on the model's device.
        """
        tensor = self._as_images(images)
        batch_size = check_int(batch_size, "batch_size", 1)
        was_training = self.training
        self.eval()
        with torch.no_grad():
            parts = [self.encoder_params(chunk) for chunk in tensor.split(batch_size)]
        self.train(was_training)
        loc = torch.cat([p[0] for p in parts])
        scale = torch.cat([p[1] for p in parts])
        k = self.aux_dim
        return Encoding(loc[:, :k], scale[:, :k], loc[:, k:], scale[:, k:])

    def _conditional_mean(self, z_aux: torch.Tensor) -> torch.Tensor:
        """The field the collapsed deep prior expects at standardized auxiliaries ``z_aux``."""
        return self.decode(z_aux, z_aux.new_zeros(z_aux.shape[0], self.residual_dim))

    def fit_collapsed_prior(
        self, data: xr.Dataset | ModelTensors, *, seed: int | None = None
    ) -> ResidualField:
        """Fit what the collapsed deep prior needs on ``data``: here :meth:`fit_residual_field`."""
        return self.fit_residual_field(data)

    def _complete_rows(self, data: ModelTensors) -> torch.Tensor | None:
        """Rows with every auxiliary, at most ``MAX_FIELDS`` (seeded subset); None if too few."""
        from pyro_dlatent.residual import MAX_FIELDS, MIN_FIELDS

        rows = torch.arange(data.images.shape[0])
        if data.mask is not None:
            rows = rows[data.mask.all(1)]
        if len(rows) < MIN_FIELDS:
            self.residual_field.reset()
            warnings.warn(
                f"only {len(rows)} images have every auxiliary (< {MIN_FIELDS}): no residual "
                "field, so no collapsed deep prior",
                stacklevel=3,
            )
            return None
        if len(rows) > MAX_FIELDS:
            generator = torch.Generator().manual_seed(0)
            rows = rows[torch.randperm(len(rows), generator=generator)[:MAX_FIELDS]].sort().values
        return rows

    @torch.no_grad()
    def fit_residual_field(
        self, data: xr.Dataset | ModelTensors, *, batch_size: int = 256
    ) -> ResidualField:
        """Fit :attr:`residual_field`, what ``G(u~, 0)`` leaves in ``data``'s images.

        ``G(u~, 0)`` is the model's conditional mean at the standardized auxiliaries (the
        decoder with a zero residual block, or a mean decoder fitted to it); rows with a missing
        auxiliary are left out, and at most :data:`~pyro_dlatent.residual.MAX_FIELDS` rows are
        read. The collapsed deep prior (:mod:`pyro_dlatent.inverse.collapsed`) integrates this
        Gaussian field out of an inverse problem.
        """
        data = data if isinstance(data, ModelTensors) else self.prepare(data, name="data")
        rows = self._complete_rows(data)
        if rows is None:
            return self.residual_field
        was_training = self.training
        self.eval()
        try:
            return fit_residuals(
                self.residual_field,
                self._conditional_mean,
                data.images[rows],
                data.aux[rows],
                batch_size=batch_size,
            )
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike, *, extra: Mapping[str, Any] | None = None) -> Path:
        """Write config, scaler, weights, optimizer state and history to one checkpoint file."""
        return persistence.save_model(self, path, extra=extra)

    def _optimizer_state(self) -> dict[str, Any]:
        """Optimizer state keyed by local parameter names (independent of the param store)."""
        return persistence.optimizer_state(self)

    def _load_state(self, state: dict[str, Any], what: str, version: int = FORMAT_VERSION) -> None:
        """Load a checkpoint's weights and optimizer state; older formats are migrated."""
        persistence.load_state(self, state, what, version)

    @classmethod
    def _upgrade_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """A format-1 checkpoint's constructor arguments, completed for options added since."""
        return config

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        weights: str | None = None,
    ) -> GuidedLatentModel:
        """Rebuild a model from :meth:`save` output (no pickled code is ever executed).

        Called on the base class, it returns an instance of whichever registered subclass
        wrote the file (:mod:`~pyro_dlatent.models.persistence`).

        Parameters
        ----------
        path : path-like
            Checkpoint file.
        device : str or torch.device, optional
            Where to put the model (default: the CPU).
        weights : {None, "averaged", "live"}
            Of a checkpoint written by :meth:`fit` with ``ema_decay > 0``, which of its two
            weight sets to load: the moving average or the weights the optimizer left.
            ``None`` loads what the file's model holds (the average once the fit has ended).
            The set comes with its own generation map when the fit calibrated one for it;
            otherwise (a checkpoint from the middle of a fit, or one written before the live
            map was kept) the map is reset with a warning, and :meth:`calibrate_generation`
            on the training images makes it again.
        """
        return persistence.load_model(cls, path, device=device, weights=weights)


def _legacy_buffer(old: str, new: str) -> property:
    """``model.<old>``, a generation-map buffer's name before the map was a module."""

    def get(self: GuidedLatentModel) -> torch.Tensor:
        warnings.warn(
            f"{type(self).__name__}.{old} is now {type(self).__name__}.generation.{new}",
            FutureWarning,
            stacklevel=2,
        )
        return getattr(self.generation, new)

    return property(get)


for _old, _new in _generation.LEGACY_NAMES.items():  # kept for one release
    setattr(GuidedLatentModel, _old, _legacy_buffer(_old, _new))

_MOVED = {
    "natural_spline_terms": _generation,
    "SPLINE_KNOT_QUANTILES": _generation,
    "SPLINE_MIN_IMAGES": _generation,
    "GENERATION_NEIGHBOURS": _generation,
    "upgrade_state": persistence,
}
"""Names this module had before the generation map and persistence became modules."""


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        module = _MOVED[name]
        warnings.warn(
            f"pyro_dlatent.models.base.{name} moved to {module.__name__}.{name}",
            FutureWarning,
            stacklevel=2,
        )
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
