"""Aux-VAE: trace structure, penalties, training behaviour, persistence and input checks."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.optim import PyroOptim
from pyro.optim.clipped_adam import ClippedAdam as ClippedAdamRule

from pyro_dlatent import training
from pyro_dlatent.checkpoint import load_checkpoint, save_checkpoint
from pyro_dlatent.data import aux_array, from_arrays
from pyro_dlatent.latent import AuxScaler
from pyro_dlatent.models.auxvae import AuxVAE, DecoderGenerator
from pyro_dlatent.models.base import (
    ALIGN_SITE,
    DECOR_SITE,
    OBS_SITE,
    GuidedLatentModel,
    NonFiniteLossError,
)
from pyro_dlatent.penalties import decorrelation_penalty
from pyro_dlatent.training import _ForeachClippedAdam
from tests.conftest import assert_close

SIZE = 16
PIXELS = SIZE * SIZE
SMALL = {"width": 8, "hidden": 64}


def synthetic(n: int, *, seed: int = 0, missing: float = 0.0):
    """Blobs whose amplitude is set by log10(mass), width by ``width`` and x-offset by a hidden h.

    The images are a deterministic function of (mass, width, h), all independent and uniform:
    log10 mass in [13, 15], width in [1.5, 3.5] pixels, h in [-1, 1] (3 pixels of offset).
    """
    rng = np.random.default_rng(seed)
    mass = 10 ** rng.uniform(13.0, 15.0, n)
    width = rng.uniform(1.5, 3.5, n)
    hidden = rng.uniform(-1.0, 1.0, n)
    c = np.arange(SIZE) - (SIZE - 1) / 2
    x, y = np.meshgrid(c, c)
    amplitude = np.log10(mass) - 12.0
    offset = 3.0 * hidden
    radius2 = (x[None] - offset[:, None, None]) ** 2 + y[None] ** 2
    images = amplitude[:, None, None] * np.exp(-radius2 / (2 * width[:, None, None] ** 2))
    aux = {"mass": mass, "width": width}
    if missing:
        for values in aux.values():
            values[rng.random(n) < missing] = np.nan
    return from_arrays(
        images,
        aux,
        units={"mass": "Msun", "width": "pixel"},
        transforms={"mass": "log10"},
        extra={"hidden": hidden},
    )


def unlabelled(ds):
    """The same images with every auxiliary missing (trains a plain, untethered VAE)."""
    out = ds.copy(deep=True)
    for name in ds.attrs["aux_names"]:
        out[name].values[:] = np.nan
    return out


def standardized_aux(model, ds) -> torch.Tensor:
    return torch.as_tensor(model.scaler.transform(aux_array(ds)), dtype=torch.float32)


FIT = {"epochs": 10, "batch_size": 64, "lr": 3e-3, "lr_decay": 1.0, "progress": False}


@pytest.fixture(scope="module")
def data():
    return synthetic(1024, seed=0)


@pytest.fixture(scope="module")
def trained(data):
    model = AuxVAE.from_dataset(data, residual_dim=2, seed=0, **SMALL)
    model.fit(data, **FIT)
    return model


@pytest.fixture(scope="module")
def plain(data):
    model = AuxVAE.from_dataset(
        data, residual_dim=2, align_weight=0.0, decor_weight=0.0, seed=0, **SMALL
    )
    model.fit(unlabelled(data), **FIT)
    return model


def small_model(ds, **kwargs):
    options = {"residual_dim": 3, "seed": 0, **SMALL, **kwargs}
    return AuxVAE.from_dataset(ds, **options)


# ---------------------------------------------------------------------------- model structure
def test_trace_site_names_shapes_and_scales():
    ds = synthetic(40)
    model = small_model(ds, align_weight=2.0, decor_weight=3.0)
    images, aux, _ = model.prepare(ds)
    batch, index = images[:8], torch.arange(8)
    kwargs = {"num_data": 40, "subsample": index}
    guide = poutine.trace(model.guide).get_trace(batch, aux[:8], None, **kwargs)
    assert guide.nodes["z_aux"]["value"].shape == (8, 2)
    assert guide.nodes["z_rec"]["value"].shape == (8, 3)
    assert guide.nodes["z_aux"]["fn"].event_shape == (2,)
    assert [f.name for f in guide.nodes["z_rec"]["cond_indep_stack"]] == ["data"]
    replayed = poutine.replay(model.model, trace=guide)
    trace = poutine.trace(replayed).get_trace(batch, aux[:8], None, **kwargs)
    sample_sites = {n for n, s in trace.nodes.items() if s["type"] == "sample"}
    assert {"data", "z_aux", "z_rec", OBS_SITE, ALIGN_SITE, DECOR_SITE} <= sample_sites
    assert trace.nodes[OBS_SITE]["is_observed"]
    assert trace.nodes[OBS_SITE]["value"].shape == (8, SIZE, SIZE)
    assert trace.nodes[OBS_SITE]["fn"].event_shape == (SIZE, SIZE)
    assert trace.nodes[OBS_SITE]["scale"] == pytest.approx(40 / 8)
    assert trace.nodes["z_aux"]["scale"] == pytest.approx(40 / 8)
    assert trace.nodes[ALIGN_SITE]["scale"] == pytest.approx(40.0)
    assert trace.nodes[ALIGN_SITE]["cond_indep_stack"] == ()


def test_penalty_factors_carry_the_weighted_penalties():
    ds = synthetic(64)
    model = small_model(ds, align_weight=2.0, decor_weight=3.0)
    images, aux, _ = model.prepare(ds)
    trace = poutine.trace(model.model).get_trace(images, aux)
    alignment, decorrelation = model.penalties(model.encoder_params(images)[0], aux)
    assert alignment.item() > 0 and decorrelation.item() > 0
    align_site, decor_site = trace.nodes[ALIGN_SITE], trace.nodes[DECOR_SITE]
    assert align_site["fn"].log_prob(align_site["value"]).item() == pytest.approx(
        -PIXELS * 2.0 * alignment.item(), rel=1e-5
    )
    assert decor_site["fn"].log_prob(decor_site["value"]).item() == pytest.approx(
        -PIXELS * 3.0 * decorrelation.item(), rel=1e-5
    )


def test_zero_weights_remove_the_factor_sites_and_no_aux_removes_penalties():
    ds = synthetic(32)
    model = small_model(ds, align_weight=0.0, decor_weight=1.0)
    images, aux, _ = model.prepare(ds)
    trace = poutine.trace(model.model).get_trace(images, aux)
    assert ALIGN_SITE not in trace.nodes and DECOR_SITE in trace.nodes
    unguided = poutine.trace(model.model).get_trace(images)
    assert DECOR_SITE not in unguided.nodes
    # Without auxiliaries z_aux has the marginal prior N(0, 1 + tau^2).
    marginal = math.sqrt(1 + model.tau**2)
    assert_close(unguided.nodes["z_aux"]["fn"].base_dist.scale[0], [marginal] * 2, rtol=1e-6)


def test_square_decorrelation_form_is_the_factor():
    ds = synthetic(64)
    model = small_model(ds, decor_weight=3.0, decor_form="square")
    assert model.config["decor_form"] == "square"
    images, aux, _ = model.prepare(ds)
    trace = poutine.trace(model.model).get_trace(images, aux)
    mu_rec = model.encoder_params(images)[0][:, model.aux_dim :]
    expected = decorrelation_penalty(mu_rec, aux, form="square")
    assert expected.item() != pytest.approx(decorrelation_penalty(mu_rec, aux).item())
    site = trace.nodes[DECOR_SITE]
    assert site["fn"].log_prob(site["value"]).item() == pytest.approx(
        -PIXELS * 3.0 * expected.item(), rel=1e-5
    )


def test_learning_rate_decays_to_lr_times_lr_decay():
    ds = synthetic(96)
    model = small_model(ds)
    # 86 training images in batches of 32: 3 steps per epoch, 6 steps in all.
    model.fit(ds, epochs=2, batch_size=32, lr=1e-2, lr_decay=0.1, progress=False)
    rates = [s["param_groups"][0]["lr"] for s in model._optim.get_state().values()]
    assert len(rates) == len([p for p in model.parameters() if p.requires_grad])
    assert rates == pytest.approx([1e-3] * len(rates), rel=1e-9)
    defaults = small_model(ds)
    defaults.fit(ds, epochs=1, batch_size=32, progress=False)
    lr, decay = AuxVAE.fit_defaults["lr"], AuxVAE.fit_defaults["lr_decay"]
    rates = [s["param_groups"][0]["lr"] for s in defaults._optim.get_state().values()]
    assert rates == pytest.approx([lr * decay] * len(rates), rel=1e-9)
    assert GuidedLatentModel.fit_defaults == {"lr": 1e-3, "lr_decay": 1.0}


def test_elbo_and_penalties_are_reported_separately():
    ds = synthetic(64)
    model = small_model(ds, align_weight=2.0, decor_weight=3.0)
    images, aux, mask = model.prepare(ds)
    encoded = model.encoder_params(images)
    args = (images, aux, mask)
    kwargs = {"num_data": 640, "subsample": torch.arange(64), "encoded": encoded}
    guide = poutine.trace(model.guide).get_trace(*args, **kwargs)
    full = poutine.trace(poutine.replay(model.model, trace=guide)).get_trace(*args, **kwargs)
    hidden = poutine.block(model.model, hide=[ALIGN_SITE, DECOR_SITE])
    alone = poutine.trace(poutine.replay(hidden, trace=guide)).get_trace(*args, **kwargs)
    objective = full.log_prob_sum() - guide.log_prob_sum()
    elbo = alone.log_prob_sum() - guide.log_prob_sum()
    alignment, decorrelation = model.penalties(encoded[0], aux, mask)
    # Per-pixel weights: the factors add -N H W (w_align A + w_decor D).
    weighted = 640 * PIXELS * (2.0 * alignment + 3.0 * decorrelation)
    assert weighted.item() > 1.0
    assert (elbo - objective).item() == pytest.approx(weighted.item(), rel=1e-5)
    # The same split in the estimator SVI minimizes.
    pyro.set_rng_seed(3)
    loss_full = Trace_ELBO().loss(model.model, model.guide, *args, **kwargs)
    pyro.set_rng_seed(3)
    loss_alone = Trace_ELBO().loss(hidden, model.guide, *args, **kwargs)
    assert loss_full - loss_alone == pytest.approx(weighted.item(), rel=1e-4)


def test_history_reports_elbo_without_penalties(trained):
    assert len(trained.history) == FIT["epochs"]
    for record in trained.history:
        gap = record["elbo"] - record["objective"]
        penalties = PIXELS * (
            trained.align_weight * record["alignment"]
            + trained.decor_weight * record["decorrelation"]
        )
        assert penalties > 0
        assert gap == pytest.approx(penalties, rel=1e-6, abs=1e-6)
        gap = record["val_elbo"] - record["val_objective"]
        penalties = PIXELS * (
            trained.align_weight * record["val_alignment"]
            + trained.decor_weight * record["val_decorrelation"]
        )
        assert gap == pytest.approx(penalties, rel=1e-6, abs=1e-6)
        assert record["val_recon_mse"] > 0
    assert trained.history[-1]["elbo"] > trained.history[0]["elbo"]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"obs_scale": "pixel", "learn_tau": True},
        {"likelihood": "logmse", "norm": "none", "activation": "gelu"},
    ],
)
def test_gradients_reach_every_parameter(options):
    ds = synthetic(32, missing=0.3)
    model = small_model(ds, **options)
    images, aux, mask = model.prepare(ds)
    assert mask is not None
    loss = Trace_ELBO().differentiable_loss(model.model, model.guide, images, aux, mask)
    loss.backward()
    trained = [(n, p) for n, p in model.named_parameters() if not n.startswith("mean_decoder.")]
    assert len(trained) > 0
    for name, param in trained:
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name
        assert torch.isfinite(param.grad).all(), name


# ---------------------------------------------------------------------------- training behaviour
def test_guided_coordinates_track_their_auxiliaries(trained, data):
    # With tau = 0.05 the KL term puts (mu_j - u_j)^2 / (2 tau^2) = 200 (mu_j - u_j)^2 on each
    # guided mean, so a working tether drives the encoder error e_j = mu_j - u_j far below 1
    # standardized unit; r = 1 / sqrt(1 + var(e_j)) > 0.9 needs only sd(e_j) < 0.48. The sampling
    # sd of r over n = 1024 images near r = 0.95 is (1 - r^2) / sqrt(n) < 0.01, so the bound
    # fails only if the tether does not work.
    u = standardized_aux(trained, data)
    z = trained.encode(data).z_aux_loc
    for j in range(trained.aux_dim):
        assert np.corrcoef(z[:, j], u[:, j])[0, 1] > 0.9


def test_residual_leaks_less_than_a_plain_vae(trained, plain, data):
    u = standardized_aux(trained, data)
    leak = decorrelation_penalty(trained.encode(data).z_rec_loc, u).item()
    plain_leak = decorrelation_penalty(plain.encode(data).z_rec_loc, u).item()
    # Independent coordinates give a mean |corr| of sqrt(2 / pi) / sqrt(1024) = 0.025 (sd of the
    # mean of 16 entries below 0.01). The plain VAE's four exchangeable latents share mass, width
    # and h, so its last two carry O(0.1-1) correlations with the auxiliaries.
    assert leak < 0.06
    assert leak < 0.5 * plain_leak


def test_missing_auxiliaries_train_without_nan():
    ds = synthetic(512, seed=1, missing=0.5)
    model = small_model(ds, residual_dim=2)
    history = model.fit(ds, epochs=6, batch_size=64, lr=3e-3, lr_decay=1.0, progress=False)
    for record in history:
        for key, value in record.items():
            if isinstance(value, float):
                assert math.isfinite(value), key
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), name
    full = synthetic(512, seed=1)
    u = standardized_aux(model, full)
    z = model.encode(full).z_aux_loc
    # Half the labels still tether each coordinate (same argument as the fully labelled test).
    for j in range(model.aux_dim):
        assert np.corrcoef(z[:, j], u[:, j])[0, 1] > 0.9


def test_generate_uses_physical_units(trained):
    masses = (10**13.5, 10**14.5)
    images = trained.generate({"mass": list(masses), "width": 2.5}, num=64, seed=1)
    assert images.shape == (128, SIZE, SIZE)
    predicted = trained.predict_aux(images)
    assert predicted["mass"].attrs["units"] == "Msun"
    log_mass = np.log10(predicted["mass"].values).reshape(2, 64).mean(axis=1)
    width = predicted["width"].values.reshape(2, 64).mean(axis=1)
    # Draws scatter by tau = 0.05 standardized units (0.029 dex of mass, 0.029 pixel of width), so
    # a mean of 64 is off by about 0.004; the encoder's own error at r = 0.99 is about
    # 0.14 standardized = 0.08 dex per image. 0.2 dex and 0.3 pixel leave room for its bias.
    np.testing.assert_allclose(log_mass, [13.5, 14.5], atol=0.2)
    np.testing.assert_allclose(width, [2.5, 2.5], atol=0.3)
    again = trained.generate({"mass": list(masses), "width": 2.5}, num=64, seed=1)
    assert_close(again, images)


def test_uncalibrated_predict_aux_reports_the_guides_lognormal_moments_and_warns(
    trained, data, tmp_path
):
    model = AuxVAE.load(trained.save(tmp_path / "model.pt"))
    model.aux_calibration.reset()
    images = data["image"].values[:4]
    with pytest.warns(UserWarning, match="not calibrated"):
        predicted = model.predict_aux(images)
    assert predicted.attrs["calibrated"] == []
    assert "not calibrated" in predicted["mass_sd"].attrs["long_name"]
    encoding = model.encode(images)
    generator = torch.Generator().manual_seed(0)
    draws = 200_000
    z = encoding.z_aux_loc.double() + encoding.z_aux_scale.double() * torch.randn(
        draws, 4, trained.aux_dim, generator=generator, dtype=torch.float64
    )
    physical = model.scaler.inverse_transform_tensor(z)
    mc_mean, mc_sd = physical.mean(0).numpy(), physical.std(0).numpy()
    for j, name in enumerate(model.aux_names):
        # Monte Carlo error of a mean of 2e5 draws: sd / sqrt(2e5) = 0.0022 sd; 5 sigma = 0.011 sd.
        # The sd estimate of a near-normal variable has relative error 1 / sqrt(2 * 2e5) = 0.0016;
        # the 200 equally likely quantiles that predict_aux averages miss the tails beyond
        # 1/400 and 399/400 and so understate the sd by about 1%.
        np.testing.assert_allclose(
            predicted[name].values, mc_mean[:, j], atol=0.011 * mc_sd[:, j].max()
        )
        np.testing.assert_allclose(predicted[f"{name}_sd"].values, mc_sd[:, j], rtol=0.025)
    # the guide's median of the mass is 10 ** (mean + std m): inside the quartiles
    median = 10 ** (model.scaler.mean[0] + model.scaler.std[0] * encoding.z_aux_loc[:, 0].numpy())
    assert np.all(predicted["mass_q25"].values < median)
    assert np.all(median < predicted["mass_q75"].values)


def test_generator_is_the_frozen_decoder(trained):
    generator = trained.generator()
    assert isinstance(generator, DecoderGenerator)
    assert (generator.aux_dim, generator.residual_dim, generator.image_size) == (2, 2, SIZE)
    assert generator.scaler.names == ["mass", "width"]
    assert generator.tau == pytest.approx(0.05)
    assert not any(p.requires_grad for p in generator.parameters())
    z_aux = torch.randn(5, 2, requires_grad=True)
    z_rec = torch.randn(5, 2)
    images = generator(z_aux, z_rec)
    assert images.shape == (5, SIZE, SIZE)
    assert_close(images, trained.decode(z_aux.detach(), z_rec), atol=1e-5, rtol=1e-5)
    assert_close(generator(z_aux, z_rec), images)
    images.sum().backward()
    assert z_aux.grad is not None and torch.isfinite(z_aux.grad).all()
    assert generator(z_aux.detach().expand(3, 5, 2), z_rec.expand(3, 5, 2)).shape == (
        3,
        5,
        SIZE,
        SIZE,
    )
    with pytest.raises(ValueError, match="z_aux"):
        generator(torch.zeros(5, 3), z_rec)


def test_reconstruction_beats_the_mean_image(trained, data):
    images = torch.as_tensor(data["image"].values[:200])
    error = (trained.reconstruct(images) - images).pow(2).mean()
    baseline = (images - images.mean(0)).pow(2).mean()
    assert error < 0.2 * baseline


# ---------------------------------------------------------------------------- persistence
def test_save_load_round_trip(trained, data, tmp_path):
    path = trained.save(tmp_path / "model.pt")
    loaded = GuidedLatentModel.load(path)
    assert type(loaded) is AuxVAE
    assert loaded.config == trained.config
    assert loaded.history == trained.history
    assert loaded.scaler.state_dict() == trained.scaler.state_dict()
    assert_close(loaded.encode(data)._asdict(), trained.encode(data)._asdict(), atol=0, rtol=0)
    z_aux, z_rec = torch.randn(4, 2), torch.randn(4, 2)
    assert_close(loaded.decode(z_aux, z_rec), trained.decode(z_aux, z_rec), atol=0, rtol=0)
    assert_close(
        loaded.generate({"mass": 1e14}, num=3, seed=0),
        trained.generate({"mass": 1e14}, num=3, seed=0),
        atol=0,
        rtol=0,
    )
    assert load_checkpoint(path).state["optimizer"]


def test_same_seed_same_weights_and_global_rng_untouched():
    ds = synthetic(128)
    first, second = small_model(ds), small_model(ds)
    assert_close(dict(first.state_dict()), dict(second.state_dict()), atol=0, rtol=0)
    state = torch.get_rng_state()
    first.fit(ds, epochs=2, batch_size=32, progress=False, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    second.fit(ds, epochs=2, batch_size=32, progress=False, seed=4)
    assert_close(dict(first.state_dict()), dict(second.state_dict()), atol=0, rtol=0)


def _without_time(history):
    return [{k: v for k, v in h.items() if k != "time_s"} for h in history]


def test_resume_continues_exactly(tmp_path):
    ds = synthetic(128)
    # The shorter run stands in for an interrupted one; with a decaying learning rate its
    # schedule (set by the total epochs) would differ, so the rate is held constant here. The
    # SIGKILL test interrupts a real run with the default decaying schedule.
    settings = {"batch_size": 32, "progress": False, "seed": 2, "lr_decay": 1.0}
    # A learned tau also checks that the optimizer state of a PyroParam is restored.
    reference = small_model(ds, learn_tau=True)
    reference.fit(ds, epochs=3, checkpoint_dir=tmp_path / "a", **settings)
    interrupted = small_model(ds, learn_tau=True)
    interrupted.fit(ds, epochs=2, checkpoint_dir=tmp_path / "b", **settings)
    resumed = small_model(ds, learn_tau=True)
    history = resumed.fit(ds, epochs=3, checkpoint_dir=tmp_path / "b", resume=True, **settings)
    assert len(history) == 3
    assert history[-1]["tau"] != 0.05
    assert _without_time(history) == _without_time(reference.history)
    assert_close(dict(resumed.state_dict()), dict(reference.state_dict()), atol=0, rtol=0)
    with pytest.raises(ValueError, match="lr"):
        small_model(ds, learn_tau=True).fit(ds, epochs=3, resume=tmp_path / "b", lr=0.5, **settings)
    with pytest.raises(ValueError, match="different config"):
        small_model(ds).fit(ds, epochs=3, resume=tmp_path / "b", **settings)
    with pytest.raises(ValueError, match="different dataset"):
        other = synthetic(128, seed=5)
        small_model(ds, learn_tau=True).fit(other, epochs=3, resume=tmp_path / "b", **settings)
    # a checkpoint written before an option existed resumes as that option's default
    from pyro_dlatent.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(tmp_path / "b" / "last.pt")
    fields = ("kind", "scaler", "state", "history", "extra")
    older = {k: v for k, v in ckpt.config.items() if k != "encoder_depth"}
    (tmp_path / "c").mkdir()
    save_checkpoint(
        tmp_path / "c" / "last.pt", config=older, **{k: getattr(ckpt, k) for k in fields}
    )
    again = small_model(ds, learn_tau=True)
    again.fit(ds, epochs=3, resume=tmp_path / "c", **settings)
    assert _without_time(again.history) == _without_time(reference.history)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    ds = synthetic(64)
    model = small_model(ds)
    original = model.likelihood
    calls = {"count": 0}

    def poisoned(images_std, z_aux, z_rec):
        calls["count"] += 1
        if calls["count"] > 2:  # two steps per epoch: the first step of epoch 1
            images_std = images_std * float("nan")
        return original(images_std, z_aux, z_rec)

    monkeypatch.setattr(model, "likelihood", poisoned)
    with pytest.raises(NonFiniteLossError, match="epoch 1, step 0") as info:
        model.fit(
            ds, epochs=3, batch_size=32, val_fraction=0.0, progress=False, checkpoint_dir=tmp_path
        )
    assert info.value.checkpoint == tmp_path / "last.pt"
    ckpt = load_checkpoint(info.value.checkpoint)
    assert len(ckpt.history) == 1
    # The failing step did not touch the parameters: they equal the epoch-0 checkpoint.
    assert_close(dict(model.state_dict()), ckpt.state["model"], atol=0, rtol=0)


# ---------------------------------------------------------------------------- optimizer
class _PerParameterClippedAdam(PyroOptim):
    """Pyro's own ClippedAdam (one torch optimizer per parameter), as fit used it before."""

    def __init__(self, **optim_args):
        super().__init__(ClippedAdamRule, optim_args)

    def param_states(self):
        return {p: optimizer.state_dict() for p, optimizer in self.optim_objs.items()}


