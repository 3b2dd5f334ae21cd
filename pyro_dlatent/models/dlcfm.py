"""DL-CFM: conditional flow matching whose conditioning code is the guided/residual latent split.

.. math::

    z_{aux} \\mid u \\sim \\mathcal{N}(\\tilde u, \\tau^2 I), \\quad
    z_{rec} \\sim \\mathcal{N}(0, I), \\quad
    \\frac{dx_t}{dt} = v_\\theta(t, x_t, z), \\quad
    x_0 \\sim \\mathcal{N}(0, I)\\ (\\text{or zero-mean noise, } \\texttt{noise=}),

with the image-only encoder ``q(z | x)``, the KL to this prior and the alignment and decorrelation
penalties of :class:`~pyro_dlatent.models.base.GuidedLatentModel` (one implementation shared with
:class:`~pyro_dlatent.models.auxvae.AuxVAE`). The generator is a latent-conditioned vector field
(:class:`~pyro_dlatent.flow.ConditionalVectorField`); its training loss stands in for the
likelihood of the standardized image :math:`x_1`:

.. math::

    \\log \\tilde p(x_1 \\mid z) = -w \\sum_{pixels}
        \\big(v_\\theta(t, x_t, z) - (x_1 - x_0)\\big)^2, \\qquad
        x_t = (1 - t) x_0 + t x_1,\\ t \\sim U(0, 1),

one draw of :math:`(t, x_0)` per image and step (site ``"x"``, a ``pyro.factor`` in the data
plate). **Scale.** The sum over the :math:`D = HW` pixels makes the surrogate the log-density of
a Gaussian regression with variance :math:`1 / (2w)` per pixel, the scale of an image
log-likelihood, so the KL of the few latent coordinates weighs against it as in a VAE: the code
is used wherever knowing it lowers the per-pixel regression error by more than about
:math:`\\mathrm{KL} / (w D)`. A mean over pixels instead would let the KL (several nats) dominate
and collapse :math:`z_{rec}` onto its prior, because the flow can model the images without it.
In the notation of Latent-CFM (loss = mean-over-pixels FM + :math:`\\beta` KL),
:math:`\\beta = 1 / (w D)`. The base class weighs the alignment and decorrelation penalties per
pixel too (:math:`N D w_{align} \\mathcal{A}`), so their weights keep the same balance against
the surrogate at any image size.

Sampling integrates the ODE with :func:`pyro_dlatent.flow.sample_ode` (torchdiffeq).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyro
import torch
import xarray as xr
from torch import nn

from pyro_dlatent.anomaly import tail_latents
from pyro_dlatent.data.io import check_dataset, make_scaler
from pyro_dlatent.flow import (
    BASE_NOISES,
    FIXED_STEP_METHODS,
    ODE_METHODS,
    ConditionalVectorField,
    base_noise,
    flow_matching_loss,
    sample_ode,
)
from pyro_dlatent.latent import AuxScaler
from pyro_dlatent.models.base import (
    IMAGE_SITE,
    OBS_SITE,
    GuidedLatentModel,
    _initialization_rng,
)
from pyro_dlatent.models.config import ModelConfig, check_bool, check_choice
from pyro_dlatent.models.generator import FrozenGenerator
from pyro_dlatent.validation import check_float, check_int

__all__ = [
    "DEFAULT_METHOD",
    "DEFAULT_STEPS",
    "DLCFM",
    "INTENSITIES",
    "DLCFMConfig",
    "FlowGenerator",
]

INTENSITIES = ("identity", "asinh")
"""Pixel transforms applied before the affine standardization of :class:`DLCFM`."""

DEFAULT_METHOD = "rk4"
"""Default ODE solver of :meth:`DLCFM.sample` and :meth:`DLCFM.generator`.

Chosen with ``benchmarks/timing/bench_dlcfm_solvers.py`` (256 maps, a DL-CFM trained on 1638 maps of
32x32 ``halos`` for 20 epochs): RK4 with 4 steps (16 evaluations) kept the power-spectrum error
and pixel-histogram distance within 10% of dopri5's (122 evaluations) at every larger step
count, with images within 1.9% RMS of dopri5's; midpoint with the same 16 evaluations was
2.9% off and Euler 4.5%. Rerun on a DL-CFM trained on 8192 maps for 144 epochs (512 maps): again
RK4 with 4 steps was the fewest evaluations within 10% of dopri5's fidelity (98 evaluations),
images within 0.9% RMS; midpoint needed 16 evaluations (1.6%) and Euler 32 (2.0%). Again on
docs/history.md's seed-0 mean-head model, level integrated apart (512 maps): RK4 with 4 steps,
images within 4.0% RMS of dopri5's (134 evaluations); midpoint needed 32 evaluations, Euler
none up to 32.
"""

DEFAULT_STEPS = 4
"""Default number of solver steps (16 field evaluations with ``rk4``)."""


def _check_method(method: str, steps: int) -> tuple[str, int]:
    if method not in ODE_METHODS:
        raise ValueError(f"expected method in {ODE_METHODS}, got {method!r}")
    return method, check_int(steps, "steps", 1)


def _derived_seed(seed: int, stream: int) -> int:
    """An independent seed for ``stream`` derived from a user seed."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


