"""DL-CFM: trace structure, surrogate likelihood, training, sampling, generator and persistence."""

from __future__ import annotations

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from scipy import stats

from pyro_dlatent.data import from_arrays
from pyro_dlatent.flow import flow_matching_loss
from pyro_dlatent.inverse.prior import DeepPrior
from pyro_dlatent.models.base import ALIGN_SITE, DECOR_SITE, OBS_SITE, GuidedLatentModel
from pyro_dlatent.models.dlcfm import DLCFM, FlowGenerator, _derived_seed
from pyro_dlatent.models.generation import (
    LEGACY_NAMES,
    NEIGHBOURS,
    SPLINE,
    SPLINE_KNOT_QUANTILES,
    SPLINE_MIN_IMAGES,
    TABLES,
    natural_spline_terms,
)
from tests.conftest import assert_close

SIZE = 16
SMALL = {"width": 8, "hidden": 64, "field_channels": 8, "embed_dim": 16}
FIT = {"epochs": 10, "batch_size": 64, "lr": 3e-3, "progress": False}


def synthetic(n: int, *, seed: int = 0):
    """Gaussian blobs: amplitude log10(mass) - 12, width ``width`` pixels, x-offset 3 * offset.

    log10 mass ~ U[13, 15], width ~ U[1.5, 3.5], offset ~ U[-1, 1] (hidden), plus white noise
    of sd 0.05. The integrated flux is ``2 pi width^2 (log10 mass - 12)``.
    """
    rng = np.random.default_rng(seed)
    log_mass = rng.uniform(13.0, 15.0, n)
    width = rng.uniform(1.5, 3.5, n)
    offset = rng.uniform(-1.0, 1.0, n)
    grid = np.arange(SIZE) - (SIZE - 1) / 2
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    radius2 = (xx[None] - 3.0 * offset[:, None, None]) ** 2 + yy[None] ** 2
    images = (log_mass - 12.0)[:, None, None] * np.exp(-radius2 / (2 * width[:, None, None] ** 2))
    images = images + 0.05 * rng.standard_normal(images.shape)
    return from_arrays(
        images,
        {"mass": 10**log_mass, "width": width},
        units={"mass": "Msun", "width": "pixel"},
        transforms={"mass": "log10"},
        extra={"offset": offset},
    )


def small_model(ds, **kwargs):
    return DLCFM.from_dataset(ds, **{"residual_dim": 2, "seed": 0, **SMALL, **kwargs})


@pytest.fixture(scope="module")
def data():
    return synthetic(512)


@pytest.fixture(scope="module")
def trained(data):
    pyro.set_rng_seed(0)
    model = small_model(data)
    model.fit(data, **FIT)
    return model


# ---------------------------------------------------------------------------- model structure
def test_trace_sites_and_factors():
    ds = synthetic(40)
    model = small_model(ds)
    images, aux, _ = model.prepare(ds)
    batch, index = images[:8], torch.arange(8)
    kwargs = {"num_data": 40, "subsample": index}
    guide = poutine.trace(model.guide).get_trace(batch, aux[:8], None, **kwargs)
    assert guide.nodes["z_aux"]["value"].shape == (8, 2)
    assert guide.nodes["z_rec"]["value"].shape == (8, 2)
    replayed = poutine.replay(model.model, trace=guide)
    trace = poutine.trace(replayed).get_trace(batch, aux[:8], None, **kwargs)
    trace.compute_log_prob()
    sites = {n for n, s in trace.nodes.items() if s["type"] == "sample"}
    assert {"data", "z_aux", "z_rec", OBS_SITE, ALIGN_SITE, DECOR_SITE} <= sites
    factor = trace.nodes[OBS_SITE]
    assert factor["log_prob"].shape == (8,)
    assert (factor["log_prob"] < 0).all()
    assert [f.name for f in factor["cond_indep_stack"]] == ["data"]
    assert factor["scale"] == pytest.approx(40 / 8)
    assert trace.nodes["z_aux"]["fn"].event_shape == (2,)
    assert_close(trace.nodes["z_aux"]["fn"].base_dist.loc, aux[:8])


@pytest.mark.parametrize("flow_weight", [1.0, 0.25])
def test_flow_factor_is_the_scaled_flow_matching_loss(flow_weight):
    ds = synthetic(16)
    model = small_model(ds, flow_weight=flow_weight)
    images, aux, _ = model.prepare(ds)
    z_aux, z_rec = torch.randn(16, 2), torch.randn(16, 2)
    conditioned = poutine.condition(model.model, data={"z_aux": z_aux, "z_rec": z_rec})
    torch.manual_seed(3)
    trace = poutine.trace(conditioned).get_trace(images, aux)
    torch.manual_seed(3)
    loss = flow_matching_loss(
        model.field,
        model.standardize_images(images),
        torch.cat([z_aux, z_rec], -1),
        noise=model.noise,
    )
    expected = -flow_weight * SIZE * SIZE * loss
    assert_close(trace.nodes[OBS_SITE]["fn"].log_factor, expected, rtol=1e-5, atol=1e-4)


