"""Bad input anywhere a user passes data gives a ValueError/TypeError naming the argument."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from pyro_dlatent import AuxScaler, AuxVAE, LatentSplit, data, metrics
from pyro_dlatent.inverse import DeepPrior, infer, infer_collapsed
from pyro_dlatent.inverse.exact import BumpMean
from pyro_dlatent.inverse.fem import ConductivityProblem, SourceProblem, default_sensors
from pyro_dlatent.inverse.grf import GRFPrior
from pyro_dlatent.inverse.run import Observations, invert_run
from pyro_dlatent.residual import ResidualField


@functools.cache
def _dataset():
    return data.simulate("sources", 32, size=16, seed=0)


@functools.cache
def _vae():
    return AuxVAE.from_dataset(_dataset(), residual_dim=2, width=8, hidden=16, seed=0)


@functools.cache
def _problem():
    return SourceProblem(9, default_sensors(3), 0.1)


@functools.cache
def _problem16():
    return SourceProblem(16, default_sensors(3), 0.1)


def _scaler():
    return AuxScaler(["a", "b"]).fit([[0.0, 1.0], [1.0, 3.0]])


NAN_IMAGES = np.full((2, 16, 16), np.nan)


def _collapsed(generator=None, observations=None, **kwargs):
    mean = BumpMean(16)
    return infer_collapsed(
        _problem16(),
        mean if generator is None else generator,
        np.zeros(9) if observations is None else observations,
        residual=None if generator is not None else mean.residual(),
        **kwargs,
    )


CASES = [
    # latent split and scaler
    ("tau", ValueError, lambda: LatentSplit(1, 1, tau=0.0)),
    ("tau", ValueError, lambda: LatentSplit(1, 1, tau=float("nan"))),
    ("aux_dim", ValueError, lambda: LatentSplit(0, 1)),
    ("aux", ValueError, lambda: LatentSplit(2, 1).aux_dist(torch.zeros(3, 5))),
    ("aux", ValueError, lambda: LatentSplit(1, 1).aux_dist(torch.tensor([[float("inf")]]))),
    ("mask", TypeError, lambda: LatentSplit(1, 1).aux_dist(torch.zeros(2, 1), torch.zeros(2, 1))),
    ("unknown auxiliary", ValueError, lambda: _scaler().transform({"a": [1], "b": [1], "c": [1]})),
    ("aux", ValueError, lambda: _scaler().transform(np.zeros((2, 3)))),
    ("transforms", ValueError, lambda: AuxScaler(["a"], transforms=["cube"])),
    ("names", ValueError, lambda: AuxScaler([])),
    # simulators and datasets
    ("name", ValueError, lambda: data.simulate("stars", 4)),
    ("num", ValueError, lambda: data.simulate("sources", 0)),
    ("size", ValueError, lambda: data.simulate("sources", 4, size=3)),
    ("seed", ValueError, lambda: data.simulate("sources", 4, seed=-1)),
    ("images", ValueError, lambda: data.from_arrays(np.zeros((0, 4, 4)), {"a": []})),
    ("images", ValueError, lambda: data.from_arrays(np.full((2, 4, 4), np.inf), {"a": [1, 2]})),
    ("aux['a']", ValueError, lambda: data.from_arrays(np.zeros((2, 4, 4)), {"a": [1, 2, 3]})),
    (
        "units",
        ValueError,
        lambda: data.from_arrays(np.zeros((2, 4, 4)), {"a": [1, 2]}, units={"b": "m"}),
    ),
    ("dataset", TypeError, lambda: data.check_dataset(np.zeros(3))),
    ("path", ValueError, lambda: data.load("missing-file.nc")),
    ("path", ValueError, lambda: data.save(_dataset(), "out.csv")),
    ("fraction", ValueError, lambda: data.split(_dataset(), 1.5)),
    # models
    ("tau", ValueError, lambda: AuxVAE.from_dataset(_dataset(), tau=-1.0)),
    ("residual_dim", ValueError, lambda: AuxVAE.from_dataset(_dataset(), residual_dim=-2)),
    ("likelihood", ValueError, lambda: AuxVAE.from_dataset(_dataset(), likelihood="poisson")),
    ("image_size", ValueError, lambda: AuxVAE(_vae().scaler, 24)),
    ("images", ValueError, lambda: _vae().encode(np.zeros((2, 32, 32)))),
    ("images", ValueError, lambda: _vae().encode(NAN_IMAGES)),
    ("images", TypeError, lambda: _vae().encode(np.array([["a"]]))),
    ("aux", ValueError, lambda: _vae().generate({"mass": 1.0})),
    ("aux['x0']", ValueError, lambda: _vae().generate({"x0": float("nan")})),
    ("aux", TypeError, lambda: _vae().generate([0.5, 0.5])),
    ("epochs", ValueError, lambda: _vae().fit(_dataset(), epochs=0, progress=False)),
    ("batch_size", ValueError, lambda: _vae().fit(_dataset(), batch_size=1, progress=False)),
    ("dataset", ValueError, lambda: _vae().fit(data.simulate("halos", 8, size=16), progress=False)),
    # inverse problems
    ("sensors", ValueError, lambda: SourceProblem(9, [[0.5, 1.5]], 0.1)),
    ("sensors", ValueError, lambda: SourceProblem(9, [[0.5, np.nan]], 0.1)),
    ("sensors", ValueError, lambda: SourceProblem(9, np.zeros((3, 3)), 0.1)),
    ("noise_sd", ValueError, lambda: SourceProblem(9, default_sensors(3), 0.0)),
    ("kappa", ValueError, lambda: SourceProblem(9, default_sensors(3), 0.1, kappa=-1.0)),
    ("field", ValueError, lambda: _problem().forward(torch.zeros(2, 8, 8))),
    ("field", ValueError, lambda: _problem().forward(torch.full((9, 9), float("nan")))),
    (
        "source",
        ValueError,
        lambda: ConductivityProblem(9, default_sensors(3), 0.1, source=np.ones((4, 4))),
    ),
    ("gamma", ValueError, lambda: GRFPrior(9, gamma=0.0, delta=1.0)),
    ("values", ValueError, lambda: Observations([np.nan, 1.0], [[0.5, 0.5]] * 2, 0.1, 9)),
    ("sensors", ValueError, lambda: Observations([1.0, 2.0], [[0.5, 0.5]], 0.1, 9)),
    (
        "truth_field",
        ValueError,
        lambda: Observations([1.0], [[0.5, 0.5]], 0.1, 9, truth_field=np.zeros((4, 4))),
    ),
    (
        "grid",
        ValueError,
        lambda: invert_run(_vae().generator(), Observations([1.0], [[0.5, 0.5]], 0.1, 9), "x"),
    ),
    (
        "observations",
        ValueError,
        lambda: infer(_problem16(), DeepPrior(_vae().generator()), np.zeros(3), method="map"),
    ),
    (
        "method",
        ValueError,
        lambda: infer(_problem16(), DeepPrior(_vae().generator()), np.zeros(9), method="mcmc"),
    ),
    # the collapsed deep prior
    ("sampler", ValueError, lambda: _collapsed(sampler="hmc")),
    ("num_samples", ValueError, lambda: _collapsed(num_samples=1)),
    ("num_screen", ValueError, lambda: _collapsed(num_screen=2)),
    ("num_draws", ValueError, lambda: _collapsed(num_draws=0)),
    ("num_chains", ValueError, lambda: _collapsed(sampler="nuts", num_chains=0)),
    ("target_accept_prob", ValueError, lambda: _collapsed(sampler="nuts", target_accept_prob=1)),
    ("bounds", ValueError, lambda: _collapsed(bounds=np.zeros((2, 2)))),
    ("prior box", ValueError, lambda: _collapsed(bounds=np.ones((4, 2)))),
    ("observations", ValueError, lambda: _collapsed(observations=np.full(9, np.nan))),
    ("residual field", ValueError, lambda: _collapsed(generator=_vae().generator())),
    ("covariance", ValueError, lambda: ResidualField.from_covariance(np.eye(5), np.zeros((1, 2)))),
    # metrics
    ("latents", ValueError, lambda: metrics.mcc(np.full((5, 2), np.nan), np.zeros((5, 2)))),
    ("degree", ValueError, lambda: metrics.leakage(np.zeros((5, 2)), np.zeros((5, 2)), degree=0)),
    (
        "level",
        ValueError,
        lambda: metrics.interval_coverage(np.zeros((10, 3)), np.zeros(3), level=1.5),
    ),
]


def test_table_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize(
    ("word", "error", "call"), CASES, ids=[f"{i}-{c[0]}" for i, c in enumerate(CASES)]
)
def test_bad_input_raises_naming_the_argument(word, error, call):
    with pytest.raises(error) as info:
        call()
    assert word in str(info.value), f"message {str(info.value)!r} does not name {word!r}"
