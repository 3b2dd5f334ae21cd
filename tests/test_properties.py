"""Property-based tests (hypothesis) for the latent split and the AuxScaler."""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pyro_dlatent import AuxScaler, LatentSplit

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(
    values=arrays(np.float64, st.tuples(st.integers(2, 30), st.integers(1, 4)), elements=finite),
    data=st.data(),
)
def test_scaler_inverse_undoes_transform(values, data):
    spread = values.max(0) - values.min(0)
    # a column that is (numerically) constant cannot be standardized: that must be an error
    scaler = AuxScaler([f"a{j}" for j in range(values.shape[1])])
    if np.any(spread <= 1e-9 * np.maximum(1.0, np.abs(values).max(0))):
        return
    scaler.fit(values)
    standardized = scaler.transform(values)
    assert np.isfinite(standardized).all()
    np.testing.assert_allclose(standardized.mean(0), 0, atol=1e-6)
    back = scaler.inverse_transform(standardized)
    np.testing.assert_allclose(back, values, rtol=1e-7, atol=1e-9 * np.abs(values).max())
    restored = AuxScaler.from_json(scaler.to_json())
    np.testing.assert_array_equal(restored.transform(values), standardized)


@settings(max_examples=40, deadline=None)
@given(
    positive=arrays(
        np.float64, st.tuples(st.integers(3, 20), st.just(1)), elements=st.floats(1e-3, 1e6)
    )
)
def test_log_transform_round_trip(positive):
    if np.ptp(np.log10(positive)) < 1e-6:
        return
    scaler = AuxScaler(["m"], transforms=["log10"]).fit(positive)
    np.testing.assert_allclose(
        scaler.inverse_transform(scaler.transform(positive)), positive, rtol=1e-9
    )


@settings(max_examples=60, deadline=None)
@given(
    aux_dim=st.integers(1, 4),
    residual_dim=st.integers(0, 4),
    batch=st.integers(1, 6),
    tau=st.floats(1e-3, 1e2),
    seed=st.integers(0, 2**16),
)
def test_latent_log_prob_is_finite_and_matches_normal(aux_dim, residual_dim, batch, tau, seed):
    gen = torch.Generator().manual_seed(seed)
    split = LatentSplit(aux_dim, residual_dim, tau=tau)
    aux = torch.randn(batch, aux_dim, generator=gen)
    mask = torch.rand(batch, aux_dim, generator=gen) < 0.5
    aux = torch.where(mask, aux, torch.full_like(aux, float("nan")))
    z = torch.randn(batch, aux_dim, generator=gen)
    log_prob = split.aux_dist(aux, mask).log_prob(z)
    assert log_prob.shape == (batch,) and torch.isfinite(log_prob).all()
    loc = torch.where(mask, aux, torch.zeros_like(aux)).double()
    scale = torch.where(mask, torch.tensor(tau), torch.tensor(math.sqrt(1 + tau**2))).double()
    expected = torch.distributions.Normal(loc, scale).log_prob(z.double()).sum(-1)
    torch.testing.assert_close(log_prob.double(), expected, rtol=1e-5, atol=1e-4)
    assert split.rec_dist((batch,)).event_shape == (residual_dim,)