def test_gradients_reach_every_parameter():
    ds = synthetic(32)
    model = small_model(ds, intensity="asinh")
    images, aux, _ = model.prepare(ds)
    loss = Trace_ELBO().differentiable_loss(model.model, model.guide, images, aux)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_asinh_intensity_round_trip():
    ds = synthetic(32)
    model = small_model(ds, intensity="asinh", intensity_scale=0.1)
    images = torch.as_tensor(ds["image"].values)
    standardized = model.standardize_images(images)
    assert abs(float(standardized.mean())) < 1e-4
    assert float(standardized.std()) == pytest.approx(1.0, rel=1e-3)
    assert_close(model.destandardize_images(standardized), images, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------- training
def test_short_fit_tracks_auxiliaries_and_lowers_the_flow_loss(trained, data):
    history = trained.history
    assert len(history) == FIT["epochs"]
    assert all(np.isfinite(h["elbo"]) and np.isfinite(h["val_flow_matching"]) for h in history)
    assert history[-1]["val_flow_matching"] < 0.6 * history[0]["val_flow_matching"]
    encoding = trained.encode(data)
    u = trained.scaler.transform(np.stack([data["mass"].values, data["width"].values], -1))
    for j in range(2):
        assert np.corrcoef(encoding.z_aux_loc[:, j].numpy(), u[:, j])[0, 1] > 0.9
    predicted = trained.predict_aux(data)
    assert (
        np.corrcoef(np.log10(predicted["mass"].values), np.log10(data["mass"].values))[0, 1] > 0.9
    )


def test_samples_carry_the_requested_physics(trained):
    # integrated flux 2 pi w^2 (log10 M - 12): 47 at log10 M = 13.2 and 110 at 14.8 (w = 2.5)
    low = trained.generate({"mass": 10**13.2, "width": 2.5}, num=64, seed=0)
    high = trained.generate({"mass": 10**14.8, "width": 2.5}, num=64, seed=0)
    assert low.shape == (64, SIZE, SIZE)
    ratio = float(high.sum(dim=(1, 2)).mean() / low.sum(dim=(1, 2)).mean())
    # without conditioning the ratio would be 1 up to MC error (flux sd/mean / sqrt(64) < 5%)
    assert 1.3 < ratio < 3.5


def test_sample_is_seeded_and_accepts_rows_of_aux(trained):
    aux = {"mass": [1e13, 1e14, 1e15], "width": 2.0}
    a = trained.generate(aux, num=2, seed=5)
    assert a.shape == (6, SIZE, SIZE)
    assert torch.equal(a, trained.generate(aux, num=2, seed=5))
    assert not torch.equal(a, trained.generate(aux, num=2, seed=6))
    rk4 = trained.generate(aux, num=2, seed=5, method="rk4", steps=10)
    dopri5 = trained.generate(aux, num=2, seed=5, method="dopri5")
    assert (rk4 - dopri5).abs().max() < 0.05 * dopri5.abs().max()
    with pytest.raises(ValueError, match="method"):
        trained.generate(aux, method="heun")
    with pytest.warns(FutureWarning, match="renamed DLCFM.generate"):  # the old verb, one release
        assert torch.equal(trained.sample(aux, num=2, seed=5), a)


def test_sample_tails_fix_the_guided_block_and_use_the_tail(trained):
    assert int(trained.generation.neighbours) > 0
    aux = {"mass": [1e14, 3e14], "width": 2.0}
    images, z_rec = trained.sample_tails(aux, num=8, quantile=0.99, seed=0)
    assert images.shape == (16, SIZE, SIZE)
    assert (z_rec.pow(2).sum(-1) >= stats.chi2.ppf(0.99, df=2) - 1e-4).all()
    again, _ = trained.sample_tails(aux, num=8, quantile=0.99, seed=0)
    assert torch.equal(images, again)
    # the guided block is one neighbour draw per row, held for the row's images
    z_aux, _ = trained.sample_latent(aux, seed=_derived_seed(0, 3))
    expected = trained.decode(z_aux.repeat_interleave(8, 0), z_rec, seed=_derived_seed(0, 2))
    assert_close(images, expected)
    with pytest.raises(ValueError, match="every auxiliary"):
        trained.sample_tails({"mass": 1e14}, num=2)


# ---------------------------------------------------------------------------- generator
def test_generator_is_a_frozen_deterministic_function_of_z(trained):
    generator = trained.generator(method="midpoint", steps=4, noise_seed=3)
    assert isinstance(generator, FlowGenerator)
    assert (generator.aux_dim, generator.residual_dim, generator.image_size) == (2, 2, SIZE)
    assert generator.scaler.names == ["mass", "width"]
    assert generator.nfe == 8
    assert not any(p.requires_grad for p in generator.parameters())
    z_aux = torch.randn(5, 2, requires_grad=True)
    z_rec = torch.randn(5, 2)
    images = generator(z_aux, z_rec)
    assert images.shape == (5, SIZE, SIZE)
    x0 = generator.x0.expand(5, SIZE, SIZE)
    expected = trained.decode(z_aux.detach(), z_rec, x0=x0, method="midpoint", steps=4)
    assert_close(images, expected, atol=1e-5, rtol=1e-5)
    # batch independence: one row alone gives the same image
    assert_close(generator(z_aux[2:3], z_rec[2:3])[0], images[2], atol=1e-5, rtol=1e-5)
    assert generator(z_aux.detach().expand(3, 5, 2), z_rec.expand(3, 5, 2)).shape == (
        3,
        5,
        SIZE,
        SIZE,
    )
    images.sum().backward()
    assert z_aux.grad is not None and torch.isfinite(z_aux.grad).all()
    assert z_aux.grad.abs().sum() > 0
    # the copy is independent of the model: the model's field still trains
    assert all(p.requires_grad for p in trained.field.parameters())
    with pytest.raises(ValueError, match="fixed-step"):
        trained.generator(method="dopri5")


def test_generator_plugs_into_the_deep_prior(trained):
    prior = DeepPrior(trained.generator(steps=2))
    assert prior.tau == pytest.approx(trained.tau)
    with pyro.plate("starts", 3):
        trace = poutine.trace(prior).get_trace()
    assert trace.nodes["field"]["value"].shape == (3, SIZE, SIZE)
    assert trace.nodes["z_rec"]["value"].shape == (3, 2)


# ---------------------------------------------------------------------------- persistence
def test_save_load_round_trip_gives_identical_samples(trained, data, tmp_path):
    path = trained.save(tmp_path / "dlcfm.pt")
    loaded = GuidedLatentModel.load(path)
    assert type(loaded) is DLCFM
    assert loaded.config == trained.config
    assert loaded.history == trained.history
    aux = {"mass": 3e14, "width": 2.5}
    assert_close(loaded.generate(aux, num=4, seed=1), trained.generate(aux, num=4, seed=1), atol=0)
    assert_close(loaded.encode(data)._asdict(), trained.encode(data)._asdict(), atol=0, rtol=0)


def test_asinh_model_round_trip(tmp_path):
    ds = synthetic(32)
    model = small_model(ds, intensity="asinh", method="rk4", steps=3)
    loaded = DLCFM.load(model.save(tmp_path / "m.pt"))
    assert loaded.config["intensity"] == "asinh"
    assert (loaded.method, loaded.steps) == ("rk4", 3)
    assert_close(loaded.generate(num=2, seed=0), model.generate(num=2, seed=0), atol=0)


def _without_time(history):
    return [{k: v for k, v in h.items() if k != "time_s"} for h in history]


def test_checkpoint_resume_continues_exactly(tmp_path):
    # The flow-matching noise and times come from the RNG that fit seeds per epoch, so a run
    # resumed from its epoch checkpoint must end with exactly the weights of an unbroken run.
    ds = synthetic(64)
    settings = {"batch_size": 32, "progress": False, "seed": 1}
    reference = small_model(ds)
    reference.fit(ds, epochs=2, checkpoint_dir=tmp_path / "a", **settings)
    interrupted = small_model(ds)
    interrupted.fit(ds, epochs=1, checkpoint_dir=tmp_path / "b", **settings)
    assert (tmp_path / "b" / "last.pt").is_file()
    resumed = small_model(ds)
    history = resumed.fit(ds, epochs=2, checkpoint_dir=tmp_path / "b", resume=True, **settings)
    assert _without_time(history) == _without_time(reference.history)
    assert_close(dict(resumed.state_dict()), dict(reference.state_dict()), atol=0, rtol=0)
    # the checkpoint left by the finished fit carries the generation map fit ended with
    saved = GuidedLatentModel.load(tmp_path / "b" / "last.pt")
    assert saved.generation_calibrated
    assert torch.equal(saved.generation.scale_tril, reference.generation.scale_tril)


def test_load_picks_either_weight_set_of_an_averaged_fit(tmp_path):
    # Averaging leaves the training path as it is, and fit calibrates a generation map for the
    # live weights too: loaded with weights="live", an averaged run is the plain run, bit for bit.
    from pyro_dlatent.checkpoint import load_checkpoint, save_checkpoint

    ds = synthetic(64)
    settings = {"epochs": 2, "batch_size": 32, "progress": False, "seed": 1, "val_fraction": 0}
    plain = small_model(ds)
    plain.fit(ds, checkpoint_dir=tmp_path / "plain", **settings)
    averaged = small_model(ds)
    averaged.fit(ds, checkpoint_dir=tmp_path / "avg", ema_decay=0.3, **settings)
    path = tmp_path / "avg" / "last.pt"
    live = GuidedLatentModel.load(path, weights="live")
    assert live.generation_calibrated
    assert_close(dict(live.state_dict()), dict(plain.state_dict()), atol=0, rtol=0)
    for weights in (None, "averaged"):
        again = GuidedLatentModel.load(path, weights=weights)
        assert_close(dict(again.state_dict()), dict(averaged.state_dict()), atol=0, rtol=0)
    assert not torch.equal(averaged.generation.loc, plain.generation.loc)
    ckpt = load_checkpoint(path)
    fields = ("kind", "config", "scaler", "state", "history", "extra")
    # a live map written before neighbour draws: its Gaussian map
    generation = ckpt.state["average"]["generation"]
    assert generation["table_aux"].shape == (64, 2)
    for name in NEIGHBOURS:
        del generation[name]
    ckpt.state["average"]["generation"] = {f"guided_{k}": v for k, v in generation.items()}
    gauss = save_checkpoint(
        tmp_path / "gauss.pt", **{k: getattr(ckpt, k) for k in fields}, format_version=1
    )
    live = GuidedLatentModel.load(gauss, weights="live")
    assert live.generation_calibrated
    assert int(live.generation.neighbours) == 0
    assert live.generation.table_aux.shape == (0, 2)
    assert torch.equal(live.generation.scale_tril, plain.generation.scale_tril)
    # a checkpoint written before fits kept the live map: the map is reset, with a warning
    del ckpt.state["average"]["generation"]
    old = save_checkpoint(
        tmp_path / "old.pt", **{k: getattr(ckpt, k) for k in fields}, format_version=1
    )
    with pytest.warns(UserWarning, match="no generation map for its live weights") as caught:
        uncalibrated = GuidedLatentModel.load(old, weights="live")
    assert caught[0].filename == __file__  # the warning points at the caller's line
    assert not uncalibrated.generation_calibrated
    uncalibrated.calibrate_generation(ds)
    assert_close(dict(uncalibrated.state_dict()), dict(plain.state_dict()), atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"not fitted with ema_decay > 0.*weights='live'"):
        GuidedLatentModel.load(tmp_path / "plain" / "last.pt", weights="live")
    with pytest.raises(ValueError, match="weights must be"):
        GuidedLatentModel.load(path, weights="best")
    # an average whose horizon is most of the run is flagged
    with pytest.warns(UserWarning, match=r"ema_decay=0\.9 leaves 73% of the first step") as caught:
        small_model(ds).fit(ds, ema_decay=0.9, **settings)
    assert caught[0].filename == __file__


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"flow_weight": 0.0}, "flow_weight"),
        ({"intensity": "log"}, "intensity"),
        ({"intensity_scale": -1.0}, "intensity_scale"),
        ({"method": "adams"}, "method"),
        ({"steps": 0}, "steps"),
        ({"tau": 0.0}, "tau"),
        ({"field_channels": 0}, "channels"),
        ({"noise": "pink"}, "noise"),
        ({"field_mean_head": "yes"}, "field_mean_head"),
    ],
)
def test_bad_constructor_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        small_model(synthetic(8), **kwargs)


