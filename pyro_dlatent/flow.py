"""Conditional flow matching: a latent-conditioned vector field, the path, the loss, an ODE sampler.

The pieces follow the usual split of flow-matching code into small parts:

- :class:`ConditionalVectorField` :math:`v_\\theta(t, x, z)`, a small U-Net whose every residual
  block is modulated (adaptive group norm) by an embedding of the time :math:`t` plus an
  embedding of the latent code :math:`z`;
- :func:`linear_path`, the straight conditional path between noise :math:`x_0` and data :math:`x_1`;
- :func:`flow_matching_loss`, the regression of :math:`v_\\theta` on the path's velocity;
- :func:`sample_ode`, which integrates :math:`dx/dt = v_\\theta(t, x, z)` from :math:`t=0` to
  :math:`t=1` with :func:`torchdiffeq.odeint` and counts the vector-field evaluations.

Images are single-channel tensors of shape ``(batch, height, width)`` throughout.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torchdiffeq
from torch import nn

from pyro_dlatent.validation import check_int

__all__ = [
    "BASE_NOISES",
    "FIXED_STEP_METHODS",
    "LEVEL_GRID_INTERVALS",
    "MIN_REMAINING_TIME",
    "ODE_METHODS",
    "ConditionalVectorField",
    "ODESolution",
    "base_noise",
    "flow_matching_loss",
    "linear_path",
    "sample_ode",
    "sinusoidal_embedding",
]

FIXED_STEP_METHODS = ("euler", "midpoint", "rk4")
"""Fixed-step torchdiffeq solvers; each step costs 1, 2 and 4 vector-field evaluations."""

ODE_METHODS = (*FIXED_STEP_METHODS, "dopri5")
"""Every solver :func:`sample_ode` accepts (``dopri5`` is adaptive)."""

MIN_REMAINING_TIME = 0.05
"""Least remaining time :math:`1 - t` that the mean head of the vector field divides by."""

LEVEL_GRID_INTERVALS = 24
"""Fewest RK4 intervals on ``[0, 1]`` for the mean level of a mean-head field
(:func:`sample_ode`): step times the level's largest rate, :math:`20 / 24`, inside RK4's
stability limit of 2.78. Against the closed form of a constant head the level ends within
2e-4 of its initial offset (1e-5 with 48 intervals, 2e-3 with 12); on ``halos`` 24 and 48 gave
the same whole-map Y-M slope within 0.003."""

BASE_NOISES = ("white", "zero-mean")
"""Source distributions of the flow (:func:`base_noise`)."""


def base_noise(
    shape: tuple[int, ...],
    kind: str = "white",
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Initial noise :math:`x_0` of the flow, images of shape ``(..., H, W)``.

    - ``"white"``: :math:`x_0 \\sim \\mathcal{N}(0, I)`;
    - ``"zero-mean"``: the same with each image's spatial mean subtracted,
      :math:`x_0 \\sim \\mathcal{N}(0, I - \\mathbf{1}\\mathbf{1}^\\top / D)`.

    A flow whose target images have a nearly deterministic mean level (the sky background of a
    map) must otherwise contract the mean of the white noise, whose sd is :math:`D^{-1/2}`, by
    the ratio of the two; the convolutions and group norms of a U-Net see that level poorly. On
    ``halos`` a white-noise DL-CFM passed it almost unchanged to its samples: the mean over the
    pixels beyond 10 of the centre of the lightest quarter of maps varied with sd 0.13 between
    generated maps against 0.010 between simulated ones, with any solver. With zero-mean noise
    the level of :math:`x_t` is :math:`t` times the data's, and the field only has to carry it;
    it then sets the level open-loop (see ``noise`` of :class:`~pyro_dlatent.models.dlcfm.DLCFM`
    for what that did on ``halos``).
    """
    if kind not in BASE_NOISES:
        raise ValueError(f"expected noise in {BASE_NOISES}, got {kind!r}")
    x0 = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    if kind == "zero-mean":
        x0 = x0 - x0.mean(dim=(-2, -1), keepdim=True)
    return x0


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_frequency: float = 100.0) -> torch.Tensor:
    """Sinusoidal features of a time in ``[0, 1]``.

    .. math:: e(t) = \\big(\\cos(\\omega_1 t), \\dots, \\cos(\\omega_h t),
        \\sin(\\omega_1 t), \\dots, \\sin(\\omega_h t)\\big),
        \\quad \\omega_i = \\Omega^{(i-1)/(h-1)},\\ h = \\text{dim}/2,

    angular frequencies spaced geometrically from 1 (a slow trend over ``[0, 1]``) to
    :math:`\\Omega`. The fastest feature sets how rough in time the vector field is, and so how
    many steps an ODE solver needs: for a small field trained 300 steps on 16x16 images,
    dopri5 (``rtol = atol = 1e-5``) took 362 evaluations with the diffusion-model convention
    (times scaled to ``[0, 1000]``, features of period down to 0.006) and 98 with
    :math:`\\Omega = 100` (period 0.06), at the same training loss.

    Parameters
    ----------
    t : Tensor, shape ``(batch,)``
    dim : int
        Even embedding size.
    max_frequency : float
        :math:`\\Omega > 1`, radians per unit time.

    Returns
    -------
    Tensor, shape ``(batch, dim)``
    """
    if dim % 2 != 0 or dim < 2:
        raise ValueError(f"expected an even dim >= 2, got {dim}")
    if not (math.isfinite(max_frequency) and max_frequency > 1.0):
        raise ValueError(f"expected max_frequency > 1, got {max_frequency}")
    half = dim // 2
    exponents = torch.arange(half, dtype=t.dtype, device=t.device) / max(half - 1, 1)
    args = t[:, None] * (max_frequency**exponents)[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _groups(channels: int) -> int:
    """Largest of 8, 4, 2, 1 dividing ``channels`` (GroupNorm group count)."""
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class _AdaGNResBlock(nn.Module):
    """Residual block ``x + conv(silu(AdaGN(conv(silu(GN(x))), c)))`` with conditioning ``c``.

    Adaptive group norm: :math:`h \\mapsto \\mathrm{GN}(h) (1 + \\gamma(c)) + \\beta(c)`.
    """

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int) -> None:
        super().__init__()
        self.norm_in = nn.GroupNorm(_groups(in_channels), in_channels)
        self.conv_in = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm_out = nn.GroupNorm(_groups(out_channels), out_channels, affine=False)
        self.film = nn.Linear(cond_dim, 2 * out_channels)
        self.conv_out = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Conv2d(in_channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(nn.functional.silu(self.norm_in(x)))
        scale, shift = self.film(cond)[:, :, None, None].chunk(2, dim=1)
        h = self.norm_out(h) * (1.0 + scale) + shift
        h = self.conv_out(nn.functional.silu(h))
        return self.skip(x) + h


class ConditionalVectorField(nn.Module):
    """A small U-Net vector field :math:`v_\\theta(t, x, z)` conditioned on time and a latent code.

    The conditioning vector of every residual block is the sum of two embeddings,

    .. math:: c = \\mathrm{MLP}_t(e(t)) + \\mathrm{MLP}_z(z),

    with :math:`e(t)` the sinusoidal features of :func:`sinusoidal_embedding`; each block applies
    it through adaptive group norm (a FiLM scale and shift after normalization). FiLM is global: it
    scales and shifts whole channels, so on its own it cannot say *where* something lies in the
    image (a displaced centroid, a substructure clump). With ``spatial_channels > 0`` the code
    also enters as an image: a map

    .. math:: m(z) = \\mathrm{upsample}\\big(\\mathrm{MLP}_m(z)\\big) \\in
        \\mathbb{R}^{c_m \\times H \\times W},

    an MLP output reshaped to ``spatial_channels`` maps of ``spatial_size`` squared and upsampled
    bilinearly, concatenated with :math:`x` at the U-Net's input. The U-Net has
    ``num_levels`` resolutions (default 2 for images up to 32 pixels, 3 above), one residual block
    per level on the way down and on the way up, and skip connections by concatenation.

    **Mean level.** Every group norm removes its input's spatial mean, so the U-Net sees the mean
    level :math:`\\bar x` of its input only through the zero padding at the border, and must set
    the mean of its output, the velocity of that level, almost blind to it. With
    ``mean_head=True`` the field is split into the two parts,

    .. math:: v_\\theta(t, x, z) = \\big(u_\\theta - \\bar u_\\theta \\mathbf 1\\big)
        + \\frac{g_\\phi(e(t), z, \\bar x) - \\bar x}{\\max(1 - t, \\epsilon)} \\mathbf 1,

    the U-Net's output :math:`u_\\theta` with its own mean removed and the velocity of the mean
    level from a small MLP :math:`g_\\phi` of the time's features :math:`e(t)`, the code and the
    state's mean :math:`\\bar x`. On the linear path :math:`x_1 - x_0 = (x_1 - x_t) / (1 - t)`,
    so :math:`g_\\phi` predicts the final mean :math:`\\bar x_1`, which varies slowly along the
    path, and the pull of the current level towards it is built in; :math:`\\epsilon` =
    :data:`MIN_REMAINING_TIME` keeps the last 5% of the path finite. The flow-matching loss
    splits the same way (:math:`\\|v - u_t\\|^2` is the zero-mean residual's square plus
    :math:`D` times the mean residual's), and the head shares no weights with the U-Net, so
    each part is trained by its own term only: the head's gradients, which the division makes
    large near :math:`t = 1`, do not reach the U-Net's conditioning. On 16x16 images whose mean
    is a 1-d code (pixel noise 0.1, so the mean given the code has sd 0.006; the mean of the
    white initial noise has sd 0.0625), 800 Adam steps left the generated mean spread about the
    code by 0.060 without the head and 0.008 with it (trained by :func:`flow_matching_loss`);
    a head that output the velocity itself reached 0.052, and one fed the U-Net's conditioning
    vector instead of its own features 0.015.

    Parameters
    ----------
    image_size : int
        Images are ``image_size x image_size``; must be divisible by ``2 ** (num_levels - 1)``.
    latent_dim : int
        Size of the conditioning code ``z``.
    channels : int
        Feature channels at full resolution; level ``l`` has ``channels * channel_mult[l]``.
    channel_mult : sequence of int, optional
        Channel multipliers per level; default ``(1, 2, 2, ...)`` of length ``num_levels``.
    num_levels : int, optional
        Number of resolutions; default 2 if ``image_size <= 32`` else 3.
    embed_dim : int
        Size of the time and latent embeddings (even).
    spatial_channels : int
        Channels of the latent map :math:`m(z)` (0: FiLM conditioning only).
    spatial_size : int, optional
        Side of the latent map before upsampling; default ``image_size // 4``. Must divide
        ``image_size``.
    mean_head : bool
        Produce the field's mean level with a separate head that sees the input's mean level
        (above); False: the U-Net's output as it is.

    Examples
    --------
    >>> field = ConditionalVectorField(16, latent_dim=3, channels=8)
    >>> field(0.5, torch.zeros(4, 16, 16), torch.zeros(4, 3)).shape
    torch.Size([4, 16, 16])
    """

    def __init__(
        self,
        image_size: int,
        latent_dim: int,
        channels: int = 32,
        channel_mult: tuple[int, ...] | None = None,
        num_levels: int | None = None,
        embed_dim: int = 64,
        spatial_channels: int = 0,
        spatial_size: int | None = None,
        mean_head: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(mean_head, bool):
            raise ValueError(f"expected mean_head True or False, got {mean_head!r}")
        image_size = check_int(image_size, "image_size", 4)
        spatial_channels = check_int(spatial_channels, "spatial_channels", 0)
        spatial_size = check_int(
            image_size // 4 if spatial_size is None else spatial_size, "spatial_size"
        )
        if image_size % spatial_size != 0:
            raise ValueError(
                f"expected spatial_size dividing image_size={image_size}, got {spatial_size}"
            )
        latent_dim = check_int(latent_dim, "latent_dim")
        channels = check_int(channels, "channels")
        if num_levels is None:
            num_levels = 2 if image_size <= 32 else 3
        num_levels = check_int(num_levels, "num_levels")
        if image_size % 2 ** (num_levels - 1) != 0:
            raise ValueError(
                f"expected image_size divisible by 2**(num_levels-1)={2 ** (num_levels - 1)}, "
                f"got image_size={image_size}"
            )
        if channel_mult is None:
            channel_mult = (1,) + (2,) * (num_levels - 1)
        channel_mult = tuple(channel_mult)
        if len(channel_mult) != num_levels or any(
            isinstance(m, bool) or int(m) != m or m < 1 for m in channel_mult
        ):
            raise ValueError(
                f"expected channel_mult of {num_levels} positive integers, got {channel_mult}"
            )
        if embed_dim % 2 != 0 or embed_dim < 2:
            raise ValueError(f"expected an even embed_dim >= 2, got {embed_dim}")
        self.image_size = image_size
        self.latent_dim = latent_dim
        self.channels = channels
        self.channel_mult = channel_mult
        self.num_levels = num_levels
        self.embed_dim = embed_dim
        self.spatial_channels = spatial_channels
        self.spatial_size = spatial_size
        self.mean_head = mean_head

        cond_dim = 4 * embed_dim
        self.time_mlp = nn.Sequential(
            nn.Linear(embed_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim)
        )
        self.latent_mlp = nn.Sequential(
            nn.Linear(latent_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim)
        )
        self.latent_map = (
            nn.Sequential(
                nn.Linear(latent_dim, cond_dim),
                nn.SiLU(),
                nn.Linear(cond_dim, spatial_channels * spatial_size**2),
            )
            if spatial_channels
            else None
        )
        widths = [channels * m for m in channel_mult]
        self.conv_in = nn.Conv2d(1 + spatial_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        previous = widths[0]
        for level, width in enumerate(widths):
            self.down_blocks.append(_AdaGNResBlock(previous, width, cond_dim))
            previous = width
            if level < num_levels - 1:
                self.downsamples.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
        self.middle = _AdaGNResBlock(previous, previous, cond_dim)
        self.up_blocks = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for level in reversed(range(num_levels)):
            width = widths[level]
            self.up_blocks.append(_AdaGNResBlock(previous + width, width, cond_dim))
            previous = width
            if level > 0:
                self.upsamples.append(
                    nn.Sequential(
                        nn.Upsample(scale_factor=2, mode="nearest"),
                        nn.Conv2d(width, widths[level - 1], 3, padding=1),
                    )
                )
                previous = widths[level - 1]
        self.norm_out = nn.GroupNorm(_groups(previous), previous)
        self.conv_out = nn.Conv2d(previous, 1, 3, padding=1)
        self.level_mlp = (
            nn.Sequential(
                nn.Linear(embed_dim + latent_dim + 1, cond_dim),
                nn.SiLU(),
                nn.Linear(cond_dim, cond_dim),
                nn.SiLU(),
                nn.Linear(cond_dim, 1),
            )
            if mean_head
            else None
        )

    def config(self) -> dict[str, object]:
        """Constructor arguments, JSON-serializable."""
        return {
            "image_size": self.image_size,
            "latent_dim": self.latent_dim,
            "channels": self.channels,
            "channel_mult": list(self.channel_mult),
            "num_levels": self.num_levels,
            "embed_dim": self.embed_dim,
            "spatial_channels": self.spatial_channels,
            "spatial_size": self.spatial_size,
            "mean_head": self.mean_head,
        }

    def forward(self, t: float | torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Evaluate the vector field.

        Parameters
        ----------
        t : float or Tensor, shape ``()`` or ``(batch,)``
            Time in ``[0, 1]``, shared by the batch or one per sample.
        x : Tensor, shape ``(batch, image_size, image_size)``
            State :math:`x_t`.
        z : Tensor, shape ``(batch, latent_dim)``
            Conditioning latent code.

        Returns
        -------
        Tensor, shape ``(batch, image_size, image_size)``
            :math:`v_\\theta(t, x, z)`.
        """
        if x.dim() != 3 or x.shape[1:] != (self.image_size, self.image_size):
            raise ValueError(
                f"expected x of shape (batch, {self.image_size}, {self.image_size}), "
                f"got {tuple(x.shape)}"
            )
        batch = x.shape[0]
        if z.shape != (batch, self.latent_dim):
            raise ValueError(
                f"expected z of shape ({batch}, {self.latent_dim}), got {tuple(z.shape)}"
            )
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.dim() == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"expected t of shape () or ({batch},), got {tuple(t.shape)}")
        z = z.to(x.dtype)
        time_features = sinusoidal_embedding(t, self.embed_dim)
        cond = self.time_mlp(time_features) + self.latent_mlp(z)
        h = x[:, None]
        if self.latent_map is not None:
            side = self.spatial_size
            m = self.latent_map(z).reshape(batch, self.spatial_channels, side, side)
            if side != self.image_size:
                m = nn.functional.interpolate(
                    m, size=(self.image_size,) * 2, mode="bilinear", align_corners=False
                )
            h = torch.cat([h, m], dim=1)
        h = self.conv_in(h)
        skips = []
        for level, block in enumerate(self.down_blocks):
            h = block(h, cond)
            skips.append(h)
            if level < self.num_levels - 1:
                h = self.downsamples[level](h)
        h = self.middle(h, cond)
        for i, block in enumerate(self.up_blocks):
            h = block(torch.cat([h, skips.pop()], dim=1), cond)
            if i < self.num_levels - 1:
                h = self.upsamples[i](h)
        out = self.conv_out(nn.functional.silu(self.norm_out(h)))[:, 0]
        if self.level_mlp is None:
            return out
        velocity = self._level_velocity(time_features, t, x.mean(dim=(-2, -1)), z)
        return out - out.mean(dim=(-2, -1), keepdim=True) + velocity[:, None, None]

    def level_velocity(
        self, t: float | torch.Tensor, level: torch.Tensor, z: torch.Tensor
    ) -> torch.Tensor:
        """Velocity of the mean level alone (``mean_head=True``), shape ``(batch,)``.

        :math:`(g_\\phi(e(t), z, \\bar x) - \\bar x) / \\max(1 - t, \\epsilon)`, the spatial mean of
        :meth:`forward` at any state whose mean is ``level``: the mean level obeys an ODE of its
        own, which :func:`sample_ode` integrates apart from the rest.

        Parameters
        ----------
        t : float or Tensor, shape ``()`` or ``(batch,)``
        level : Tensor, shape ``(batch,)``
            Mean level :math:`\\bar x` of the state.
        z : Tensor, shape ``(batch, latent_dim)``
        """
        if self.level_mlp is None:
            raise ValueError("expected a field with mean_head=True for level_velocity")
        t = torch.as_tensor(t, dtype=level.dtype, device=level.device).expand(level.shape[0])
        time_features = sinusoidal_embedding(t, self.embed_dim)
        return self._level_velocity(time_features, t, level, z.to(level.dtype))

    def _level_velocity(
        self, time_features: torch.Tensor, t: torch.Tensor, level: torch.Tensor, z: torch.Tensor
    ) -> torch.Tensor:
        # the head's final level less the state's, over the time left
        final = self.level_mlp(torch.cat([time_features, z, level[:, None]], dim=-1))[:, 0]
        return (final - level) / _remaining_time(t)[:, 0, 0]


def _remaining_time(t: torch.Tensor) -> torch.Tensor:
    """:math:`\\max(1 - t, \\epsilon)` of a batch of times, shape ``(batch, 1, 1)`` (mean head)."""
    return (1.0 - t).clamp(min=MIN_REMAINING_TIME)[:, None, None]


def linear_path(
    x0: torch.Tensor, x1: torch.Tensor, t: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Point and velocity on the straight path from noise ``x0`` to data ``x1``.

    .. math:: x_t = (1 - t)\\, x_0 + t\\, x_1, \\qquad u_t = \\frac{d x_t}{dt} = x_1 - x_0.

    Parameters
    ----------
    x0, x1 : Tensor, shape ``(batch, *dims)``
    t : float or Tensor, shape ``()`` or ``(batch,)``

    Returns
    -------
    x_t : Tensor, shape ``(batch, *dims)``
    u_t : Tensor, shape ``(batch, *dims)``
    """
    if x0.shape != x1.shape:
        raise ValueError(f"expected x0 and x1 of the same shape, got {x0.shape} and {x1.shape}")
    t = torch.as_tensor(t, dtype=x1.dtype, device=x1.device)
    if t.dim() == 1:
        if t.shape[0] != x1.shape[0]:
            raise ValueError(f"expected t of shape ({x1.shape[0]},), got {tuple(t.shape)}")
        t = t.reshape(-1, *([1] * (x1.dim() - 1)))
    elif t.dim() != 0:
        raise ValueError(f"expected t of shape () or (batch,), got {tuple(t.shape)}")
    return (1.0 - t) * x0 + t * x1, x1 - x0


def flow_matching_loss(
    field: nn.Module,
    x1: torch.Tensor,
    z: torch.Tensor,
    generator: torch.Generator | None = None,
    noise: str = "white",
) -> torch.Tensor:
    """Per-sample conditional flow-matching loss on the linear path.

    With :math:`x_0` from :func:`base_noise` (default :math:`\\mathcal{N}(0, I)`) and
    :math:`t \\sim U(0, 1)` drawn independently for each sample,

    .. math:: \\ell(x_1, z) = \\frac{1}{D} \\big\\| v_\\theta(t, x_t, z) - (x_1 - x_0) \\big\\|^2,

    with :math:`D` the number of pixels; the expectation of :math:`\\ell` over :math:`(x_0, t)`
    and the data is minimized by the conditional-expectation field
    :math:`E[x_1 - x_0 \\mid x_t, z]`. For a field with a mean head
    (``field.mean_head``, :class:`ConditionalVectorField`) the residual's spatial mean is
    multiplied by :math:`\\max(1 - t, \\epsilon)`, which makes that term the squared error of the
    head's final mean, :math:`(g_\\phi - \\bar x_1)^2`: a plain regression with the same
    minimizer, instead of one whose weight :math:`(1 - t)^{-2}` reaches 400 near the end of
    the path.

    Parameters
    ----------
    field : callable ``(t, x, z) -> Tensor``
        Vector field, e.g. :class:`ConditionalVectorField`.
    x1 : Tensor, shape ``(batch, H, W)``
        Data.
    z : Tensor, shape ``(batch, latent_dim)``
        Conditioning codes.
    generator : torch.Generator, optional
        Source of the noise and times (default: torch's global generator).
    noise : {"white", "zero-mean"}
        Kind of :func:`base_noise`.

    Returns
    -------
    Tensor, shape ``(batch,)``
    """
    batch = x1.shape[0]
    x0 = base_noise(x1.shape, noise, generator=generator, dtype=x1.dtype, device=x1.device)
    t = torch.rand((batch,), generator=generator, dtype=x1.dtype, device=x1.device)
    x_t, u_t = linear_path(x0, x1, t)
    residual = field(t, x_t, z) - u_t
    if getattr(field, "mean_head", False):
        # the mean residual of a mean head is its error on the final mean over the remaining time
        mean = residual.mean(dim=(-2, -1), keepdim=True)
        residual = residual - mean + mean * _remaining_time(t)
    return residual.pow(2).reshape(batch, -1).mean(dim=-1)


class ODESolution(NamedTuple):
    """Result of :func:`sample_ode`.

    Attributes
    ----------
    x : Tensor, shape ``(batch, *dims)``
        State at :math:`t = 1`.
    nfe : int
        Number of vector-field evaluations the solver made.
    times : Tensor, shape ``(T,)``
        Output times (``[0, 1]``, or the step grid with ``return_intermediates``).
    trajectory : Tensor, shape ``(T, batch, *dims)`` or None
        States at ``times`` when ``return_intermediates`` was requested.
    """

    x: torch.Tensor
    nfe: int
    times: torch.Tensor
    trajectory: torch.Tensor | None


def sample_ode(
    field: nn.Module,
    z: torch.Tensor,
    x0: torch.Tensor,
    method: str = "midpoint",
    steps: int = 20,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    return_intermediates: bool = False,
) -> ODESolution:
    """Transport ``x0`` along :math:`dx/dt = v_\\theta(t, x, z)` from :math:`t=0` to :math:`t=1`.

    Wraps :func:`torchdiffeq.odeint`. Fixed-step methods (``euler``, ``midpoint``, ``rk4``) take
    ``steps`` steps of size ``1 / steps`` and make ``steps``, ``2 * steps`` and ``4 * steps``
    evaluations; ``dopri5`` adapts its steps to ``rtol``/``atol``. The map is deterministic given
    ``z`` and ``x0`` and differentiable with respect to both (gradients flow through the solver's
    operations). With ``dopri5`` the step sizes are chosen for the whole batch, so a sample's
    result depends slightly on the other samples in its batch; fixed-step results do not.

    **Mean head.** For a field with ``mean_head`` (:class:`ConditionalVectorField`) the mean
    level obeys an ODE of its own, :math:`d\\bar x / dt` =
    :meth:`~ConditionalVectorField.level_velocity`, which is stiff near the end of the path
    (rate up to :math:`1 / \\epsilon` = 20). A fixed-step solver then integrates the level
    first, with torchdiffeq's RK4 (the 3/8 rule) on a grid of ``6 * steps`` intervals refined
    to at least :data:`LEVEL_GRID_INTERVALS` (it holds every stage time of the three solvers;
    four evaluations of the small head per interval), and the zero-mean remainder with the
    requested solver, the U-Net seeing that level. ``dopri5`` integrates the coupled state
    (its adaptive steps resolve the level). On ``halos`` (32x32, docs/history.md's mean-head runs,
    held-out maps) RK4 with 4 steps on the coupled state left the lightest eighth of the
    generated maps 1.7 times as bright as simulated over the whole map, and the whole-map Y-M
    slope at 1.590 and 1.514 (seeds 0 and 1; simulator 1.745); with the level apart, 1.743 and
    1.782, at 1.03 times the time of the coupled integration for 64 maps and 1.11 times for
    one map with the gradient in its code (``benchmarks/timing/bench_generation_draw.py``).

    Parameters
    ----------
    field : callable ``(t, x, z) -> Tensor``
        Vector field, called with a scalar tensor ``t``.
    z : Tensor, shape ``(batch, latent_dim)``
        Conditioning codes, held fixed along the trajectory.
    x0 : Tensor, shape ``(batch, *dims)``
        Initial state (noise).
    method : {"euler", "midpoint", "rk4", "dopri5"}
    steps : int
        Number of fixed steps; for ``dopri5`` only the number of output intervals when
        ``return_intermediates``.
    rtol, atol : float
        Tolerances of ``dopri5``.
    return_intermediates : bool
        Also return the states at ``t = k / steps``, ``k = 0..steps``.

    Returns
    -------
    ODESolution
        ``(x, nfe, times, trajectory)``.
    """
    if method not in ODE_METHODS:
        raise ValueError(f"expected method in {ODE_METHODS}, got {method!r}")
    steps = check_int(steps, "steps")
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"expected {name} > 0, got {value}")
    if z.shape[0] != x0.shape[0]:
        raise ValueError(
            f"expected z and x0 with the same batch size, got {z.shape[0]} and {x0.shape[0]}"
        )
    nfe = 0

    def rhs(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        nonlocal nfe
        nfe += 1
        return field(t, x, z)

    num_times = steps + 1 if return_intermediates else 2
    times = torch.linspace(0.0, 1.0, num_times, dtype=x0.dtype, device=x0.device)
    if method in FIXED_STEP_METHODS and getattr(field, "mean_head", False):
        trajectory = _integrate_level_apart(field, z, x0, method, steps, times, rhs)
    elif method in FIXED_STEP_METHODS:
        trajectory = _fixed_step_odeint(rhs, x0, times, method, steps)
    else:
        trajectory = torchdiffeq.odeint(rhs, x0, times, method=method, rtol=rtol, atol=atol)
    return ODESolution(
        x=trajectory[-1],
        nfe=nfe,
        times=times,
        trajectory=trajectory if return_intermediates else None,
    )


def _fixed_step_odeint(
    rhs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    y0: torch.Tensor,
    times: torch.Tensor,
    method: str,
    steps: int,
) -> torch.Tensor:
    """:func:`torchdiffeq.odeint` on the grid ``t_k = k / steps`` of ``[0, 1]``."""
    # The grid is given exactly: torchdiffeq's ``step_size`` option builds it with
    # ceil(1 / step_size + 1) points, which rounds up to an extra, zero-length step for some step
    # counts (61 in float32, 49 in float64).
    grid = torch.linspace(0.0, 1.0, steps + 1, dtype=y0.dtype, device=y0.device)
    return torchdiffeq.odeint(
        rhs, y0, times, method=method, options={"grid_constructor": lambda f, y, t: grid}
    )


def _integrate_level_apart(
    field: ConditionalVectorField,
    z: torch.Tensor,
    x0: torch.Tensor,
    method: str,
    steps: int,
    times: torch.Tensor,
    rhs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Fixed-step trajectory of a mean-head field at ``times``: the level first, then the rest."""
    pixels = tuple(range(1, x0.dim()))
    intervals = 6 * steps * math.ceil(LEVEL_GRID_INTERVALS / (6 * steps))
    level_times = torch.linspace(0.0, 1.0, intervals + 1, dtype=x0.dtype, device=x0.device)
    levels = _fixed_step_odeint(
        lambda t, level: field.level_velocity(t, level, z),
        x0.mean(dim=pixels),
        level_times,
        "rk4",
        intervals,
    )
    shape = (x0.shape[0],) + (1,) * len(pixels)

    def level_at(t: torch.Tensor) -> torch.Tensor:
        position = float(t) * intervals
        index = round(position)
        if abs(position - index) > 1e-3:  # every stage of euler, midpoint and rk4 is a node
            raise RuntimeError(f"solver stage at t = {float(t)} is not on the level's grid")
        return levels[index].reshape(shape)

    def remainder(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        velocity = rhs(t, y + level_at(t))
        return velocity - velocity.mean(dim=pixels, keepdim=True)

    y0 = x0 - x0.mean(dim=pixels, keepdim=True)
    trajectory = _fixed_step_odeint(remainder, y0, times, method, steps)
    return torch.stack([y + level_at(t) for t, y in zip(times, trajectory, strict=True)])
