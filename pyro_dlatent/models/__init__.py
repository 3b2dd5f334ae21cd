"""Generative models on the guided/residual latent split."""

from pyro_dlatent.models.auxvae import AuxVAE, DecoderGenerator
from pyro_dlatent.models.base import GuidedLatentModel, NonFiniteLossError
from pyro_dlatent.models.dlcfm import DLCFM, FlowGenerator

__all__ = [
    "DLCFM",
    "AuxVAE",
    "DecoderGenerator",
    "FlowGenerator",
    "GuidedLatentModel",
    "NonFiniteLossError",
]