def test_decode_rejects_bad_shapes(trained):
    with pytest.raises(ValueError, match="z_aux"):
        trained.decode(torch.zeros(2, 3), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="z_rec"):
        trained.decode(torch.zeros(2, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="x0"):
        trained.decode(torch.zeros(2, 2), torch.zeros(2, 2), x0=torch.zeros(2, 8, 8))


# ---------------------------------------------------------------------------- generation map
def test_natural_spline_terms_span_natural_cubic_splines():
    from scipy.interpolate import CubicSpline

    knots = np.array([-1.3, -0.4, 0.1, 0.9, 1.6])
    values = np.array([0.5, -1.0, 2.0, 0.3, 1.1])
    natural = CubicSpline(knots, values, bc_type="natural")
    x = np.linspace(knots[0], knots[-1], 400)
    terms = natural_spline_terms(torch.as_tensor(x[:, None]), torch.as_tensor(knots[None]))
    design = np.column_stack([np.ones_like(x), x, terms.numpy()])
    coef, *_ = np.linalg.lstsq(design, natural(x), rcond=None)
    # scipy's natural spline through these knots lies in the span, to rounding
    assert np.abs(design @ coef - natural(x)).max() < 1e-9
    # and a plain cubic does not (the span is not all cubics): its fit misses by far more
    cubic = x**3
    coef, *_ = np.linalg.lstsq(design, cubic, rcond=None)
    assert np.abs(design @ coef - cubic).max() > 1e-2
    # beyond the outer knots every term is linear: zero second differences
    for side in (np.linspace(-5.0, knots[0], 50), np.linspace(knots[-1], 5.0, 50)):
        t = natural_spline_terms(torch.as_tensor(side[:, None]), torch.as_tensor(knots[None]))
        assert np.abs(np.diff(t.numpy(), n=2, axis=0)).max() < 1e-9
    # columns are laid out auxiliary by auxiliary
    both = torch.as_tensor(np.tile(knots, (2, 1)))
    two = natural_spline_terms(torch.as_tensor(np.c_[x, -x]), both)
    assert two.shape == (400, 6)
    assert torch.equal(two[:, :3], terms)


def test_fit_calibrates_generation_to_the_least_squares_spline_map(trained, data):
    # fit ends with calibrate_generation on its training part; refitting on all the data must
    # give the least-squares fit of the encoder means on [1, u~, natural spline terms of u~]
    # with knots at the quantiles of u~ (computed here with numpy)
    assert trained.generation_calibrated
    fitted = trained.calibrate_generation(data)
    encoding = trained.encode(data)
    u = trained.scaler.transform(np.stack([data["mass"].values, data["width"].values], -1))
    knots = np.quantile(u, SPLINE_KNOT_QUANTILES, axis=0).T
    assert_close(fitted["knots"], knots, atol=1e-5)
    terms = natural_spline_terms(torch.as_tensor(u), torch.as_tensor(knots)).numpy()
    design = np.column_stack([np.ones(len(u)), u, terms])
    z = encoding.z_aux_loc.numpy().astype(np.float64)
    coef, *_ = np.linalg.lstsq(design, z, rcond=None)
    assert_close(fitted["loc"], coef[0], atol=1e-4)
    assert_close(fitted["matrix"], coef[1:3].T, atol=1e-4)
    assert_close(fitted["spline"], coef[3:].T, atol=1e-4)
    resid = z - design @ coef
    variance = encoding.z_aux_scale.numpy().astype(np.float64) ** 2
    expected = resid.T @ resid / (len(u) - design.shape[1]) + np.diag(variance.mean(0))
    assert_close(fitted["covariance"], expected, rtol=1e-3)
    # the model's mean map is that fit, at new points too (float32 rounding)
    new = np.array([[-2.5, 0.3], [0.0, 0.0], [1.2, -1.7], [3.0, 2.5]])
    new_terms = natural_spline_terms(torch.as_tensor(new), torch.as_tensor(knots)).numpy()
    want = np.column_stack([np.ones(4), new, new_terms]) @ coef
    got = trained.guided_mean(torch.as_tensor(new, dtype=torch.float32)).numpy()
    assert_close(got, want, atol=1e-4)
    # spline=False is the linear least-squares map on [1, u~]
    linear = trained.calibrate_generation(data, spline=False)
    coef, *_ = np.linalg.lstsq(design[:, :3], z, rcond=None)
    assert_close(linear["matrix"], coef[1:].T, atol=1e-4)
    assert not linear["spline"].any()
    trained.calibrate_generation(data)


def test_spline_terms_are_left_out_for_few_images_or_tied_knots(trained):
    few = trained.calibrate_generation(synthetic(SPLINE_MIN_IMAGES - 1, seed=5))
    assert not few["spline"].any()
    # a width that takes two values: its quantiles tie, so only mass gets spline terms
    tied = synthetic(300, seed=6)
    tied["width"].values[:] = np.where(np.arange(300) % 2 == 0, 2.0, 3.0)
    fitted = trained.calibrate_generation(tied)
    inner = len(SPLINE_KNOT_QUANTILES) - 2
    assert fitted["spline"][:, :inner].any()
    assert not fitted["spline"][:, inner:].any()
    assert np.isfinite(fitted["covariance"]).all()
    assert np.all(np.diff(fitted["knots"], axis=1) > 0)
    trained.calibrate_generation(synthetic(512))


def test_calibrated_latents_follow_the_fitted_gaussian(trained, data):
    # a linear map without neighbour draws: closed-form marginals
    fitted = trained.calibrate_generation(data, spline=False, neighbours=0)
    assert int(trained.generation.neighbours) == 0
    assert trained.generation.table_aux.shape == (0, 2)
    n = 20000
    z_aux, z_rec = trained.sample_latent({"mass": 1e14, "width": 2.0}, num=n, seed=3)
    u = trained.scaler.transform(np.array([[1e14, 2.0]]))[0]
    mean = fitted["loc"] + fitted["matrix"] @ u
    sd = np.sqrt(np.diag(fitted["covariance"]))
    # sample mean within 4 standard errors, sample sd within 4 of its standard errors
    got = z_aux.numpy().astype(np.float64)
    assert (np.abs(got.mean(0) - mean) < 4 * sd / np.sqrt(n)).all()
    assert (np.abs(got.std(0) - sd) < 4 * sd / np.sqrt(2 * n)).all()
    assert (np.abs(z_rec.numpy().std(0) - 1.0) < 4 / np.sqrt(2 * n)).all()
    # a left-out auxiliary is drawn as u~ ~ N(0, 1) through the same map
    partial, _ = trained.sample_latent({"mass": 1e14}, num=n, seed=4)
    a = fitted["matrix"]
    marginal_var = a[:, 1] ** 2 + np.diag(fitted["covariance"])
    assert (
        np.abs(partial.numpy().std(0) - np.sqrt(marginal_var)) < 0.05 * np.sqrt(marginal_var)
    ).all()
    # guided_mean is the map's mean
    map_mean = trained.guided_mean(torch.as_tensor(u[None], dtype=torch.float32))
    assert_close(map_mean.numpy()[0], mean, atol=1e-5)
    trained.calibrate_generation(data)


def _mixture_moments(means, scales):
    """Mean, variance and fourth central moment of an equal mixture of N(means_j, scales_j^2)."""
    mean = means.mean(0)
    d = means - mean
    var = (d**2 + scales**2).mean(0)
    m4 = (d**4 + 6 * d**2 * scales**2 + 3 * scales**4).mean(0)
    return mean, var, m4


def _assert_draws_match(got, mean, var, m4):
    # sample mean within 4 standard errors, sample variance within 4 of its standard errors
    n = len(got)
    assert (np.abs(got.mean(0) - mean) < 4 * np.sqrt(var / n)).all(), (got.mean(0), mean)
    assert (np.abs(got.var(0) - var) < 4 * np.sqrt((m4 - var**2) / n)).all(), (got.var(0), var)


def test_neighbour_draws_follow_the_aggregate_posterior_near_the_request(trained, data):
    # z_aux = m(u~) + r_j + s_j eps, j uniform among the K calibration images nearest to u~:
    # an equal mixture of N(m(u~) + r_j, s_j^2) over those K, computed here with numpy
    trained.calibrate_generation(data, neighbours=16)
    assert int(trained.generation.neighbours) == 16
    assert trained.generation.table_aux.shape == (len(data["mass"]), 2)
    encoding = trained.encode(data)
    u = trained.scaler.transform(np.stack([data["mass"].values, data["width"].values], -1))

    def mean_map(x):
        return trained.guided_mean(torch.as_tensor(x, dtype=torch.float32)).numpy()

    resid = encoding.z_aux_loc.numpy() - mean_map(u)
    scale = encoding.z_aux_scale.numpy()
    n = 20000
    # inside the range, and beyond it (log10 M = 15.6 against 13-15): the map's tails
    for mass, width in ((1e14, 2.0), (10**15.6, 3.4)):
        z_aux, z_rec = trained.sample_latent({"mass": mass, "width": width}, num=n, seed=3)
        target = trained.scaler.transform(np.array([[mass, width]]))
        near = np.argsort(((u - target) ** 2).sum(1))[:16]
        moments = _mixture_moments(mean_map(target) + resid[near], scale[near])
        _assert_draws_match(z_aux.numpy().astype(np.float64), *moments)
    assert (np.abs(z_rec.numpy().std(0) - 1.0) < 4 / np.sqrt(2 * n)).all()
    # a left-out width: neighbours by mass alone, the width taken from the neighbour
    z_aux, _ = trained.sample_latent({"mass": 1e14}, num=n, seed=4)
    target = trained.scaler.transform(np.array([[1e14, 2.0]]))[0, 0]
    near = np.argsort(np.abs(u[:, 0] - target))[:16]
    filled = np.column_stack([np.full(16, target), u[near, 1]])
    moments = _mixture_moments(mean_map(filled) + resid[near], scale[near])
    _assert_draws_match(z_aux.numpy().astype(np.float64), *moments)
    # nothing requested: every image ties at distance 0, so all of them are candidates and the
    # draw is the whole aggregate posterior (with the top 16 alone it would be 16 of them)
    z_aux, _ = trained.sample_latent(None, num=n, seed=5)
    moments = _mixture_moments(encoding.z_aux_loc.numpy().astype(np.float64), scale)
    _assert_draws_match(z_aux.numpy().astype(np.float64), *moments)
    # neighbours beyond the number of images use them all
    few = synthetic(8, seed=9)
    trained.calibrate_generation(few, neighbours=50)
    assert int(trained.generation.neighbours) == 8
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="neighbours"):
            trained.calibrate_generation(data, neighbours=bad)
    trained.calibrate_generation(data)


