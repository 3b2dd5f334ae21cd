"""Small, fast versions of the science checks of the deep prior science study."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pytest
import torch

from pyro_dlatent.calibration import interval_hits
from pyro_dlatent.data import simulate
from pyro_dlatent.data.io import make_scaler
from pyro_dlatent.inverse import BumpPrior, DeepPrior, infer, simulate_observations
from pyro_dlatent.inverse.exact import NAMES
from pyro_dlatent.inverse.grf import cosine_moments
from pyro_dlatent.inverse.studies import SIZE, named_draws, source_problem

__all__: list[str] = []


def test_cosine_moments_manufactured() -> None:
    """Cosine moments of analytic fields against their integrals (trapezoid rule, O(h^2)).

    For ``f = 2 + cos(pi x) - 3 cos(pi x) cos(pi y)`` the trapezoid rule is exact for these
    trigonometric products on the 32-node grid, so ``c00 = 2``, ``c10 = 1/2``, ``c11 = -3/4``,
    ``c01 = 0`` to round-off. For ``f = x``, ``c10 = int_0^1 x cos(pi x) dx = -2/pi^2``; the
    trapezoid error is ``h^2/12 |g'(1) - g'(0)| = h^2/6 ~ 1.7e-4`` (``g = x cos(pi x)``,
    ``h = 1/31``), so a tolerance of 5e-4 leaves room but fails for a wrong weight or axis.
    """
    x = np.linspace(0.0, 1.0, SIZE)
    xx, yy = np.meshgrid(x, x)  # image[i, j] at (x_j, y_i)
    field = 2.0 + np.cos(np.pi * xx) - 3.0 * np.cos(np.pi * xx) * np.cos(np.pi * yy)
    moments = cosine_moments(field[None])
    np.testing.assert_allclose(moments["c00"], [2.0], atol=1e-12)
    np.testing.assert_allclose(moments["c10"], [0.5], atol=1e-12)
    np.testing.assert_allclose(moments["c01"], [0.0], atol=1e-12)
    np.testing.assert_allclose(moments["c11"], [-0.75], atol=1e-12)
    linear = cosine_moments(xx[None])
    assert abs(linear["c10"][0] + 2.0 / math.pi**2) < 5e-4
    assert abs(linear["c01"][0]) < 1e-12


def test_interval_hits_calibrated_on_a_conjugate_model() -> None:
    """Exact posterior draws of a conjugate normal model cover the truth 90% of the time.

    ``theta ~ N(0, 1)``, ``y | theta ~ N(theta, 0.5^2)``: the posterior is
    ``N(0.8 y, 0.2)``. Over ``C = 400`` cases the coverage is binomial with sd
    ``sqrt(0.9 * 0.1 / 400) = 0.015``; 2000 draws per case add a quantile error of about
    ``0.01`` in coverage units, so ``|coverage - 0.9| < 0.06`` is a 3-sigma band.
    """
    rng = np.random.default_rng(0)
    cases = 400
    theta = rng.standard_normal((cases, 2))
    y = theta + 0.5 * rng.standard_normal((cases, 2))
    hits = []
    for c in range(cases):
        draws = 0.8 * y[c] + math.sqrt(0.2) * rng.standard_normal((2000, 2))
        hits.append(interval_hits(draws, theta[c]))
    coverage = np.mean(hits, axis=0)
    assert np.all(np.abs(coverage - 0.9) < 0.06), coverage
    narrow = np.mean([interval_hits(rng.standard_normal((500, 1)), [1.0]) for _ in range(50)])
    assert narrow == 1.0  # 1.0 lies inside the central 90% of N(0, 1) (|1| < 1.645)


class BumpGenerator(torch.nn.Module):
    """The exact parametric part of ``sources``: ``G(z_aux, z_rec)`` = the Gaussian bump of ``u``.

    ``u = scaler.inverse_transform_tensor(z_aux)``; ``z_rec`` (one coordinate) is unused, so
    its posterior is its prior.
    """

    def __init__(self, scaler, size: int, tau: float) -> None:
        super().__init__()
        self.scaler = scaler
        self.aux_dim = scaler.dim
        self.residual_dim = 1
        self.image_size = size
        self.tau = tau
        self.register_buffer("grid", torch.linspace(0.0, 1.0, size, dtype=torch.float64))

    def forward(self, z_aux: torch.Tensor, z_rec: torch.Tensor) -> torch.Tensor:
        u = self.scaler.inverse_transform_tensor(z_aux)
        x0, y0, log_amp, width = (u[..., j, None, None] for j in range(4))
        sq = (self.grid - x0) ** 2 + (self.grid[:, None] - y0) ** 2
        return torch.exp(log_amp) * torch.exp(-0.5 * sq / width**2) + 0.0 * z_rec[..., :1, None]


@pytest.mark.slow
def test_named_parameter_coverage_with_an_exact_generator() -> None:
    """SVI (full rank, at the Laplace start) covers the named parameters of bump sources.

    Truths are bumps with ``u`` from the simulator's own prior (``BumpPrior().u_prior()``),
    data from the study's source problem. Pooled over ``C = 16`` problems and 4 parameters (80 hits,
    taken as independent for the tolerance), a calibrated 90% interval gives coverage
    ``0.9 +- sqrt(0.09 / 64) = 0.0375``; the band ``[0.75, 1]`` is four sigma below. The
    generator's jitter ``tau = 0.02`` (standardized units) is ignored by the truths, which
    can only widen intervals, hence no upper bound below 1.
    """
    pyro.set_rng_seed(0)
    ds = simulate("sources", 256, size=SIZE, seed=3)
    generator = BumpGenerator(make_scaler(ds), SIZE, tau=0.02)
    prior = DeepPrior(generator, u_prior=BumpPrior().u_prior())
    problem = source_problem()
    test = simulate("sources", 16, size=SIZE, seed=11)
    u_true = np.stack([test[k].values for k in NAMES], axis=-1).astype(np.float64)
    with torch.no_grad():
        z_true = generator.scaler.transform_tensor(torch.as_tensor(u_true))
        truths = generator(z_true, torch.zeros(len(u_true), 1, dtype=torch.float64))
    data = simulate_observations(problem, truths, seed=12)
    u_true[:, 2] = np.exp(u_true[:, 2])
    hits = []
    for i in range(len(u_true)):
        result = infer(
            problem,
            prior,
            data[i],
            method="svi",
            guide="fullrank",
            steps=200,
            num_starts=4,
            lbfgs_steps=50,
            num_samples=1000,
            seed=i,
            progress=False,
            warn=False,
        )
        hits.append(interval_hits(named_draws(result.samples["u"]), u_true[i]))
    coverage = float(np.mean(hits))
    assert coverage >= 0.75, (coverage, np.mean(hits, axis=0))