def test_foreach_clipped_adam_is_pyro_clipped_adam_step_by_step():
    # Large gradients (so the clamp binds), a parameter that is seen without a gradient on some
    # steps (its rate still decays, its step count does not) and one first seen late.
    # Tolerance 0: on the CPU the foreach ops run the per-tensor kernels of ClippedAdam with
    # the same Python-float step sizes, so every bit must agree.
    generator = torch.Generator().manual_seed(3)
    settings = {"lr": 0.05, "lrd": 0.9, "clip_norm": 0.7}
    sides = {
        "pyro": _PerParameterClippedAdam(**settings),
        "foreach": _ForeachClippedAdam(**settings),
    }
    params = {}
    for side in sides:
        init = torch.Generator().manual_seed(1)
        values = [torch.randn(3, 4, generator=init) for _ in range(3)]
        params[side] = [pyro.param(f"{side}.p{i}", v).unconstrained() for i, v in enumerate(values)]
    for step in range(6):
        grads = [2.0 * torch.randn(3, 4, generator=generator) for _ in range(3)]
        for side, optim in sides.items():
            seen = params[side] if step >= 2 else params[side][:2]
            for i, p in enumerate(seen):
                p.grad = None if (i == 1 and step % 3 == 0) else grads[i].clone()
            optim(seen)
    assert_close(params["foreach"], params["pyro"], atol=0, rtol=0)
    states = {side: optim.param_states() for side, optim in sides.items()}
    state = [states["foreach"][p] for p in params["foreach"]]
    assert_close(state, [states["pyro"][p] for p in params["pyro"]], atol=0, rtol=0)
    assert state[1]["state"][0]["step"] == 4
    assert state[1]["param_groups"][0]["lr"] == pytest.approx(0.05 * 0.9**6)
    assert state[2]["param_groups"][0]["lr"] == pytest.approx(0.05 * 0.9**4)
    assert set(sides["foreach"].get_state()) == {"foreach.p0", "foreach.p1", "foreach.p2"}