def _rewritten_checkpoint(ckpt, path, *, keep_weight=None, keep_option=None):
    """``ckpt`` saved again at ``path`` as a format-1 file: the generation map's buffers under
    their old names (``guided_*``), without the weights and config options an older version of
    the package did not write (those for which ``keep_weight`` / ``keep_option`` is false)."""
    from pyro_dlatent.checkpoint import save_checkpoint

    old_names = {f"generation.{new}": old for old, new in LEGACY_NAMES.items()}
    weights = {old_names.get(k, k): v for k, v in ckpt.state["model"].items()}
    weights = {k: v for k, v in weights.items() if keep_weight is None or keep_weight(k)}
    config = {k: v for k, v in ckpt.config.items() if keep_option is None or keep_option(k)}
    return save_checkpoint(
        path,
        kind=ckpt.kind,
        config=config,
        scaler=ckpt.scaler,
        state={**ckpt.state, "model": weights},
        history=ckpt.history,
        extra=ckpt.extra,
        format_version=1,  # as the package wrote files before the format recorded every buffer
    )


def test_a_format_2_checkpoint_migrates_its_generation_map(trained, tmp_path):
    # format 2 kept the map's buffers on the model as guided_*, and the live map of an averaged
    # fit under the same names: loading renames them, and the model is the one that was saved
    from pyro_dlatent.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(trained.save(tmp_path / "m.pt"))
    old_names = {f"generation.{new}": old for old, new in LEGACY_NAMES.items()}
    weights = {old_names.get(k, k): v for k, v in ckpt.state["model"].items()}
    assert "guided_table_aux" in weights and "generation.table_aux" not in weights
    fields = ("kind", "config", "scaler", "history", "extra")
    path = save_checkpoint(
        tmp_path / "v2.pt",
        state={**ckpt.state, "model": weights},
        **{k: getattr(ckpt, k) for k in fields},
        format_version=2,
    )
    loaded = GuidedLatentModel.load(path)
    assert loaded.generation_calibrated
    assert_close(dict(loaded.state_dict()), dict(trained.state_dict()), atol=0, rtol=0)


