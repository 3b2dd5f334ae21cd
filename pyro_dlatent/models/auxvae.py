"""Aux-VAE: a variational autoencoder whose first latent coordinates track named auxiliaries.

.. math::

    z_{aux} \\mid u \\sim \\mathcal{N}(\\tilde u, \\tau^2 I), \\quad
    z_{rec} \\sim \\mathcal{N}(0, I), \\quad
    x_{std} \\mid z \\sim \\mathcal{N}(D_\\theta(z_{aux}, z_{rec}), \\sigma^2),

with an image-only encoder as guide and the alignment and decorrelation penalties of
:class:`~pyro_dlatent.models.base.GuidedLatentModel`. ``sigma`` is learned (one global value or
one per pixel). The paper's log-MSE reconstruction loss is available as ``likelihood="logmse"``:
the Gaussian log-likelihood with the per-image variance profiled out,

.. math::

    \\log p(x \\mid z) \\approx -\\tfrac{D}{2}\\bigl(\\log(2\\pi\\,\\mathrm{MSE}(x, D_\\theta(z)))
    + 1\\bigr), \\qquad D = H W,

written as a ``pyro.factor`` surrogate (the maximum over sigma of the Gaussian likelihood).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np
import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
import xarray as xr
from torch import nn

from pyro_dlatent.data.io import check_dataset, make_scaler
from pyro_dlatent.latent import AuxScaler
from pyro_dlatent.models.base import (
    IMAGE_SITE,
    OBS_SITE,
    GuidedLatentModel,
    _initialization_rng,
)
from pyro_dlatent.models.config import ModelConfig, check_choice
from pyro_dlatent.models.generator import FrozenGenerator
from pyro_dlatent.nn import ConvDecoder
from pyro_dlatent.residual import ResidualField
from pyro_dlatent.validation import check_int

__all__ = ["LIKELIHOODS", "MEAN_EPOCHS", "OBS_SCALES", "AuxVAE", "AuxVAEConfig", "DecoderGenerator"]

MEAN_EPOCHS = 10
"""Passes of :meth:`AuxVAE.fit_collapsed_prior` over the training images."""

LIKELIHOODS = ("gaussian", "logmse")
"""Reconstruction likelihoods of :class:`AuxVAE`."""

OBS_SCALES = ("global", "pixel")
"""Shapes of the learned Gaussian observation scale: one value, or one per pixel."""

_MIN_OBS_SCALE = 1e-3


def _pixel_moments(image: xr.DataArray, chunk: int = 1024) -> tuple[float, float]:
    """Mean and sd of all pixels, in float64, a chunk of samples at a time (checks finiteness)."""
    count, total, total_sq = 0, 0.0, 0.0
    shift = None
    for start in range(0, image.shape[0], chunk):
        block = np.asarray(image[start : start + chunk].values, dtype=np.float64)
        if not np.isfinite(block).all():
            raise ValueError("dataset['image'] contains non-finite values")
        if shift is None:
            shift = float(block.mean())  # shifted sums keep the variance free of cancellation
        block = block - shift
        count += block.size
        total += float(block.sum())
        total_sq += float((block * block).sum())
    mean = total / count
    return shift + mean, math.sqrt(max(total_sq / count - mean**2, 0.0))


class _Decoder(nn.Module):
    """Decoder network plus the learned Gaussian observation scale (standardized units)."""

    def __init__(
        self, latent_dim: int, image_size: int, *, learn_scale: str | None, **net_kwargs: Any
    ) -> None:
        super().__init__()
        self.net = ConvDecoder(latent_dim, image_size, **net_kwargs)
        if learn_scale is not None:
            shape = () if learn_scale == "global" else (image_size, image_size)
            # softplus(raw) + floor = 1 at initialization: the sd of standardized images.
            raw = math.log(math.expm1(1.0 - _MIN_OBS_SCALE))
            self.raw_scale = nn.Parameter(torch.full(shape, raw))
        else:
            self.raw_scale = None

    def scale(self) -> torch.Tensor:
        """Observation sd, shape ``()`` or ``(H, W)``."""
        return F.softplus(self.raw_scale) + _MIN_OBS_SCALE


class DecoderGenerator(FrozenGenerator):
    """Frozen deterministic generator ``G(z_aux, z_rec) -> images`` of a trained :class:`AuxVAE`.

    The decoder mean in the dataset's units, with the interface of
    :class:`~pyro_dlatent.models.generator.FrozenGenerator`.

    Attributes
    ----------
    residual_field : ResidualField or None
        What :meth:`conditional_mean` leaves in the training images (the collapsed deep prior's
        residual), if the model fitted one.
    mean_net : nn.Module or None
        The network of :meth:`conditional_mean` (``AuxVAE.mean_decoder``), if fitted.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        aux_dim: int,
        residual_dim: int,
        image_size: int,
        image_loc: torch.Tensor,
        image_scale: torch.Tensor,
        scaler: AuxScaler,
        tau: float,
        residual_field: ResidualField | None = None,
        mean_net: nn.Module | None = None,
    ) -> None:
        super().__init__(
            aux_dim=aux_dim,
            residual_dim=residual_dim,
            image_size=image_size,
            scaler=scaler,
            tau=tau,
        )
        self.net = net
        self.residual_field = residual_field
        self.mean_net = mean_net
        self.register_buffer("image_loc", image_loc.detach().clone())
        self.register_buffer("image_scale", image_scale.detach().clone())
        self.freeze()

    def images(self, latent: torch.Tensor) -> torch.Tensor:
        return self.net(latent) * self.image_scale + self.image_loc

    def conditional_mean(self, z_aux: torch.Tensor) -> torch.Tensor:
        """``E[image | u]`` at standardized auxiliaries ``z_aux`` ``(*batch, aux_dim)``.

        The mean network where the model fitted one, else the decoder at ``z_rec = 0``.
        """
        if self.mean_net is None:
            return super().conditional_mean(z_aux)
        batch = z_aux.shape[:-1]
        latent = torch.cat([z_aux, z_aux.new_zeros(*batch, self.residual_dim)], dim=-1).reshape(
            -1, self.aux_dim + self.residual_dim
        )
        images = self.mean_net(latent) * self.image_scale + self.image_loc
        return images.reshape(*batch, self.image_size, self.image_size)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AuxVAEConfig(ModelConfig):
    """Options of :class:`AuxVAE`: those of :class:`~pyro_dlatent.models.config.ModelConfig`
    (with ``tau=0.05`` and ``decor_form="square"`` by default) and the decoder's.

    Parameters
    ----------
    likelihood : {"gaussian", "logmse"}
        Gaussian with a learned scale, or the paper's log-MSE surrogate.
    obs_scale : {"global", "pixel"}
        Shape of the learned Gaussian scale (ignored for ``"logmse"``).
    harmonics : int
        Fourier features ``sin(f z_j), cos(f z_j)``, ``f = 1..harmonics``, of the guided
        coordinates at the decoder's input (:class:`~pyro_dlatent.nn.ConvDecoder`; 0: none): they
        let the decoder draw from the guided coordinates alone what it would otherwise take
        from the residual block.
    """

    tau: float = 0.05
    decor_form: str = "square"
    likelihood: str = "gaussian"
    obs_scale: str = "global"
    harmonics: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.likelihood, "likelihood", LIKELIHOODS)
        check_choice(self.obs_scale, "obs_scale", OBS_SCALES)
        self._set("harmonics", check_int(self.harmonics, "harmonics", 0))


