"""Generative models on the guided/residual latent split."""

from pyro_dlatent.models.auxvae import AuxVAE, DecoderGenerator
from pyro_dlatent.models.base import GuidedLatentModel, NonFiniteLossError

__all__ = ["AuxVAE", "DecoderGenerator", "GuidedLatentModel", "NonFiniteLossError"]
