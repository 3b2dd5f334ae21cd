"""The models' Pyro model and guide compose with Pyro's own utilities, for both models."""

from __future__ import annotations

import numpy as np
import pyro
import pytest
import torch
from pyro.infer import Predictive, Trace_ELBO

from pyro_dlatent import DLCFM, AuxVAE, data
from pyro_dlatent.models.base import IMAGE_SITE, MAX_STANDARDIZED, OBS_SITE

SIZE = 16


@pytest.fixture(scope="module")
def dataset():
    return data.simulate("sources", 64, size=SIZE, seed=0)


@pytest.fixture(scope="module", params=[AuxVAE, DLCFM], ids=["auxvae", "dlcfm"])
def model(request, dataset):
    return request.param.from_dataset(dataset, seed=0)


def _batch(model, dataset, n=6):
    tensors = model.prepare(dataset)
    return tensors.images[:n], tensors.aux[:n]


def test_predictive_with_the_guide_runs_in_parallel(model, dataset):
    images, aux = _batch(model, dataset)
    out = Predictive(model.model, guide=model.guide, num_samples=3, parallel=True)(images, aux)
    assert out["z_aux"].shape == (3, 6, model.aux_dim)
    assert out["z_rec"].shape == (3, 6, model.residual_dim)


def test_vectorized_elbo_particles_estimate_the_sequential_elbo(model, dataset):
    # Same estimator, two ways: the means of 64 particles agree within their Monte Carlo error.
    images, aux = _batch(model, dataset)
    pyro.set_rng_seed(0)
    single = np.array([Trace_ELBO().loss(model.model, model.guide, images, aux) for _ in range(64)])
    vectorized = Trace_ELBO(num_particles=64, vectorize_particles=True)
    value = vectorized.loss(model.model, model.guide, images, aux)
    error = single.std(ddof=1) * np.sqrt(2 / 64)  # sd of the difference of the two means
    assert abs(value - single.mean()) < 5 * error + 1e-6 * abs(single.mean())


def test_model_without_images_is_the_generative_model(model, dataset):
    _, aux = _batch(model, dataset, n=2)
    pyro.set_rng_seed(1)
    k = 200 if isinstance(model, AuxVAE) else 4  # a DL-CFM draw integrates an ODE
    out = Predictive(model.model, num_samples=k, parallel=True)(None, aux)
    assert out[IMAGE_SITE].shape == (k, 2, SIZE, SIZE)
    torch.testing.assert_close(
        out[IMAGE_SITE], out[OBS_SITE] * model.image_scale + model.image_loc, rtol=1e-5, atol=1e-5
    )
    if isinstance(model, AuxVAE):  # z_aux | u ~ N(u~, tau^2): the draws' mean within 5 se
        tau = float(model.tau)
        np.testing.assert_array_less(
            (out["z_aux"].mean(0) - aux).abs().numpy(), 5 * tau / np.sqrt(k)
        )


def test_physical_auxiliaries_are_refused_by_name(model, dataset):
    images, aux = _batch(model, dataset)
    physical = torch.as_tensor(model.scaler.inverse_transform(aux.numpy()), dtype=aux.dtype)
    physical[:, 0] = 1e3  # far beyond MAX_STANDARDIZED training sds
    with pytest.raises(ValueError, match="standardized"):
        model.model(images, physical)
    assert MAX_STANDARDIZED >= 5  # a legitimate standardized value is never refused
    with pytest.raises(ValueError, match="aux sets the batch"):
        model.model(None, None)
