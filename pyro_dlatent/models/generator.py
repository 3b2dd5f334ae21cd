"""One base for the frozen generators ``G(z_aux, z_rec) -> images`` of trained models.

``AuxVAE.generator()`` and ``DLCFM.generator()`` return subclasses of :class:`FrozenGenerator`:
deterministic, differentiable functions of the latent code with frozen weights, the interface
(:class:`~pyro_dlatent.inverse.protocols.Generator`) the inverse-problem deep prior codes
against. The base checks the latent shapes, flattens any batch dimensions, and freezes; a
subclass supplies only :meth:`FrozenGenerator.images` on flat latent codes.
"""

from __future__ import annotations

import torch
from torch import nn

from pyro_dlatent.latent import AuxScaler

__all__ = ["FrozenGenerator"]


class FrozenGenerator(nn.Module):
    """A frozen ``G(z_aux, z_rec) -> images`` in the dataset's units.

    Parameters
    ----------
    aux_dim, residual_dim, image_size : int
    scaler : AuxScaler
        Maps physical auxiliaries to the standardized guided coordinates
        (``scaler.transform_tensor``) and back.
    tau : float
        The prior sd of ``z_aux`` around the standardized auxiliaries the model was trained with.

    Notes
    -----
    A subclass builds its networks and buffers, then calls :meth:`freeze`.
    """

    def __init__(
        self, *, aux_dim: int, residual_dim: int, image_size: int, scaler: AuxScaler, tau: float
    ) -> None:
        super().__init__()
        self.aux_dim = aux_dim
        self.residual_dim = residual_dim
        self.image_size = image_size
        self.scaler = scaler
        self.tau = float(tau)

    def freeze(self) -> None:
        """No gradients for the weights, evaluation mode: ``G`` depends on ``z`` alone."""
        self.requires_grad_(False)
        self.eval()

    def images(self, latent: torch.Tensor) -> torch.Tensor:
        """Images ``(m, H, W)`` in the dataset's units at flat latent codes ``(m, aux + rec)``."""
        raise NotImplementedError

    def forward(self, z_aux: torch.Tensor, z_rec: torch.Tensor) -> torch.Tensor:
        """Images in the dataset's units.

        Parameters
        ----------
        z_aux : Tensor, shape ``(*batch, aux_dim)``
        z_rec : Tensor, shape ``(*batch, residual_dim)``

        Returns
        -------
        Tensor, shape ``(*batch, H, W)``
            Differentiable in the inputs; the weights are frozen.
        """
        if z_aux.shape[-1:] != (self.aux_dim,) or z_rec.shape[-1:] != (self.residual_dim,):
            raise ValueError(
                f"expected z_aux (..., {self.aux_dim}) and z_rec (..., {self.residual_dim}), got "
                f"{tuple(z_aux.shape)} and {tuple(z_rec.shape)}"
            )
        if z_aux.shape[:-1] != z_rec.shape[:-1]:
            raise ValueError(
                f"z_aux and z_rec must share batch dims, got {tuple(z_aux.shape)} and "
                f"{tuple(z_rec.shape)}"
            )
        batch = z_aux.shape[:-1]
        latent = torch.cat([z_aux, z_rec], dim=-1).reshape(-1, self.aux_dim + self.residual_dim)
        return self.images(latent).reshape(*batch, self.image_size, self.image_size)

    def conditional_mean(self, z_aux: torch.Tensor) -> torch.Tensor:
        """``E[image | u]`` at standardized auxiliaries ``z_aux`` ``(*batch, aux_dim)``.

        The generator at ``z_rec = 0`` unless a subclass knows better.
        """
        return self(z_aux, z_aux.new_zeros(*z_aux.shape[:-1], self.residual_dim))