def test_fit_trains_exactly_as_with_pyro_clipped_adam(monkeypatch):
    # The whole fit, with clipping, decay and a learned tau: the per-parameter ClippedAdam and
    # the foreach update must give bit-identical weights and optimizer state (see above for
    # why the tolerance is 0).
    ds = synthetic(96)
    settings = {"epochs": 2, "batch_size": 32, "lr": 1e-2, "lr_decay": 0.3, "clip_norm": 0.5}
    new = small_model(ds, learn_tau=True)
    new.fit(ds, progress=False, **settings)
    unclipped = small_model(ds, learn_tau=True)
    unclipped.fit(ds, progress=False, **{**settings, "clip_norm": None})
    monkeypatch.setattr(training, "_ForeachClippedAdam", _PerParameterClippedAdam)
    old = small_model(ds, learn_tau=True)
    old.fit(ds, progress=False, **settings)
    assert_close(dict(new.state_dict()), dict(old.state_dict()), atol=0, rtol=0)
    assert_close(new._optimizer_state(), old._optimizer_state(), atol=0, rtol=0)
    assert new.history[-1]["elbo"] == old.history[-1]["elbo"]
    # The clamp binds in this setting, so the comparison covers it.
    pairs = zip(new.parameters(), unclipped.parameters(), strict=True)
    assert not all(torch.equal(a, b) for a, b in pairs)


