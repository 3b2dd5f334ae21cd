"""Detection scores: how well a score (e.g. an anomaly score) separates two known classes."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import rankdata

from pyro_dlatent.metrics._arrays import _to_numpy

__all__ = ["auroc"]


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve of ``scores`` for the binary ``labels`` (higher = positive).

    Computed from ranks as the Mann–Whitney statistic :math:`U / (n_+ n_-)`, ties averaged:
    the probability that a random positive scores above a random negative.

    Parameters
    ----------
    scores : array-like, shape ``(n,)``
    labels : array-like of bool, shape ``(n,)``, with at least one positive and one negative
    """
    scores = _to_numpy(scores, "scores").ravel()
    labels = np.asarray(labels).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels must have the shape of scores {scores.shape}, got {labels.shape}")
    labels = labels.astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("labels must contain both classes")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
