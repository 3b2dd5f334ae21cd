"""Shared network blocks: a convolutional image encoder and decoder for square power-of-two images.

The blocks are deliberately small (a few hundred thousand parameters at the defaults) so that a
model on 8192 images of 32x32 pixels trains in minutes on a CPU. Every block works on
single-channel images of shape ``(batch, H, W)`` with ``H = W`` a power of two, at least 16.

Resolution schedule: level ``i`` (``i = 0`` at the finest resolution) has
``width * min(2**i, 4)`` channels, and the number of levels is ``log2(H) - 2`` so that the coarsest
feature map is ``4 x 4``.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from pyro_dlatent.validation import check_int

__all__ = [
    "ACTIVATIONS",
    "NORMS",
    "ConvDecoder",
    "ConvEncoder",
    "check_image_size",
    "level_channels",
    "make_activation",
    "make_norm",
]

ACTIVATIONS = {"silu": nn.SiLU, "gelu": nn.GELU}
"""Activation functions the blocks accept, by name."""

NORMS = ("group", "none")
"""Normalizations the blocks accept: GroupNorm (per-sample, batch independent) or none."""


def check_image_size(image_size: int, *, name: str = "image_size") -> int:
    """Return ``image_size`` if it is an int power of two ``>= 16``, else raise ``ValueError``."""
    if (
        isinstance(image_size, bool)
        or not isinstance(image_size, int)
        or image_size < 16
        or image_size & (image_size - 1)
    ):
        raise ValueError(f"expected {name} a power of two >= 16 (an int), got {image_size!r}")
    return image_size


def make_activation(name: str) -> nn.Module:
    """A fresh activation module by name (one of :data:`ACTIVATIONS`)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"expected activation in {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()


def make_norm(kind: str, channels: int) -> nn.Module:
    """GroupNorm with ``gcd(8, channels)`` groups for ``kind="group"``, identity for ``"none"``."""
    if kind not in NORMS:
        raise ValueError(f"expected norm in {NORMS}, got {kind!r}")
    if kind == "none":
        return nn.Identity()
    return nn.GroupNorm(math.gcd(8, channels), channels)


def level_channels(width: int, levels: int) -> list[int]:
    """Channels of each resolution level, finest first: ``width * min(2**i, 4)``."""
    return [width * min(2**i, 4) for i in range(levels)]


def _levels(image_size: int) -> int:
    return int(math.log2(image_size)) - 2