def _network_weights(state):
    return {k: v for k, v in state.items() if k.split(".")[0] in ("encoder", "decoder")}


@pytest.mark.filterwarnings("ignore:ema_decay=.* leaves:UserWarning")  # short test fits
def test_weight_average_is_the_exponential_moving_average_of_the_steps(tmp_path):
    # One step per epoch (the batch holds the whole training part), constant rate: the live
    # weights after step 1 are the epoch-1 checkpoint's, after step 2 the finished file keeps.
    ds = synthetic(24)
    settings = {"batch_size": 64, "progress": False, "seed": 3, "lr_decay": 1.0, "val_fraction": 0}
    decay = 0.75
    plain = small_model(ds)
    plain.fit(ds, epochs=2, **settings)
    first = small_model(ds)
    first.fit(ds, epochs=1, checkpoint_dir=tmp_path / "one", ema_decay=decay, **settings)
    averaged = small_model(ds)
    averaged.fit(ds, epochs=2, checkpoint_dir=tmp_path / "two", ema_decay=decay, **settings)
    w1 = _network_weights(load_checkpoint(tmp_path / "one" / "last.pt").state["average"]["weights"])
    saved = load_checkpoint(tmp_path / "two" / "last.pt").state
    w2 = _network_weights(saved["average"]["weights"])
    assert saved["average"]["applied"] is True and int(saved["average"]["updates"]) == 2
    # averaging never changes the training path: the live weights are the plain run's
    assert_close(w2, _network_weights(dict(plain.state_dict())), atol=0, rtol=0)
    expected = {k: decay * w1[k] + (1 - decay) * w2[k] for k in w2}
    assert_close(_network_weights(dict(averaged.state_dict())), expected, atol=1e-6, rtol=1e-5)
    assert_close(_network_weights(saved["model"]), expected, atol=1e-6, rtol=1e-5)
    loaded = AuxVAE.load(tmp_path / "two" / "last.pt")
    assert_close(_network_weights(dict(loaded.state_dict())), expected, atol=1e-6, rtol=1e-5)
    moved = max((expected[k] - w2[k]).abs().max().item() for k in w2)
    assert moved > 1e-4  # the average is not the live weights


