"""Disentanglement, alignment, sample-fidelity and inverse-problem metrics as pure array functions.

The metrics live in submodules grouped by what they measure, and are all importable from here:

- :mod:`~pyro_dlatent.metrics.latent_split`: how the guided block tracks the auxiliaries
  (:func:`alignment`) and how much the residual block leaks about them (:func:`leakage`);
- :mod:`~pyro_dlatent.metrics.disentanglement`: scores against ground-truth factors
  (:func:`mcc`, :func:`mig`, :func:`sap`, :func:`dci`);
- :mod:`~pyro_dlatent.metrics.lift`: the :func:`polynomial_lift` several of them compare;
- :mod:`~pyro_dlatent.metrics.fidelity`: distances between generated and reference images;
- :mod:`~pyro_dlatent.metrics.inverse`: :func:`relative_l2_error` and :func:`interval_coverage`;
- :mod:`~pyro_dlatent.metrics.detection`: :func:`auroc`.

Conventions
-----------
Representations are arrays ``latents`` of shape ``(n, d)``; ground-truth factors or auxiliary
variables are arrays ``factors``/``aux`` of shape ``(n, k)``. A 1-d array is read as one column.
Torch tensors are accepted and converted to float64 numpy arrays.

Columns with zero variance (constant up to rounding) carry no information: every correlation with
them is defined as 0, so no metric returns NaN for a collapsed latent. Factors that are constant
are left out of the averages over factors; if every factor is constant the scores are 0.
"""

from pyro_dlatent.metrics.detection import auroc
from pyro_dlatent.metrics.disentanglement import DCIResult, dci, mcc, mig, sap
from pyro_dlatent.metrics.fidelity import (
    pixel_histogram_distance,
    power_spectrum_error,
    radial_power_spectrum,
    radial_profile,
    radial_profile_error,
)
from pyro_dlatent.metrics.inverse import interval_coverage, relative_l2_error
from pyro_dlatent.metrics.latent_split import AlignmentResult, LeakageResult, alignment, leakage
from pyro_dlatent.metrics.lift import polynomial_lift

__all__ = [
    "AlignmentResult",
    "DCIResult",
    "LeakageResult",
    "alignment",
    "auroc",
    "dci",
    "interval_coverage",
    "leakage",
    "mcc",
    "mig",
    "pixel_histogram_distance",
    "polynomial_lift",
    "power_spectrum_error",
    "radial_power_spectrum",
    "radial_profile",
    "radial_profile_error",
    "relative_l2_error",
    "sap",
]