class _Intensity(nn.Module):
    """Pixel transform ``g`` and the affine standardization ``(g(x) - loc) / scale``."""

    def __init__(self, kind: str, intensity_scale: float, loc: float, scale: float) -> None:
        super().__init__()
        self.kind = kind
        self.register_buffer("intensity_scale", torch.tensor(float(intensity_scale)))
        self.register_buffer("loc", torch.tensor(float(loc)))
        self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.kind == "asinh":
            images = torch.asinh(images / self.intensity_scale)
        return (images - self.loc) / self.scale

    def inverse(self, images_std: torch.Tensor) -> torch.Tensor:
        images = images_std * self.scale + self.loc
        if self.kind == "asinh":
            images = torch.sinh(images) * self.intensity_scale
        return images


class FlowGenerator(FrozenGenerator):
    """Frozen deterministic generator ``G(z_aux, z_rec) -> images`` of a trained :class:`DLCFM`.

    .. math:: G(z) = \\Phi_{0 \\to 1}(x_0; z),

    the fixed-step ODE flow of the frozen vector field started from one stored noise image
    :math:`x_0` (a buffer, shared by every batch element), mapped back to the dataset's units.
    It is a deterministic, differentiable function of ``z`` alone
    (:class:`~pyro_dlatent.models.generator.FrozenGenerator`).

    Attributes
    ----------
    aux_dim, residual_dim, image_size : int
    scaler : AuxScaler
    tau : float
        Prior sd of the guided block the model was trained with.
    method : str
        Fixed-step solver.
    steps : int
    nfe : int
        Vector-field evaluations per call (``steps`` times 1, 2 or 4).
    """

    def __init__(
        self,
        field: ConditionalVectorField,
        intensity: _Intensity,
        x0: torch.Tensor,
        *,
        aux_dim: int,
        residual_dim: int,
        scaler: AuxScaler,
        tau: float,
        method: str,
        steps: int,
    ) -> None:
        super().__init__(
            aux_dim=aux_dim,
            residual_dim=residual_dim,
            image_size=field.image_size,
            scaler=scaler,
            tau=tau,
        )
        self.field = field
        self.intensity = intensity
        self.register_buffer("x0", x0.detach().clone())
        self.method = method
        self.steps = steps
        self.nfe = {"euler": 1, "midpoint": 2, "rk4": 4}[method] * steps
        self.freeze()

    def images(self, latent: torch.Tensor) -> torch.Tensor:
        x0 = self.x0.expand(latent.shape[0], *self.x0.shape)
        images_std = sample_ode(self.field, latent.to(x0.dtype), x0, self.method, self.steps).x
        return self.intensity.inverse(images_std)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DLCFMConfig(ModelConfig):
    """Options of :class:`DLCFM`: those of :class:`~pyro_dlatent.models.config.ModelConfig` and
    the flow's.

    Parameters
    ----------
    flow_weight : float
        :math:`w` of the surrogate likelihood (see the module docstring); 1 weighs the summed
        per-pixel regression error like a Gaussian image log-likelihood.
    field_channels : int
        Channels of the vector field's U-Net at full resolution.
    field_levels : int, optional
        U-Net resolutions (default 2 up to 32 pixels, 3 above).
    embed_dim : int
        Size of the time and latent embeddings of the vector field.
    field_spatial_channels : int
        Channels of the vector field's latent map (``spatial_channels`` of
        :class:`~pyro_dlatent.flow.ConditionalVectorField`): the code enters as an image as
        well as through FiLM, so it can say where structure lies. 0 gives FiLM only.
    field_mean_head : bool
        Produce the field's mean level with a head that sees the mean level of the flow's state
        (``mean_head`` of :class:`~pyro_dlatent.flow.ConditionalVectorField`), which the U-Net's
        group norms hide from it. False gives the plain U-Net (and is what checkpoints written
        before the option load with).
    noise : {"white", "zero-mean"}
        Initial noise of the flow (:func:`~pyro_dlatent.flow.base_noise`), in training and
        sampling alike. ``"zero-mean"`` removes each noise image's spatial mean, so that the
        flow need not contract it to the data's nearly fixed background level; white noise is
        the default because the field then sets that level poorly (history page).
    intensity : {"identity", "asinh"}
        Pixel transform before standardization; ``"asinh"`` (``asinh(x / intensity_scale)``)
        compresses the bright cores of high-dynamic-range maps, but mapping samples back
        through ``sinh`` amplifies the flow's errors in bright pixels, so the default is the
        plain affine standardization.
    intensity_scale : float
        Scale of the ``asinh`` transform, in the dataset's units (about the noise level).
    method : {"euler", "midpoint", "rk4", "dopri5"}
        Default solver of :meth:`DLCFM.generate`.
    steps : int
        Default number of solver steps.
    """

    flow_weight: float = 1.0
    field_channels: int = 32
    field_levels: int | None = None
    embed_dim: int = 64
    field_spatial_channels: int = 0
    field_mean_head: bool = True
    noise: str = "white"
    intensity: str = "identity"
    intensity_scale: float = 1.0
    method: str = DEFAULT_METHOD
    steps: int = DEFAULT_STEPS

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set(
            "flow_weight", check_float(self.flow_weight, "flow_weight", minimum=0.0, strict=True)
        )
        check_choice(self.intensity, "intensity", INTENSITIES)
        check_choice(self.noise, "noise", BASE_NOISES)
        check_bool(self.field_mean_head, "field_mean_head")
        self._set(
            "intensity_scale",
            check_float(self.intensity_scale, "intensity_scale", minimum=0.0, strict=True),
        )
        self._set("steps", _check_method(self.method, self.steps)[1])