def test_generation_map_is_saved_and_old_checkpoints_load_uncalibrated(trained, data, tmp_path):
    from pyro_dlatent.checkpoint import load_checkpoint, save_checkpoint

    # the map on all of data, as the Gaussian map recomputed below (fit made it on its own part)
    trained.calibrate_generation(data)
    path = trained.save(tmp_path / "m.pt")
    loaded = GuidedLatentModel.load(path)
    assert loaded.generation_calibrated
    assert torch.equal(loaded.generation.matrix, trained.generation.matrix)
    assert torch.equal(loaded.generation.spline, trained.generation.spline)
    assert torch.equal(loaded.generation.knots, trained.generation.knots)
    assert int(loaded.generation.neighbours) == int(trained.generation.neighbours) > 0
    for name in TABLES:  # sized by the calibration data, not by the constructor
        assert torch.equal(getattr(loaded.generation, name), getattr(trained.generation, name))
    ckpt = load_checkpoint(path)

    def rewritten(name, keep):
        return _rewritten_checkpoint(ckpt, tmp_path / name, keep_weight=keep)

    old = rewritten("old.pt", lambda k: not k.startswith("guided_"))
    # a checkpoint with the Gaussian map of the version before neighbour draws loads as that map
    gaussian = GuidedLatentModel.load(rewritten("gauss.pt", lambda k: k[7:] not in NEIGHBOURS))
    assert gaussian.generation_calibrated
    assert int(gaussian.generation.neighbours) == 0
    assert gaussian.generation.table_resid.shape == (0, 2)
    assert torch.equal(gaussian.generation.scale_tril, trained.generation.scale_tril)
    z_aux, _ = gaussian.sample_latent({"mass": 1e14, "width": 2.0}, num=3, seed=1)
    trained.calibrate_generation(data, neighbours=0)
    assert torch.equal(z_aux, trained.sample_latent({"mass": 1e14, "width": 2.0}, num=3, seed=1)[0])
    trained.calibrate_generation(data)

    # tables that do not fit together are refused, naming the file
    def with_weights(**changed):
        weights = dict(ckpt.state["model"], **changed)
        return save_checkpoint(
            tmp_path / "bad.pt",
            state={**ckpt.state, "model": weights},
            **{k: getattr(ckpt, k) for k in ("kind", "config", "scaler", "history", "extra")},
        )

    with pytest.raises(ValueError, match=r"bad\.pt.*neighbour tables of mismatched shapes"):
        GuidedLatentModel.load(with_weights(**{"generation.table_scale": torch.zeros(3, 2)}))
    rows = trained.generation.table_aux.shape[0]
    for count in (rows + 1, -1, 0):
        bad = with_weights(**{"generation.neighbours": torch.tensor(count)})
        with pytest.raises(ValueError, match=f"holds {count} neighbours for a table of {rows}"):
            GuidedLatentModel.load(bad)
    # a checkpoint with the linear map of the version before splines loads as that map
    linear = GuidedLatentModel.load(rewritten("linear.pt", lambda k: k[7:] not in SPLINE))
    assert linear.generation_calibrated
    assert not linear.generation.spline.any()
    u = torch.tensor([[0.4, -1.1], [2.0, 0.5]])
    assert_close(
        linear.guided_mean(u).numpy(),
        (trained.generation.loc + u @ trained.generation.matrix.T).numpy(),
        atol=1e-6,
    )
    before = GuidedLatentModel.load(old)
    assert not before.generation_calibrated
    assert torch.equal(before.generation.matrix, torch.eye(2))
    # the prior again: z_aux ~ N(u~, tau^2)
    z_aux, _ = before.sample_latent({"mass": 1e14, "width": 2.0}, num=4000, seed=0)
    u = before.scaler.transform(np.array([[1e14, 2.0]]))[0]
    assert (np.abs(z_aux.numpy().mean(0) - u) < 4 * before.tau / np.sqrt(4000)).all()
    with pytest.raises(ValueError, match="at least 4 images"):
        before.calibrate_generation(synthetic(3))


