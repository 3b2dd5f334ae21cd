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


_VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1e40, max_value=1e40),
    st.integers(-(2**40), 2**40),
)
_NAMES = st.one_of(st.sampled_from(["image", "x", "y", "sample", "", "mass"]), st.text(max_size=6))


@settings(max_examples=150, deadline=None)
@given(
    images=st.one_of(
        arrays(  # any float64, near and past float32's range, NaN and inf included
            np.float64,
            st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)),
            elements=st.one_of(st.floats(-1e40, 1e40), st.floats()),
        ),
        arrays(
            st.sampled_from([np.int8, np.int32, np.uint8, np.float32, np.complex64]),
            st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)),
        ),
    ),
    names=st.lists(_NAMES, min_size=0, max_size=3),
    data=st.data(),
)
def test_from_arrays_returns_its_input_or_one_line_error(images, names, data):
    from pyro_dlatent.data import from_arrays

    n = images.shape[0]
    aux = {
        name: data.draw(st.lists(_VALUES, min_size=n, max_size=n).map(np.array)) for name in names
    }
    try:
        ds = from_arrays(images, aux)
    except (ValueError, TypeError) as err:
        assert "\n" not in str(err) and str(err)
        return
    # accepted: everything is stored as given, finite where it must be
    stored = ds["image"].values
    assert stored.dtype == np.float32 and np.isfinite(stored).all()
    np.testing.assert_array_equal(stored, images.astype(np.float32))
    assert ds.attrs["aux_names"] == list(aux)
    for name, values in aux.items():
        np.testing.assert_array_equal(ds[name].values, values.astype(np.float64))
        assert not np.isinf(ds[name].values).any() and np.isfinite(ds[name].values).any()
