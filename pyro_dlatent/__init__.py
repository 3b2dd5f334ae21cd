"""pyro_dlatent: interpretable generative models with guided and residual latent blocks, on Pyro."""

from pyro_dlatent.latent import AUX_SITE, REC_SITE, AuxScaler, LatentSplit
from pyro_dlatent.models import DLCFM, AuxVAE, GuidedLatentModel, NonFiniteLossError

__version__ = "0.1.0"

__all__ = [
    "AUX_SITE",
    "DLCFM",
    "REC_SITE",
    "AuxScaler",
    "AuxVAE",
    "GuidedLatentModel",
    "LatentSplit",
    "NonFiniteLossError",
    "__version__",
]