def test_checkpoint_from_before_the_latent_map_loads_with_film_only_and_white_noise(data, tmp_path):
    from pyro_dlatent.checkpoint import load_checkpoint

    model = small_model(data, field_spatial_channels=0, field_mean_head=False, noise="white")
    path = model.save(tmp_path / "film.pt")
    old_keys = ("field_spatial_channels", "field_mean_head", "noise")
    old = _rewritten_checkpoint(
        load_checkpoint(path), tmp_path / "old.pt", keep_option=lambda k: k not in old_keys
    )
    loaded = GuidedLatentModel.load(old)
    assert loaded.field.latent_map is None and loaded.field.level_mlp is None
    assert loaded.config["field_spatial_channels"] == 0
    assert loaded.noise == "white"
    aux = {"mass": [1e13, 1e15], "width": [2.0, 3.0]}
    assert torch.equal(loaded.generate(aux, seed=1), model.generate(aux, seed=1))
    # zero-mean noise starts every flow from images of spatial mean zero
    new = small_model(data, noise="zero-mean")
    assert new.generator(noise_seed=0).x0.mean().abs() < 1e-6
    assert not torch.equal(
        new.generate(aux, seed=1), small_model(data, noise="white").generate(aux, seed=1)
    )


def test_latent_map_model_trains_saves_and_loads(data, tmp_path):
    model = small_model(data, field_spatial_channels=2)
    assert model.field.latent_map is not None
    model.fit(data, **{**FIT, "epochs": 2})
    loaded = GuidedLatentModel.load(model.save(tmp_path / "map.pt"))
    assert loaded.field.spatial_channels == 2
    aux = {"mass": [1e14], "width": [2.5]}
    assert torch.equal(loaded.generate(aux, seed=1), model.generate(aux, seed=1))


