"""What the guided-latent models pass around: prepared data and encodings."""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["Encoding", "ModelTensors"]


class Encoding(NamedTuple):
    """Posterior means and standard deviations of the latent blocks (standardized units).

    Each field has shape ``(n, aux_dim)`` or ``(n, residual_dim)``.
    """

    z_aux_loc: torch.Tensor
    z_aux_scale: torch.Tensor
    z_rec_loc: torch.Tensor
    z_rec_scale: torch.Tensor


class ModelTensors(NamedTuple):
    """A dataset as the tensors that the guided-latent models' ``model`` takes.

    Attributes
    ----------
    images : Tensor, shape ``(n, H, W)``
        Images in the dataset's units (float32).
    aux : Tensor, shape ``(n, aux_dim)``
        Standardized auxiliaries, 0 where missing.
    mask : Tensor of bool, shape ``(n, aux_dim)``, or None
        True where observed; ``None`` when every auxiliary is observed.
    """

    images: torch.Tensor
    aux: torch.Tensor
    mask: torch.Tensor | None
