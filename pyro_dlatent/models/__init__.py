"""Generative models on the guided/residual latent split."""

from pyro_dlatent.models.auxvae import AuxVAE, AuxVAEConfig, DecoderGenerator
from pyro_dlatent.models.base import GuidedLatentModel, NonFiniteLossError
from pyro_dlatent.models.config import ModelConfig
from pyro_dlatent.models.dlcfm import DLCFM, DLCFMConfig, FlowGenerator
from pyro_dlatent.models.generation import GenerationMap
from pyro_dlatent.models.generator import FrozenGenerator

__all__ = [
    "DLCFM",
    "AuxVAE",
    "AuxVAEConfig",
    "DLCFMConfig",
    "DecoderGenerator",
    "FlowGenerator",
    "FrozenGenerator",
    "GenerationMap",
    "GuidedLatentModel",
    "ModelConfig",
    "NonFiniteLossError",
]