def test_mean_head_model_trains_saves_and_loads(data, tmp_path):
    model = small_model(data)
    assert model.field.level_mlp is not None  # the default
    model.fit(data, **{**FIT, "epochs": 2})
    loaded = GuidedLatentModel.load(model.save(tmp_path / "head.pt"))
    assert loaded.config["field_mean_head"] and loaded.field.mean_head
    aux = {"mass": [1e14], "width": [2.5]}
    assert torch.equal(loaded.generate(aux, seed=1), model.generate(aux, seed=1))


def test_configs_from_before_the_options_get_their_old_values_and_keep_their_own():
    # the defaults now equal the old behaviour, so the load test above cannot tell whether the
    # upgrade runs; this checks it directly
    assert DLCFM._upgrade_config({"tau": 0.1}) == {
        "field_spatial_channels": 0,
        "field_mean_head": False,
        "noise": "white",
        "tau": 0.1,
    }
    written = {"field_spatial_channels": 8, "field_mean_head": True, "noise": "zero-mean"}
    assert DLCFM._upgrade_config(dict(written)) == written


def test_the_generation_maps_old_names_warn_and_forward(trained):
    import pyro_dlatent.models.base as base

    with pytest.warns(FutureWarning, match="generation.loc"):
        assert torch.equal(trained.guided_loc, trained.generation.loc)
    with pytest.warns(FutureWarning, match="models.generation.natural_spline_terms"):
        assert base.natural_spline_terms is natural_spline_terms