@pytest.mark.filterwarnings("ignore:ema_decay=.* leaves:UserWarning")  # short test fits
def test_resume_with_weight_average_continues_exactly(tmp_path):
    ds = synthetic(96)
    settings = {"batch_size": 32, "progress": False, "seed": 2, "lr_decay": 1.0, "ema_decay": 0.9}
    reference = small_model(ds)
    reference.fit(ds, epochs=3, checkpoint_dir=tmp_path / "a", **settings)
    interrupted = small_model(ds)
    interrupted.fit(ds, epochs=2, checkpoint_dir=tmp_path / "b", **settings)  # finished, applied
    resumed = small_model(ds)
    resumed.fit(ds, epochs=3, checkpoint_dir=tmp_path / "b", resume=True, **settings)
    assert _without_time(resumed.history) == _without_time(reference.history)
    assert_close(dict(resumed.state_dict()), dict(reference.state_dict()), atol=0, rtol=0)
    a = load_checkpoint(tmp_path / "a" / "last.pt").state["average"]
    b = load_checkpoint(tmp_path / "b" / "last.pt").state["average"]
    assert_close(a["weights"], b["weights"], atol=0, rtol=0)
    assert int(a["updates"]) == int(b["updates"]) == 9
    for other in (0.5, 0.0):
        with pytest.raises(ValueError, match="ema_decay"):
            changed = {**settings, "ema_decay": other}
            small_model(ds).fit(ds, epochs=4, resume=tmp_path / "b", **changed)
    old = tmp_path / "plain"
    small_model(ds).fit(ds, epochs=1, checkpoint_dir=old, **{**settings, "ema_decay": 0.0})
    with pytest.raises(ValueError, match=r"ema_decay=0\.0; pass ema_decay=0\.0"):
        small_model(ds).fit(ds, epochs=2, resume=old, **settings)
    before = load_checkpoint(old / "last.pt")  # a checkpoint from before the option: no key
    del before.extra["fit"]["ema_decay"]
    fields = ("kind", "config", "scaler", "state", "history", "extra")
    save_checkpoint(old / "last.pt", **{k: getattr(before, k) for k in fields})
    with pytest.raises(ValueError, match=r"ema_decay=0\.0; pass ema_decay=0\.0"):
        small_model(ds).fit(ds, epochs=2, resume=old, **settings)
    small_model(ds).fit(ds, epochs=2, resume=old, **{**settings, "ema_decay": 0.0})


