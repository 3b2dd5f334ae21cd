"""Disentangled deep priors for Bayesian inverse problems on an elliptic PDE."""

from pyro_dlatent.inverse.collapsed import CollapsedModel, CollapsedPosterior, infer_collapsed
from pyro_dlatent.inverse.exact import BumpPrior, ExactBumpPosterior
from pyro_dlatent.inverse.fem import (
    ConductivityProblem,
    SourceProblem,
    default_sensors,
    simulate_observations,
)
from pyro_dlatent.inverse.grf import GRFPrior
from pyro_dlatent.inverse.health import InferenceWarning, run_health
from pyro_dlatent.inverse.infer import InferenceResult, infer
from pyro_dlatent.inverse.methods import MAP, NUTS, SVI
from pyro_dlatent.inverse.prior import (
    AuxPrior,
    DeepPrior,
    GRFFieldPrior,
    InverseProblemModel,
    TauCalibration,
    calibrate_tau,
)

__all__ = [
    "MAP",
    "NUTS",
    "SVI",
    "AuxPrior",
    "BumpPrior",
    "CollapsedModel",
    "CollapsedPosterior",
    "ConductivityProblem",
    "DeepPrior",
    "ExactBumpPosterior",
    "GRFFieldPrior",
    "GRFPrior",
    "InferenceResult",
    "InferenceWarning",
    "InverseProblemModel",
    "SourceProblem",
    "TauCalibration",
    "calibrate_tau",
    "default_sensors",
    "infer",
    "infer_collapsed",
    "run_health",
    "simulate_observations",
]
