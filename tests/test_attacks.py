"""Bad files and forged checkpoints: each is refused with one line that names the file.

Kept as a list so that the next regression of any of them is caught (issue 24).
"""

from __future__ import annotations

import pickle
import time

import numpy as np
import pytest
import torch

from pyro_dlatent.checkpoint import load_checkpoint, save_checkpoint
from pyro_dlatent.models.auxvae import AuxVAE
from pyro_dlatent.models.base import GuidedLatentModel
from tests.models.test_auxvae import SMALL, synthetic

FIELDS = ("kind", "config", "scaler", "state", "history", "extra")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    ds = synthetic(64)
    model = AuxVAE.from_dataset(ds, residual_dim=2, seed=0, **SMALL)
    return model.save(tmp_path_factory.mktemp("ckpt") / "model.pt")


def _forge(source, target, change):
    ckpt = load_checkpoint(source)
    change(ckpt)
    save_checkpoint(target, **{k: getattr(ckpt, k) for k in FIELDS})  # a valid checksum
    return target


def _one_line_error(path, match):
    with pytest.raises(ValueError, match=match) as info:
        GuidedLatentModel.load(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_nan_weights_with_a_valid_checksum_are_refused(saved, tmp_path):
    def poison(ckpt):
        name = next(k for k, v in ckpt.state["model"].items() if v.is_floating_point())
        ckpt.state["model"][name] = torch.full_like(ckpt.state["model"][name], float("nan"))

    _one_line_error(_forge(saved, tmp_path / "nan.pt", poison), "non-finite weights")


def test_a_forged_size_in_the_config_allocates_nothing(saved, tmp_path):
    def huge(ckpt):
        ckpt.config["hidden"] = 10_000_000  # 82 GB of weights, if built

    start = time.perf_counter()
    _one_line_error(_forge(saved, tmp_path / "huge.pt", huge), "inconsistent")
    assert time.perf_counter() - start < 5.0


def test_a_pickle_is_refused_without_advice_to_unpickle_it(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"payload": np.float64(1.0), "code": print}, handle)
    message = _one_line_error(path, "could run code|not a readable")
    assert "weights_only" not in message


def test_a_checkpoint_that_loads_still_predicts(saved):
    model = GuidedLatentModel.load(saved)
    assert np.isfinite(model.encode(np.zeros((2, 16, 16))).z_aux_loc.numpy()).all()


@pytest.mark.parametrize(
    ("noise_sd", "match"),
    [
        (1e-300, "noise_sd >= 1e-18"),  # passed '> 0', then underflowed to 0 in float32
        (np.array([0.1, 0.2]), "noise_sd > 0"),  # was a TypeError naming nothing
        ("0.1", "noise_sd > 0"),
        (True, "noise_sd > 0"),
        (-1.0, "noise_sd > 0"),
        (float("nan"), "noise_sd > 0"),
    ],
)
def test_a_bad_noise_sd_is_named(noise_sd, match):
    from pyro_dlatent.inverse import SourceProblem, default_sensors
    from pyro_dlatent.inverse.run import Observations

    with pytest.raises(ValueError, match=match):
        SourceProblem(9, default_sensors(3), noise_sd)
    with pytest.raises(ValueError, match=match):
        Observations(np.ones(9), default_sensors(3), noise_sd, 9)


def test_observations_of_size_zero_blame_the_size():
    from pyro_dlatent.inverse import default_sensors
    from pyro_dlatent.inverse.run import Observations

    with pytest.raises(ValueError, match="size >= 3"):
        Observations(np.ones(9), default_sensors(3), 0.1, 0, truth_field=np.zeros((0, 0)))


@pytest.mark.parametrize("scale", [1e10, -1e10])
def test_map_on_data_the_prior_cannot_explain_warns_like_nuts(scale):
    # Observations scaled by +-1e10: MAP used to return a normal-looking summary.
    from pyro_dlatent.inverse.infer import InferenceWarning, infer
    from tests.inverse.test_infer import _linear_setup

    problem, prior, _, data = _linear_setup()
    settings = {"method": "map", "num_starts": 2, "steps": 50, "lbfgs_steps": 20}
    settings.update(num_samples=10, progress=False)
    with pytest.warns(InferenceWarning, match="noise sds"):
        result = infer(problem, prior, data * scale, **settings)
    assert result.health["misfit_rms"] > 1e6
    quiet = infer(problem, prior, data, **settings)
    assert quiet.health["misfit_rms"] < 5.0
