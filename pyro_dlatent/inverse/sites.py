"""Names of the sample sites that the field priors and the inverse-problem model emit.

The deep prior (:class:`~pyro_dlatent.inverse.prior.DeepPrior`) emits ``"u"``, ``"z_aux"``,
``"z_rec"`` and ``"field"``; the GRF prior
(:class:`~pyro_dlatent.inverse.grf_field.GRFFieldPrior`) ``"field"``, or ``"field_white"`` when
whitened; the model (:class:`~pyro_dlatent.inverse.prior.InverseProblemModel`) adds ``"obs"``.
This module also holds the field-shape check and the constant :math:`\\log 2\\pi` those three
share.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["FIELD_SITE", "OBS_SITE", "U_SITE", "WHITE_SITE"]

U_SITE = "u"
"""Name of the site of the auxiliary variables in physical units."""
FIELD_SITE = "field"
"""Name of the field site (deterministic for the deep prior, a sample for the GRF prior)."""
OBS_SITE = "obs"
"""Name of the observation site."""
WHITE_SITE = "field_white"
"""Name of the standard-normal site of the whitened GRF prior."""

_LOG_2PI = math.log(2.0 * math.pi)


def _field_shape(size: Any, name: str) -> tuple[int, int]:
    if isinstance(size, int | np.integer) and not isinstance(size, bool):
        shape = (int(size), int(size))
    else:
        try:
            shape = tuple(int(s) for s in size)
        except TypeError as err:
            raise TypeError(f"{name} must be an int or a pair of ints, got {size!r}") from err
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"{name} must describe a 2-d image, got {size!r}")
    return shape