class DLCFM(GuidedLatentModel):
    """Disentangled-latent conditional flow matching on the guided/residual latent split.

    Build it from a dataset with :meth:`from_dataset`; train with :meth:`fit` (progress bar,
    history, validation and checkpoints from the base class); then :meth:`sample` images at
    auxiliaries in physical units, :meth:`sample_tails` with the residual block in the tail of
    its prior, :meth:`encode` / :meth:`predict_aux` data, and hand :meth:`generator` to the
    inverse-problem deep prior. :meth:`save` / :meth:`load` follow the base class's rules.

    Parameters
    ----------
    scaler : AuxScaler
        Fitted scaler of the auxiliaries, in latent order.
    image_size : int
        ``H = W``, a power of two ``>= 16``.
    residual_dim : int, optional
        Dimension of ``z_rec`` (default 4).
    config : DLCFMConfig, optional
    **options
        Fields of :class:`DLCFMConfig` by name.
    """

    _networks = ("encoder", "field")
    calibrate_after_fit = True

    config_class = DLCFMConfig

    def __init__(
        self,
        scaler: AuxScaler,
        image_size: int,
        residual_dim: int | None = None,
        *,
        config: DLCFMConfig | None = None,
        **options: Any,
    ) -> None:
        super().__init__(scaler, image_size, residual_dim, config=config, **options)
        opts = self.options
        self.flow_weight = opts.flow_weight
        self.noise = opts.noise
        self.method = opts.method
        self.steps = opts.steps
        self.intensity = _Intensity(
            opts.intensity, opts.intensity_scale, opts.image_loc, opts.image_scale
        )
        with _initialization_rng(None if opts.seed is None else opts.seed + 1):
            self.field = ConditionalVectorField(
                image_size,
                self.latent_dim,
                channels=opts.field_channels,
                num_levels=opts.field_levels,
                embed_dim=opts.embed_dim,
                spatial_channels=opts.field_spatial_channels,
                mean_head=opts.field_mean_head,
            )
        # the number of levels the network chose, so that a checkpoint rebuilds the same one
        self.options = dataclasses.replace(opts, field_levels=self.field.num_levels)

    @classmethod
    def _upgrade_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        # checkpoints from before the latent map, the zero-mean noise and the mean head
        return {
            "field_spatial_channels": 0,
            "field_mean_head": False,
            "noise": "white",
            **config,
        }

    @classmethod
    def from_dataset(
        cls,
        dataset: xr.Dataset,
        residual_dim: int = 4,
        *,
        intensity: str = "identity",
        intensity_scale: float | None = None,
        **kwargs: Any,
    ) -> DLCFM:
        """A DL-CFM sized for ``dataset``, with scaler and image standardization fitted on it.

        Parameters
        ----------
        dataset : xarray.Dataset
            Square images ``(sample, y, x)`` with side a power of two ``>= 16``, and auxiliaries.
        residual_dim : int
        intensity : {"identity", "asinh"}
        intensity_scale : float, optional
            Scale of the ``asinh`` transform; default the median absolute deviation of the
            pixels from their median (about the noise level of mostly-empty maps).
        **kwargs
            Any other constructor argument (``image_loc``/``image_scale`` override the fitted
            standardization of the transformed images).
        """
        ds = check_dataset(dataset, name="dataset")
        images = np.asarray(ds["image"].values, dtype=np.float64)
        if images.shape[1] != images.shape[2]:
            raise ValueError(f"dataset images must be square, got {images.shape[1:]}")
        if not np.isfinite(images).all():
            raise ValueError("dataset['image'] contains non-finite values")
        if intensity not in INTENSITIES:
            raise ValueError(f"expected intensity in {INTENSITIES}, got {intensity!r}")
        if intensity_scale is None:
            intensity_scale = float(np.median(np.abs(images - np.median(images))))
            if not intensity_scale > 0:
                intensity_scale = float(images.std()) or 1.0
        if intensity == "asinh":
            images = np.arcsinh(images / intensity_scale)
        scale = float(images.std())
        if not scale > 0:
            raise ValueError("dataset['image'] is constant; it cannot be standardized")
        kwargs.setdefault("image_loc", float(images.mean()))
        kwargs.setdefault("image_scale", scale)
        return cls(
            make_scaler(ds),
            images.shape[1],
            residual_dim,
            intensity=intensity,
            intensity_scale=float(intensity_scale),
            **kwargs,
        )

    # ------------------------------------------------------------------ images
    @property
    def num_pixels(self) -> int:
        """:math:`D = H W`."""
        return self.image_size**2

    def standardize_images(self, images: torch.Tensor) -> torch.Tensor:
        """Pixel transform then ``(g(x) - image_loc) / image_scale``; shape preserved."""
        return self.intensity(images)

    def destandardize_images(self, images_std: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`standardize_images`: back to the dataset's units."""
        return self.intensity.inverse(images_std)

    # ------------------------------------------------------------------ likelihood
    def likelihood(
        self, images_std: torch.Tensor | None, z_aux: torch.Tensor, z_rec: torch.Tensor
    ) -> None:
        """Flow-matching surrogate likelihood, factor ``"x"`` of batch shape ``(batch,)``.

        ``-flow_weight * D * mean_pixels((v(t, x_t, z) - (x_1 - x_0))^2)`` (with
        ``field_mean_head``, the residual's mean weighted as in
        :func:`~pyro_dlatent.flow.flow_matching_loss`) with one draw of
        ``t ~ U(0, 1)`` and ``x_0 ~ N(0, I)`` per image (from torch's global RNG, which
        :meth:`fit` seeds per epoch).
        """
        self._register("field", self.field)
        z = torch.cat([z_aux, z_rec], dim=-1)
        lead = z.shape[:-1]  # (batch,), or (*draws, batch) under Predictive / ELBO particles
        z = z.reshape(-1, z.shape[-1])
        if images_std is None:  # generating: the flow from base noise, at the model's solver
            k, side = self.aux_dim, self.image_size
            image = self.decode(z[:, :k], z[:, k:]).reshape(*lead, side, side)
            pyro.deterministic(OBS_SITE, self.standardize_images(image), event_dim=2)
            pyro.deterministic(IMAGE_SITE, image, event_dim=2)
            return
        pixels = images_std.shape[-2:]
        images = images_std.expand(*lead, *pixels).reshape(-1, *pixels)
        loss = flow_matching_loss(self.field, images, z, noise=self.noise).reshape(lead)
        pyro.factor(OBS_SITE, -self.flow_weight * self.num_pixels * loss)

    def _evaluation_terms(
        self, images: torch.Tensor, encoded: tuple[torch.Tensor, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Sum over the batch of the per-pixel flow-matching loss at the encoder means."""
        loss = flow_matching_loss(
            self.field, self.standardize_images(images), encoded[0], noise=self.noise
        )
        return {"flow_matching": loss.sum()}

    # ------------------------------------------------------------------ sampling
    def _resolve_solver(self, method: str | None, steps: int | None) -> tuple[str, int]:
        return _check_method(
            self.method if method is None else method, self.steps if steps is None else steps
        )

    def decode(
        self,
        z_aux: Any,
        z_rec: Any,
        *,
        x0: torch.Tensor | None = None,
        method: str | None = None,
        steps: int | None = None,
        seed: int | None = None,
        rtol: float = 1e-5,
        atol: float = 1e-5,
        batch_size: int = 256,
    ) -> torch.Tensor:
        """Integrate the flow conditioned on latent codes; images in the dataset's units.

        Parameters
        ----------
        z_aux : Tensor, shape ``(n, aux_dim)``
            Guided coordinates (standardized units).
        z_rec : Tensor, shape ``(n, residual_dim)``
        x0 : Tensor, shape ``(n, H, W)``, optional
            Initial noise (standardized units), used as given; default drawn from the model's
            ``noise`` (:func:`~pyro_dlatent.flow.base_noise`) with ``seed``.
        method, steps : optional
            Solver and steps (default: the model's ``method`` and ``steps``).
        seed : int, optional
            Seed of the initial noise (default: torch's global RNG).
        rtol, atol : float
            Tolerances of ``dopri5``.
        batch_size : int
            Images integrated together (``dopri5`` chooses one step sequence per batch).

        Returns
        -------
        Tensor, shape ``(n, H, W)``, on the model's device
        """
        method, steps = self._resolve_solver(method, steps)
        batch_size = check_int(batch_size, "batch_size", 1)
        z_aux = torch.as_tensor(z_aux, dtype=torch.float32, device=self.device)
        z_rec = torch.as_tensor(z_rec, dtype=torch.float32, device=self.device)
        if z_aux.dim() != 2 or z_aux.shape[1] != self.aux_dim:
            raise ValueError(f"z_aux must have shape (n, {self.aux_dim}), got {tuple(z_aux.shape)}")
        n = z_aux.shape[0]
        if z_rec.shape != (n, self.residual_dim):
            raise ValueError(
                f"z_rec must have shape ({n}, {self.residual_dim}), got {tuple(z_rec.shape)}"
            )
        shape = (n, self.image_size, self.image_size)
        if x0 is None:
            generator = None
            if seed is not None:
                generator = torch.Generator(device=self.device).manual_seed(
                    check_int(seed, "seed", 0)
                )
            x0 = base_noise(shape, self.noise, generator=generator, device=self.device)
        else:
            x0 = torch.as_tensor(x0, dtype=torch.float32, device=self.device)
            if x0.shape != shape:
                raise ValueError(f"x0 must have shape {shape}, got {tuple(x0.shape)}")
        z = torch.cat([z_aux, z_rec], dim=-1)
        was_training = self.training
        self.eval()
        with torch.no_grad():
            parts = [
                sample_ode(self.field, z_b, x_b, method, steps, rtol=rtol, atol=atol).x
                for z_b, x_b in zip(z.split(batch_size), x0.split(batch_size), strict=True)
            ]
            images = self.destandardize_images(torch.cat(parts))
        self.train(was_training)
        return images

    def generate(
        self,
        aux: Mapping[str, Any] | None = None,
        num: int = 1,
        *,
        method: str | None = None,
        steps: int | None = None,
        seed: int | None = None,
        batch_size: int = 256,
    ) -> torch.Tensor:
        """Images generated at auxiliaries given in physical units.

        ``z_aux`` from :meth:`sample_latent` (after :meth:`fit`, the encoder's aggregate
        posterior given the auxiliaries, :meth:`calibrate_generation`; before, the prior
        ``N(u~, tau^2)``), ``z_rec ~ N(0, I)``, ``x_0 ~ N(0, I)``, then the ODE from ``t = 0``
        to ``1``.

        Parameters
        ----------
        aux : mapping of name to scalar or 1-d array, optional
            For example ``{"log10_M500": 14.5}`` or ``{"log10_M500": [14, 15], "c": 4.0}``.
        num : int
            Images per auxiliary row.
        method, steps : optional
            ODE solver (default: the model's ``method`` and ``steps``).
        seed : int, optional
            Seed of the latent codes and the initial noise (same seed, same images).
        batch_size : int
            Images integrated together.

        Returns
        -------
        Tensor, shape ``(n * num, H, W)``
            Row ``i * num + j`` is draw ``j`` at auxiliary row ``i``; dataset units.
        """
        z_aux, z_rec = self.sample_latent(aux, check_int(num, "num", 1), seed=seed)
        noise_seed = None if seed is None else _derived_seed(seed, 1)
        return self.decode(
            z_aux, z_rec, method=method, steps=steps, seed=noise_seed, batch_size=batch_size
        )

    def sample(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Deprecated name of :meth:`generate` (the verb shared with ``AuxVAE``)."""
        warnings.warn(
            "DLCFM.sample is renamed DLCFM.generate (same arguments); sample will be removed",
            FutureWarning,
            stacklevel=2,
        )
        return self.generate(*args, **kwargs)

    def sample_tails(
        self,
        aux: Mapping[str, Any],
        num: int = 1,
        *,
        quantile: float = 0.99,
        method: str | None = None,
        steps: int | None = None,
        seed: int | None = None,
        batch_size: int = 256,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images with the guided block fixed and the residual block in the tail of its prior.

        ``z_aux`` is one draw of :meth:`sample_latent` per auxiliary row, held for the row's
        ``num`` images (after :meth:`calibrate_generation`, the encoding of a calibration image
        near the request moved to it, where the field was trained; at the map's mean instead,
        heavy halos came out with too much small-scale power), and ``z_rec`` from
        :func:`pyro_dlatent.anomaly.tail_latents`: ``||z_rec||^2`` above the ``quantile`` of
        :math:`\\chi^2_r`, direction uniform.

        Parameters
        ----------
        aux : mapping of name to scalar or 1-d array
            Every auxiliary, in physical units.
        num : int
            Images per auxiliary row.
        quantile : float
            Tail level :math:`q \\in [0, 1)`.
        method, steps, seed, batch_size
            As in :meth:`sample`.

        Returns
        -------
        images : Tensor, shape ``(n * num, H, W)``
            Dataset units; row ``i * num + j`` is draw ``j`` at auxiliary row ``i``.
        z_rec : Tensor, shape ``(n * num, residual_dim)``
            The residual codes used.
        """
        if self.residual_dim == 0:
            raise ValueError("expected a model with residual_dim >= 1 for residual tails, got 0")
        num = check_int(num, "num", 1)
        if aux is None or not isinstance(aux, Mapping) or set(aux) != set(self.scaler.names):
            raise ValueError(f"aux must give every auxiliary {self.scaler.names} for tails")
        rng = np.random.default_rng(None if seed is None else check_int(seed, "seed", 0))
        latent_seed = None if seed is None else _derived_seed(seed, 3)
        z_aux = self.sample_latent(aux, seed=latent_seed)[0].repeat_interleave(num, dim=0)
        z_rec = tail_latents(z_aux.shape[0], self.residual_dim, quantile, rng).to(self.device)
        noise_seed = None if seed is None else _derived_seed(seed, 2)
        images = self.decode(
            z_aux, z_rec, method=method, steps=steps, seed=noise_seed, batch_size=batch_size
        )
        return images, z_rec

    def generator(
        self, method: str | None = None, steps: int | None = None, noise_seed: int = 0
    ) -> FlowGenerator:
        """A frozen copy of the flow as ``G(z_aux, z_rec) -> images`` (dataset units).

        Parameters
        ----------
        method : {"euler", "midpoint", "rk4"}, optional
            Fixed-step solver (default: the model's ``method`` if fixed-step, else
            :data:`DEFAULT_METHOD`).
            ``dopri5`` is refused: its adaptive steps are chosen per batch, so ``G`` would not
            be a function of ``z`` alone.
        steps : int, optional
            Default: the model's ``steps``.
        noise_seed : int
            Seed of the stored initial noise ``x_0`` (one image shared by all inputs).
        """
        if method is None:
            method = self.method if self.method in FIXED_STEP_METHODS else DEFAULT_METHOD
        if method not in FIXED_STEP_METHODS:
            raise ValueError(
                f"expected a fixed-step method in {FIXED_STEP_METHODS} for the generator, got "
                f"{method!r} (adaptive steps would make G depend on the batch)"
            )
        method, steps = self._resolve_solver(method, steps)
        noise_seed = check_int(noise_seed, "noise_seed", 0)
        gen = torch.Generator().manual_seed(noise_seed)
        x0 = base_noise((self.image_size, self.image_size), self.noise, generator=gen)
        x0 = x0.to(self.device)
        return FlowGenerator(
            copy.deepcopy(self.field),
            copy.deepcopy(self.intensity),
            x0,
            aux_dim=self.aux_dim,
            residual_dim=self.residual_dim,
            scaler=copy.deepcopy(self.scaler),
            tau=self.tau,
            method=method,
            steps=steps,
        )