class AuxVAE(GuidedLatentModel):
    """Variational autoencoder on the guided/residual latent split.

    Build it from a dataset with :meth:`from_dataset` (fits the scaler and the image
    standardization), or from a fitted :class:`~pyro_dlatent.latent.AuxScaler`; train with
    :meth:`fit`; use :meth:`encode`, :meth:`predict_aux`, :meth:`decode`, :meth:`reconstruct`,
    :meth:`generate` and :meth:`generator`.

    Parameters
    ----------
    scaler : AuxScaler
        Fitted scaler of the auxiliaries, in latent order.
    image_size : int
        ``H = W``, a power of two ``>= 16``.
    residual_dim : int, optional
        Dimension of ``z_rec`` (default 4).
    config : AuxVAEConfig, optional
    **options
        Fields of :class:`AuxVAEConfig` by name.

    Notes
    -----
    The defaults (:class:`AuxVAEConfig`, and in :attr:`fit_defaults` an Adam rate of ``3e-3``
    decaying exponentially to ``1e-4``) were chosen on the built-in ``sources`` data; the
    documentation's results page holds the scores and the command that reproduces them.

    Examples
    --------
    >>> from pyro_dlatent.data import from_arrays
    >>> rng = np.random.default_rng(0)
    >>> ds = from_arrays(rng.normal(size=(64, 16, 16)), {"a": rng.normal(size=64)})
    >>> vae = AuxVAE.from_dataset(ds, residual_dim=2, width=8, hidden=32, seed=0)
    >>> vae.encode(ds).z_aux_loc.shape
    torch.Size([64, 1])
    """

    _networks = ("encoder", "decoder")
    residual_after_fit = True
    _collapsed_parts = ("mean_decoder",)
    fit_defaults: ClassVar[Mapping[str, float]] = MappingProxyType(
        {"lr": 3e-3, "lr_decay": 1.0 / 30.0}
    )

    config_class = AuxVAEConfig

    def __init__(
        self,
        scaler: AuxScaler,
        image_size: int,
        residual_dim: int | None = None,
        *,
        config: AuxVAEConfig | None = None,
        **options: Any,
    ) -> None:
        super().__init__(scaler, image_size, residual_dim, config=config, **options)
        opts = self.options
        self.likelihood_kind = opts.likelihood
        with _initialization_rng(None if opts.seed is None else opts.seed + 1):
            self.decoder = _Decoder(
                self.latent_dim,
                image_size,
                learn_scale=opts.obs_scale if opts.likelihood == "gaussian" else None,
                width=opts.width,
                hidden=opts.hidden,
                depth=opts.depth,
                activation=opts.activation,
                norm=opts.norm,
                harmonics=opts.harmonics,
                harmonic_inputs=self.aux_dim,
            )
        # E[image | u] for the collapsed deep prior (see fit_collapsed_prior); not trained by SVI.
        self.mean_decoder = copy.deepcopy(self.decoder.net).requires_grad_(False)

    @classmethod
    def from_dataset(cls, dataset: xr.Dataset, residual_dim: int = 4, **kwargs: Any) -> AuxVAE:
        """An Aux-VAE sized for ``dataset``, with its scaler and image standardization fitted on it.

        Parameters
        ----------
        dataset : xarray.Dataset
            Square images ``(sample, y, x)`` with side a power of two ``>= 16``, and auxiliaries
            (their ``units``/``transform`` attributes go into the scaler).
        residual_dim : int
        **kwargs
            Any other constructor argument (``image_loc``/``image_scale`` override the fitted
            standardization).
        """
        ds = check_dataset(dataset, name="dataset")
        image = ds["image"]
        height, width = image.shape[1:]
        if height != width:
            raise ValueError(f"dataset images must be square, got {height}x{width}")
        loc, scale = _pixel_moments(image)
        if not scale > 0:
            raise ValueError("dataset['image'] is constant; it cannot be standardized")
        kwargs.setdefault("image_loc", loc)
        kwargs.setdefault("image_scale", scale)
        return cls(make_scaler(ds), height, residual_dim, **kwargs)

    # ------------------------------------------------------------------ likelihood
    def _decode_std(self, z_aux: torch.Tensor, z_rec: torch.Tensor) -> torch.Tensor:
        z = torch.cat([z_aux, z_rec], dim=-1)
        lead = z.shape[:-1]  # (batch,), or (*draws, batch) under Predictive / ELBO particles
        images = self.decoder.net(z.reshape(-1, z.shape[-1]))
        return images.reshape(*lead, *images.shape[-2:])

    def _mean_inputs(self, z_aux: torch.Tensor) -> torch.Tensor:
        return torch.cat([z_aux, z_aux.new_zeros(z_aux.shape[0], self.residual_dim)], dim=-1)

    def _conditional_mean(self, z_aux: torch.Tensor) -> torch.Tensor:
        z_aux = z_aux.to(device=self.device, dtype=torch.float32)
        with torch.no_grad():
            return self.mean_decoder(self._mean_inputs(z_aux)) * self.image_scale + self.image_loc

    def fit_collapsed_prior(
        self,
        data: xr.Dataset | Any,
        *,
        seed: int | None = None,
        epochs: int = MEAN_EPOCHS,
        batch_size: int = 128,
        lr: float = 2e-3,
    ) -> ResidualField:
        """Fit the conditional mean ``E[image | u]`` and the residual field of the collapsed prior.

        The decoder at a zero residual block is not that mean (the residual block carries part
        of every image, and the guided coordinates it was trained at are the encoder's, not the
        standardized auxiliaries), so :attr:`mean_decoder`, a copy of it, is fitted to the
        images by least squares on their standardized auxiliaries (``epochs`` passes of Adam,
        one-cycle rate peaking at ``lr``), then :meth:`fit_residual_field` measures what it
        leaves. :meth:`fit` calls this on its training part.
        """
        data = data if hasattr(data, "mask") else self.prepare(data, name="data")
        epochs = check_int(epochs, "epochs", 1)
        batch_size = check_int(batch_size, "batch_size", 1)
        rows = self._complete_rows(data)
        if rows is None:
            return self.residual_field
        net = self.mean_decoder
        net.load_state_dict(self.decoder.net.state_dict())
        inputs = self._mean_inputs(data.aux[rows].to(self.device, torch.float32))
        targets = (data.images[rows].to(self.device) - self.image_loc) / self.image_scale
        steps = math.ceil(len(rows) / batch_size)
        optimizer = torch.optim.Adam(net.parameters(), lr=lr / 10)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=epochs * steps
        )
        order = torch.Generator().manual_seed(0 if seed is None else int(seed))
        net.requires_grad_(True).train()
        try:
            with torch.enable_grad():
                for _ in range(epochs):
                    for batch in torch.randperm(len(rows), generator=order).split(batch_size):
                        batch = batch.to(self.device)
                        loss = (net(inputs[batch]) - targets[batch]).square().mean()
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        schedule.step()
        finally:
            net.requires_grad_(False).eval()
        return self.fit_residual_field(data)

    def likelihood(
        self, images_std: torch.Tensor | None, z_aux: torch.Tensor, z_rec: torch.Tensor
    ) -> None:
        """Gaussian (learned scale) or log-MSE likelihood of the standardized images.

        Generating (``images_std=None``): the Gaussian likelihood draws the image; the log-MSE
        one, which has no noise model, gives the decoder mean.
        """
        self._register("decoder", self.decoder)
        mean = self._decode_std(z_aux, z_rec)
        if images_std is None:
            if self.likelihood_kind == "gaussian":
                x = pyro.sample(OBS_SITE, dist.Normal(mean, self.decoder.scale()).to_event(2))
            else:
                x = pyro.deterministic(OBS_SITE, mean, event_dim=2)
            pyro.deterministic(IMAGE_SITE, x * self.image_scale + self.image_loc, event_dim=2)
        elif self.likelihood_kind == "gaussian":
            pyro.sample(
                OBS_SITE, dist.Normal(mean, self.decoder.scale()).to_event(2), obs=images_std
            )
        else:
            pixels = self.image_size**2
            mse = (mean - images_std).pow(2).mean(dim=(-2, -1)).clamp_min(1e-12)
            pyro.factor(OBS_SITE, -0.5 * pixels * (torch.log(2 * math.pi * mse) + 1.0))

    def _evaluation_terms(
        self, images: torch.Tensor, encoded: tuple[torch.Tensor, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Sum of per-image reconstruction MSE (standardized units) at the encoder means."""
        z_aux, z_rec = encoded[0].split([self.aux_dim, self.residual_dim], dim=-1)
        error = self._decode_std(z_aux, z_rec) - self.standardize_images(images)
        return {"recon_mse": error.pow(2).mean(dim=(-2, -1)).sum()}

    # ------------------------------------------------------------------ user verbs
    def decode(self, z_aux: torch.Tensor, z_rec: torch.Tensor) -> torch.Tensor:
        """Decoder mean in the dataset's image units.

        Parameters
        ----------
        z_aux : Tensor, shape ``(n, aux_dim)``
            Guided coordinates (standardized units).
        z_rec : Tensor, shape ``(n, residual_dim)``

        Returns
        -------
        Tensor, shape ``(n, H, W)``, on the model's device
        """
        z_aux = torch.as_tensor(z_aux, dtype=torch.float32, device=self.device)
        z_rec = torch.as_tensor(z_rec, dtype=torch.float32, device=self.device)
        if z_aux.dim() != 2 or z_aux.shape[1] != self.aux_dim:
            raise ValueError(f"z_aux must have shape (n, {self.aux_dim}), got {tuple(z_aux.shape)}")
        if z_rec.dim() != 2 or z_rec.shape != (z_aux.shape[0], self.residual_dim):
            raise ValueError(
                f"z_rec must have shape ({z_aux.shape[0]}, {self.residual_dim}), "
                f"got {tuple(z_rec.shape)}"
            )
        was_training = self.training
        self.eval()
        with torch.no_grad():
            images = self._decode_std(z_aux, z_rec) * self.image_scale + self.image_loc
        self.train(was_training)
        return images

    def reconstruct(self, images: Any, *, batch_size: int = 256) -> torch.Tensor:
        """Decode the posterior means of ``images``; shape ``(n, H, W)``, dataset units."""
        encoding = self.encode(images, batch_size=batch_size)
        return self.decode(encoding.z_aux_loc, encoding.z_rec_loc)

    def generate(
        self, aux: Mapping[str, Any] | None = None, num: int = 1, *, seed: int | None = None
    ) -> torch.Tensor:
        """Images generated at auxiliaries given in physical units.

        ``z_aux ~ N(u~, tau^2)`` at the given auxiliaries (the marginal for names left out),
        ``z_rec ~ N(0, I)``, image = decoder mean (no pixel noise).

        Parameters
        ----------
        aux : mapping of name to scalar or 1-d array, optional
            For example ``{"mass": 1e14}`` or ``{"mass": [1e14, 1e15], "c": 4.0}``.
        num : int
            Images per auxiliary row.
        seed : int, optional
            Seed of a private generator.

        Returns
        -------
        Tensor, shape ``(n * num, H, W)``
            Row ``i * num + j`` is draw ``j`` at auxiliary row ``i``; dataset units.
        """
        z_aux, z_rec = self.sample_latent(aux, check_int(num, "num", 1), seed=seed)
        return self.decode(z_aux, z_rec)

    def generator(self) -> DecoderGenerator:
        """A frozen copy of the decoder as ``G(z_aux, z_rec) -> images`` (dataset units)."""
        return DecoderGenerator(
            copy.deepcopy(self.decoder.net),
            aux_dim=self.aux_dim,
            residual_dim=self.residual_dim,
            image_size=self.image_size,
            image_loc=self.image_loc,
            image_scale=self.image_scale,
            scaler=copy.deepcopy(self.scaler),
            tau=self.tau,
            residual_field=(
                copy.deepcopy(self.residual_field) if bool(self.residual_field.fitted) else None
            ),
            mean_net=(
                copy.deepcopy(self.mean_decoder) if bool(self.residual_field.fitted) else None
            ),
        )
