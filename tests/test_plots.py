"""Tests for the figure helpers: right panels, labels and files."""

from __future__ import annotations

import numpy as np
import pytest

from pyro_dlatent import plots
from pyro_dlatent.data import from_arrays


def test_preview_titles_carry_physical_values(tmp_path):
    rng = np.random.default_rng(0)
    ds = from_arrays(rng.normal(size=(5, 8, 8)), {"mass": [1e14, 2e14, 3e14, np.nan, 5e14]})
    fig = plots.preview(ds, num=5, ncols=3)
    titles = [ax.get_title() for ax in fig.axes]
    assert len(fig.axes) == 6
    assert titles[0] == "mass=1e+14" and titles[3] == "mass=?" and titles[5] == ""
    path = plots.save_figure(fig, tmp_path / "p.png")
    assert path.stat().st_size > 1000


def test_latent_traversal_rows_vary_one_coordinate():
    calls = []

    def decode(z_aux, z_rec):
        calls.append((z_aux.copy(), z_rec.copy()))
        return np.zeros((z_aux.shape[0], 4, 4))

    fig = plots.latent_traversal(
        decode, np.zeros(2), np.zeros(3), steps=5, aux_labels=["mass [Msun]", "c"]
    )
    z_aux, z_rec = calls[0]
    assert z_aux.shape == (25, 2) and z_rec.shape == (25, 3)
    # row 0 varies z_aux[0] only; row 2 varies z_rec[0] only
    np.testing.assert_allclose(z_aux[:5, 0], np.linspace(-2.5, 2.5, 5))
    assert np.all(z_aux[:5, 1] == 0) and np.all(z_rec[:5] == 0)
    np.testing.assert_allclose(z_rec[10:15, 0], np.linspace(-2.5, 2.5, 5))
    assert np.all(z_aux[10:15] == 0)
    assert fig.axes[0].get_ylabel() == "mass [Msun]"
    assert fig.axes[10].get_ylabel() == "z_rec[0]"


def test_aux_scatter_reports_correlation():
    rng = np.random.default_rng(0)
    u = rng.normal(size=(500, 2))
    latents = np.column_stack([u[:, 0], -u[:, 1], rng.normal(size=500)])
    fig = plots.aux_scatter(latents, u, aux_labels=["a", "b"], aux_dim=2)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert texts[0] == "r=1.00" and texts[4] == "r=-1.00"
    assert len(fig.axes) == 6


def test_aux_scatter_draws_intervals_and_the_calibration_curve_the_diagonal():
    rng = np.random.default_rng(0)
    u = rng.normal(size=(300, 2))
    latents = np.column_stack([u, rng.normal(size=300)])
    predicted = (u + 0.1, u - 1.0, u + 1.0)
    fig = plots.aux_scatter(latents, u, aux_labels=["a", "b"], aux_dim=2, predicted=predicted)
    assert len(fig.axes) == 8  # the predicted column first
    first = fig.axes[0]
    assert first.get_ylabel() == "a" and len(first.collections) == 2  # points and error bars
    segments = first.collections[1].get_segments()
    assert len(segments) == 150
    np.testing.assert_allclose(segments[0][:, 0], [u[0, 0] - 1.0, u[0, 0] + 1.0])
    curve = plots.calibration_curve([0.5, 0.9], {"a": [0.5, 0.9], "b": [0.3, 0.6]}, n=300)
    ax = curve.axes[0]
    np.testing.assert_allclose(ax.lines[0].get_xydata(), [[0, 0], [1, 1]])
    np.testing.assert_allclose(ax.lines[2].get_ydata(), [0.3, 0.6])
    assert "300" in ax.get_title()


@pytest.mark.parametrize("with_truth", [True, False])
def test_posterior_figures(with_truth):
    field = np.outer(np.linspace(0, 1, 9), np.ones(9))
    fig = plots.posterior_fields(
        field if with_truth else None, field, 0.1 + field, sensors=np.full((3, 2), 0.5)
    )
    assert len([ax for ax in fig.axes if ax.get_title()]) == (3 if with_truth else 2)
    fig = plots.observed_vs_predicted(np.arange(5.0), np.arange(5.0) + 0.1, np.ones(5))
    assert fig.axes[0].get_xlabel() == "observed"
    fig = plots.marginal_posteriors(
        np.random.default_rng(0).normal(size=(100, 2)), names=["x0", "y0"], truth=[0, 1]
    )
    assert [ax.get_title() for ax in fig.axes] == ["x0", "y0"]