def test_resume_with_another_validation_batch_continues_the_training_exactly(tmp_path):
    # every epoch reseeds, so the validation pass's batching cannot change the training; a
    # checkpoint written with the old default (1024) resumes under the new one
    ds = synthetic(96)
    settings = {"batch_size": 32, "progress": False, "seed": 2, "lr_decay": 1.0}
    reference = small_model(ds)
    reference.fit(ds, epochs=2, **settings)
    small_model(ds).fit(ds, epochs=1, checkpoint_dir=tmp_path, eval_batch_size=3, **settings)
    resumed = small_model(ds)
    resumed.fit(ds, epochs=2, checkpoint_dir=tmp_path, resume=True, **settings)
    assert_close(dict(resumed.state_dict()), dict(reference.state_dict()), atol=0, rtol=0)
    trained = [{k: v for k, v in h.items() if not k.startswith("val_")} for h in resumed.history]
    assert _without_time(trained) == _without_time(
        [{k: v for k, v in h.items() if not k.startswith("val_")} for h in reference.history]
    )


def test_resume_from_a_checkpoint_of_the_per_parameter_optimizer(monkeypatch, tmp_path):
    # Checkpoints written while fit used Pyro's ClippedAdam resume exactly with the foreach one.
    ds = synthetic(96)
    settings = {"batch_size": 32, "progress": False, "seed": 2, "lr_decay": 1.0}
    reference = small_model(ds, learn_tau=True)
    reference.fit(ds, epochs=2, **settings)
    with monkeypatch.context() as patch:
        patch.setattr(training, "_ForeachClippedAdam", _PerParameterClippedAdam)
        small_model(ds, learn_tau=True).fit(ds, epochs=1, checkpoint_dir=tmp_path, **settings)
    resumed = small_model(ds, learn_tau=True)
    resumed.fit(ds, epochs=2, checkpoint_dir=tmp_path, resume=True, **settings)
    assert _without_time(resumed.history) == _without_time(reference.history)
    assert_close(dict(resumed.state_dict()), dict(reference.state_dict()), atol=0, rtol=0)
    saved = load_checkpoint(tmp_path / "last.pt").state["optimizer"]
    assert_close(saved, reference._optimizer_state(), atol=0, rtol=0)