class ConvEncoder(nn.Module):
    """Convolutional encoder: image ``(batch, H, W)`` to a feature vector ``(batch, out_features)``.

    Each level halves the resolution with a strided 3x3 convolution followed by ``depth - 1``
    further 3x3 convolutions at the new resolution (each with normalization and activation); the
    ``4 x 4`` feature map is flattened and passed through a one-hidden-layer MLP.

    Parameters
    ----------
    image_size : int
        ``H = W``, a power of two ``>= 16``.
    out_features : int
        Size of the output vector.
    width : int
        Channels of the finest level (coarser levels double it, up to ``4 * width``).
    hidden : int
        Width of the hidden layer of the output MLP.
    depth : int
        Convolutions per level.
    activation : {"silu", "gelu"}
    norm : {"group", "none"}
    """

    def __init__(
        self,
        image_size: int,
        out_features: int,
        *,
        width: int = 32,
        hidden: int = 256,
        depth: int = 1,
        activation: str = "silu",
        norm: str = "group",
    ) -> None:
        super().__init__()
        self.image_size = check_image_size(image_size)
        self.out_features = check_int(out_features, "out_features")
        check_int(width, "width")
        check_int(hidden, "hidden")
        check_int(depth, "depth")
        channels = level_channels(width, _levels(image_size))
        layers: list[nn.Module] = []
        c_in = 1
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), make_norm(norm, c)]
            layers.append(make_activation(activation))
            for _ in range(depth - 1):
                layers += [nn.Conv2d(c, c, 3, padding=1), make_norm(norm, c)]
                layers.append(make_activation(activation))
            c_in = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels[-1] * 16, hidden),
            make_activation(activation),
            nn.Linear(hidden, out_features),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Map ``images`` of shape ``(batch, H, W)`` to features ``(batch, out_features)``."""
        return self.head(self.features(images.unsqueeze(-3)))


class ConvDecoder(nn.Module):
    """Convolutional decoder: vector ``(batch, in_features)`` to an image ``(batch, H, W)``.

    A one-hidden-layer MLP produces a ``4 x 4`` feature map; each level doubles the resolution
    with a 4x4 transposed convolution of stride 2 (followed by normalization, activation and
    ``depth - 1`` further 3x3 convolutions), mirroring :class:`ConvEncoder`'s channel schedule.
    The last level's transposed convolution outputs the single image channel with no activation,
    so the output is unbounded.

    Optionally the first ``harmonic_inputs`` inputs are also fed to the MLP as Fourier
    features (a fixed embedding, no parameters):

    .. math::

        \\phi(z) = \\bigl(z,\\ \\sin(f z_j),\\ \\cos(f z_j)\\bigr)_{j < m,\\ f = 1, \\dots, F},

    ``2 F m`` extra inputs for ``F = harmonics``. A coordinate that stands for a position or a
    size on a bounded range (such as a standardized guided latent) is then available to the
    first layer as localized, periodic features as well as a ramp, which the MLP would otherwise
    have to build from the ramp alone; in the Aux-VAE this lets the decoder draw a bump at a
    precise position from the guided coordinates without borrowing residual coordinates.

    Parameters
    ----------
    in_features : int
        Size of the input vector (the latent dimension).
    image_size : int
        ``H = W``, a power of two ``>= 16``.
    width, hidden, depth, activation, norm
        As in :class:`ConvEncoder`.
    harmonics : int
        Number ``F`` of frequencies of the Fourier features (0: none).
    harmonic_inputs : int, optional
        How many leading inputs get Fourier features (default: all).
    """

    def __init__(
        self,
        in_features: int,
        image_size: int,
        *,
        width: int = 32,
        hidden: int = 256,
        depth: int = 1,
        activation: str = "silu",
        norm: str = "group",
        harmonics: int = 0,
        harmonic_inputs: int | None = None,
    ) -> None:
        super().__init__()
        self.in_features = check_int(in_features, "in_features")
        self.image_size = check_image_size(image_size)
        check_int(width, "width")
        check_int(hidden, "hidden")
        check_int(depth, "depth")
        if isinstance(harmonics, bool) or not isinstance(harmonics, int) or harmonics < 0:
            raise ValueError(f"expected harmonics >= 0 (an int), got {harmonics!r}")
        if harmonic_inputs is None:
            harmonic_inputs = in_features
        if (
            isinstance(harmonic_inputs, bool)
            or not isinstance(harmonic_inputs, int)
            or not 0 <= harmonic_inputs <= in_features
        ):
            raise ValueError(
                f"expected 0 <= harmonic_inputs <= in_features = {in_features} (an int), "
                f"got {harmonic_inputs!r}"
            )
        self.harmonics = harmonics
        self.harmonic_inputs = harmonic_inputs if harmonics else 0
        self.register_buffer(
            "frequencies", torch.arange(1, harmonics + 1, dtype=torch.float32), persistent=False
        )
        channels = level_channels(width, _levels(image_size))[::-1]
        self.coarse_channels = channels[0]
        self.head = nn.Sequential(
            nn.Linear(in_features + 2 * harmonics * self.harmonic_inputs, hidden),
            make_activation(activation),
            nn.Linear(hidden, channels[0] * 16),
            make_activation(activation),
        )
        layers: list[nn.Module] = []
        for c_in, c in itertools.pairwise(channels):
            layers += [nn.ConvTranspose2d(c_in, c, 4, stride=2, padding=1), make_norm(norm, c)]
            layers.append(make_activation(activation))
            for _ in range(depth - 1):
                layers += [nn.Conv2d(c, c, 3, padding=1), make_norm(norm, c)]
                layers.append(make_activation(activation))
        layers.append(nn.ConvTranspose2d(channels[-1], 1, 4, stride=2, padding=1))
        self.features = nn.Sequential(*layers)

    def features_of(self, latent: torch.Tensor) -> torch.Tensor:
        """The MLP's input: ``latent`` ``(batch, in_features)`` with its Fourier features appended.

        Returns
        -------
        Tensor, shape ``(batch, in_features + 2 * harmonics * harmonic_inputs)``
        """
        if not self.harmonic_inputs:
            return latent
        phase = latent[..., : self.harmonic_inputs, None] * self.frequencies.to(latent.dtype)
        phase = phase.flatten(-2)
        return torch.cat([latent, torch.sin(phase), torch.cos(phase)], dim=-1)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """Map ``latent`` of shape ``(batch, in_features)`` to images ``(batch, H, W)``."""
        h = self.head(self.features_of(latent)).unflatten(-1, (self.coarse_channels, 4, 4))
        return self.features(h).squeeze(-3)
