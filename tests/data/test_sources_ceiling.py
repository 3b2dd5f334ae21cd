"""The ``sources`` ceiling: exact grid posterior means of the auxiliaries given the image."""

from __future__ import annotations

import numpy as np

from pyro_dlatent.data import simulate
from pyro_dlatent.data.sources import matern_covariance
from pyro_dlatent.inverse.exact import aux_posterior_means, residual_whitener


def test_whitener_whitens_the_matern_covariance():
    size = 8
    whiten = residual_whitener(size, sd=0.25, length_scale=0.15, smoothness=1.0)
    t = np.linspace(0.0, 1.0, size)
    xx, yy = np.meshgrid(t, t)
    points = np.stack([xx.ravel(), yy.ravel()], axis=1)
    distance = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))
    cov = matern_covariance(distance, sd=0.25, length_scale=0.15, smoothness=1.0)
    np.testing.assert_allclose(whiten.T @ cov @ whiten, np.eye(size * size), atol=1e-5)


def test_posterior_means_track_the_truth():
    # At 16x16 the centre is pinned to a fraction of a pixel (posterior sd ~ 0.005 against a
    # prior sd of 0.17), so r(x0) ~ 0.999; over 30 fields the sampling sd of r there is
    # (1 - r^2) / sqrt(30) < 0.001. 0.97 fails only if the likelihood or the grid is wrong.
    ds = simulate("sources", 30, size=16, seed=3)
    whiten = residual_whitener(16, sd=0.25, length_scale=0.15, smoothness=1.0)
    means = aux_posterior_means(ds, whiten, points=101, joint=True)
    for name in ("x0", "y0", "width", "width_joint"):
        truth = ds["width" if name == "width_joint" else name].values
        assert np.corrcoef(means[name], truth)[0, 1] > 0.9, name
    for name in ("x0", "y0"):
        assert np.corrcoef(means[name], ds[name].values)[0, 1] > 0.97
        lo, hi = ds.attrs["center_range"]
        assert np.all((means[name] >= lo) & (means[name] <= hi))