# ---------------------------------------------------------------------------- bad input
def _fitted_scaler():
    return AuxScaler(["a", "b"]).fit({"a": [0.0, 1.0, 2.0], "b": [1.0, 2.0, 4.0]})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tau": 0.0}, "tau"),
        ({"tau": -1.0}, "tau"),
        ({"tau": float("nan")}, "tau"),
        ({"image_size": 24}, "image_size"),
        ({"residual_dim": -1}, "residual_dim"),
        ({"likelihood": "poisson"}, "likelihood"),
        ({"obs_scale": "row"}, "obs_scale"),
        ({"align_weight": -1.0}, "align_weight"),
        ({"decor_weight": float("inf")}, "decor_weight"),
        ({"degree": 0}, "degree"),
        ({"image_scale": 0.0}, "image_scale"),
        ({"activation": "relu"}, "activation"),
        ({"decor_form": "l1"}, "decor_form"),
    ],
)
def test_bad_constructor_arguments_raise(kwargs, match):
    options = {"image_size": 16, **kwargs}
    with pytest.raises(ValueError, match=match):
        AuxVAE(_fitted_scaler(), **options)


def test_unfitted_scaler_raises():
    with pytest.raises(ValueError, match="scaler"):
        AuxVAE(AuxScaler(["a"]), 16)


@pytest.fixture(scope="module")
def untrained():
    return AuxVAE.from_dataset(synthetic(32), residual_dim=2, seed=0, **SMALL)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda m: m.encode(np.zeros((2, 32, 32))), ValueError, "images"),
        (lambda m: m.encode(np.zeros((16, 16))), ValueError, "images"),
        (lambda m: m.encode(np.full((2, 16, 16), np.nan)), ValueError, "images"),
        (lambda m: m.encode(np.array([["a"]])), TypeError, "images"),
        (lambda m: m.predict_aux(np.zeros((1, 8, 8))), ValueError, "images"),
        (lambda m: m.generate({"redshift": 1.0}), ValueError, "aux"),
        (lambda m: m.generate({"mass": -1.0}), ValueError, "mass"),
        (lambda m: m.generate({"mass": [1e14, 1e15], "width": [1, 2, 3]}), ValueError, "aux"),
        (lambda m: m.generate({"mass": np.nan}), ValueError, "mass"),
        (lambda m: m.generate([1e14, 2.0]), TypeError, "aux"),
        (lambda m: m.generate(num=0), ValueError, "num"),
        (lambda m: m.decode(torch.zeros(2, 3), torch.zeros(2, 2)), ValueError, "z_aux"),
        (lambda m: m.decode(torch.zeros(2, 2), torch.zeros(3, 2)), ValueError, "z_rec"),
        (
            lambda m: m.fit(
                synthetic(8).rename({"mass": "m"}).assign_attrs(aux_names=["m", "width"])
            ),
            ValueError,
            "dataset",
        ),
        (lambda m: m.fit(synthetic(8), epochs=0), ValueError, "epochs"),
        (lambda m: m.fit(synthetic(8), batch_size=1), ValueError, "batch_size"),
        (lambda m: m.fit(synthetic(8), val_fraction=1.0), ValueError, "val_fraction"),
        (lambda m: m.fit(synthetic(8), lr=0.0), ValueError, "lr"),
        (lambda m: m.fit(synthetic(8), lr_decay=0.0), ValueError, "lr_decay"),
        (lambda m: m.fit(synthetic(8), lr_decay=1.5), ValueError, "lr_decay"),
        (lambda m: m.fit(synthetic(8), ema_decay=1.0), ValueError, "ema_decay"),
        (lambda m: m.fit(synthetic(8), ema_decay=-0.1), ValueError, "ema_decay"),
        (lambda m: m.fit(synthetic(8), resume=True), ValueError, "checkpoint_dir"),
        (lambda m: m.fit(synthetic(8), resume="no/such/file.pt"), ValueError, r"file\.pt"),
        (lambda m: m.fit(np.zeros((4, 16, 16))), TypeError, "dataset"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(untrained, call, error, match):
    with pytest.raises(error, match=match):
        call(untrained)


def test_from_dataset_rejects_unusable_images():
    ds = synthetic(8)
    ds["image"].values[:] = 1.0
    with pytest.raises(ValueError, match="constant"):
        AuxVAE.from_dataset(ds)


_TRAIN_SCRIPT = """
import json, sys
import torch
torch.set_num_threads(1)
from pyro_dlatent.data import load
from pyro_dlatent.models.auxvae import AuxVAE
data, directory, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
ds = load(data)
model = AuxVAE.from_dataset(ds, residual_dim=2, width=8, hidden=64, seed=0)
model.fit(ds, epochs=epochs, batch_size=32, seed=1, progress=False,
          checkpoint_dir=directory, resume=True)
"""


@pytest.mark.slow
def test_sigkilled_training_resumes_to_the_uninterrupted_result(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from pyro_dlatent.data import save

    data = save(synthetic(2048, seed=3), tmp_path / "data.nc")
    script = tmp_path / "train.py"
    script.write_text(_TRAIN_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    epochs = 6

    def run(directory, *, kill_after_epochs=None):
        command = [sys.executable, str(script), str(data), str(directory), str(epochs)]
        process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
        if kill_after_epochs is None:
            _, stderr = process.communicate(timeout=300)
            assert process.returncode == 0, stderr
            return
        checkpoint = directory / "last.pt"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            if (
                checkpoint.exists()
                and len(load_checkpoint(checkpoint).history) >= kill_after_epochs
            ):
                break
            time.sleep(0.05)
        time.sleep(0.2)  # into the next epoch (64 steps of a few ms each)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
        assert process.returncode == -signal.SIGKILL

    run(tmp_path / "reference")
    run(tmp_path / "killed", kill_after_epochs=2)
    survived = load_checkpoint(tmp_path / "killed" / "last.pt")  # intact despite the kill
    assert 2 <= len(survived.history) < epochs
    run(tmp_path / "killed")
    reference = load_checkpoint(tmp_path / "reference" / "last.pt")
    resumed = load_checkpoint(tmp_path / "killed" / "last.pt")
    assert _without_time(resumed.history) == _without_time(reference.history)
    assert resumed.history[-1]["elbo"] == reference.history[-1]["elbo"]
    assert_close(resumed.state["model"], reference.state["model"], atol=0, rtol=0)
