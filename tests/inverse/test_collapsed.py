"""The collapsed deep prior: with the true bump as its generator it must be the exact posterior."""

from __future__ import annotations

import numpy as np
import pyro
import pytest
import torch

from pyro_dlatent.inverse.collapsed import CollapsedModel, CollapsedPosterior, infer_collapsed
from pyro_dlatent.inverse.exact import (
    NAMES,
    BumpMean,
    BumpPrior,
    ExactBumpPosterior,
    exact_collapsed,
    sample_problem,
)
from pyro_dlatent.inverse.infer import InferenceWarning
from pyro_dlatent.residual import ResidualField, fit_residuals, residual_field

__all__: list[str] = []

SIZE = 16


@pytest.fixture(scope="module")
def oracle() -> tuple[BumpMean, ResidualField]:
    """The simulator's own bump and Matérn field as a collapsed prior: the exact posterior."""
    generator = BumpMean(SIZE)
    return generator, generator.residual()


@pytest.mark.parametrize("index", [0, 1, 2, 5])
def test_with_the_true_bump_it_is_the_exact_posterior(oracle, index: int) -> None:
    generator, residual = oracle
    _, problem, values, _ = sample_problem(index, size=SIZE)
    exact = ExactBumpPosterior(problem, values)
    post = CollapsedPosterior(CollapsedModel(problem, generator, residual, values), seed=index)
    assert post.khat < 0.7 and post.ess > 400
    sd = exact.sd()
    # Importance-sampling error of a mean: sd / sqrt(ESS); 5 of them, plus the grid's own error.
    tolerance = 5 * sd / np.sqrt(post.ess) + 0.02 * sd
    np.testing.assert_array_less(np.abs(post.mean() - exact.mean()), tolerance)
    np.testing.assert_allclose(post.sd(), sd, rtol=0.15)
    np.testing.assert_allclose(post.interval(0.9), exact.interval(0.9), atol=float(sd.max()))


def test_field_draws_match_the_exact_field_moments(oracle) -> None:
    generator, residual = oracle
    _, problem, values, _ = sample_problem(1, size=SIZE)
    exact_mean, exact_sd = ExactBumpPosterior(problem, values).field_moments(4000, rng=0)
    post = CollapsedPosterior(CollapsedModel(problem, generator, residual, values), seed=1)
    _, fields = post.field_draws(4000, rng=1)
    scale = exact_sd.mean()
    # Monte Carlo error of a pixel mean over 4000 draws is sd / 63; allow 5 of them.
    assert np.abs(fields.mean(0) - exact_mean).max() < 5 * exact_sd.max() / np.sqrt(4000) + 0.01
    np.testing.assert_allclose(fields.std(0), exact_sd, rtol=0.1, atol=0.05 * scale)


def test_residual_field_recovers_a_known_covariance() -> None:
    rng = np.random.default_rng(0)
    size, n = 6, 20000
    root = rng.normal(size=(size * size, 3)) * 0.5
    diag = 0.1 + 0.05 * rng.random(size * size)
    fields = rng.normal(size=(n, 3)) @ root.T + rng.normal(size=(n, size * size)) * np.sqrt(diag)
    fields += 2.0
    field = ResidualField(size, 1, rank=3).fit(fields.reshape(n, size, size), rng.random((n, 1)))
    truth = root @ root.T + np.diag(diag)
    # The sample covariance's entries have sd about sqrt(2 / n) * variance: 0.01 here.
    np.testing.assert_allclose(field.covariance(), truth, atol=0.05)
    np.testing.assert_allclose(field.mean.numpy(), 2.0, atol=0.02)


def test_the_one_pass_residual_fit_is_the_sample_covariance_truncated_exactly() -> None:
    # the fit accumulates moments a block at a time; its answer is the eigendecomposition of
    # the sample covariance, far from the origin too (1e4: the shift that avoids cancellation)
    rng = np.random.default_rng(3)
    size, n, rank = 5, 2500, 4
    fields = rng.normal(size=(n, 6)) @ rng.normal(size=(6, size * size)) + 1e4
    fields += 0.3 * rng.normal(size=fields.shape)
    aux = rng.random((n, 1))
    cov = np.cov(fields, rowvar=False)
    evals, evecs = np.linalg.eigh(cov)
    top = evecs[:, -rank:] * np.sqrt(evals[-rank:])
    truth_diag = np.diag(cov) - (top**2).sum(1)
    mean = lambda s: torch.zeros(len(s), size, size)  # noqa: E731
    images = torch.as_tensor(fields.reshape(n, size, size))
    for field in (
        ResidualField(size, 1, rank=rank).fit(fields.reshape(n, size, size), aux),
        fit_residuals(ResidualField(size, 1, rank=rank), mean, images, aux, batch_size=333),
    ):
        low_rank = field.factor.double() @ field.factor.double().T
        np.testing.assert_allclose(low_rank.numpy(), top @ top.T, rtol=1e-4, atol=1e-4 * cov.max())
        np.testing.assert_allclose(field.diag.numpy(), truth_diag, rtol=1e-4)
        np.testing.assert_allclose(field.mean.numpy().ravel(), fields.mean(0), rtol=1e-6)
        assert int(field.num_fields) == n


def test_residual_field_of_a_generator_skips_missing_auxiliaries(oracle) -> None:
    generator, _ = oracle
    rng = np.random.default_rng(1)
    u = BumpPrior().sample(64, rng)
    with torch.no_grad():
        clean = generator(torch.as_tensor(generator.scaler.transform(u)), torch.zeros(64, 1))
    images = clean.numpy() + 0.1 * rng.normal(size=clean.shape)
    u[:4, 2] = np.nan
    fitted = residual_field(generator, images, {n: u[:, j] for j, n in enumerate(NAMES)})
    assert int(fitted.num_fields) == 60
    assert abs(float(fitted.diag.mean() + fitted.factor.square().sum(1).mean()) - 0.01) < 0.002


def test_bad_inputs_name_the_argument(oracle) -> None:
    generator, residual = oracle
    _, problem, values, _ = sample_problem(0, size=SIZE)
    with pytest.raises(ValueError, match="not a fitted"):
        CollapsedModel(problem, generator, ResidualField(SIZE, 4), values)
    with pytest.raises(ValueError, match="observations"):
        CollapsedModel(problem, generator, residual, values[:-1])
    with pytest.raises(ValueError, match="bounds"):
        CollapsedModel(problem, generator, residual, values, bounds=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="residuals"):
        ResidualField(SIZE, 4).fit(np.zeros((30, SIZE, SIZE + 1)), np.zeros((30, 4)))
    with pytest.raises(ValueError, match="at least"):
        ResidualField(SIZE, 4).fit(np.zeros((3, SIZE, SIZE)), np.zeros((3, 4)))


def test_the_pyro_model_scores_what_the_posterior_uses(oracle) -> None:
    generator, residual = oracle
    _, problem, values, _ = sample_problem(2, size=SIZE)
    model = CollapsedModel(problem, generator, residual, values)
    s = torch.as_tensor(generator.scaler.transform(BumpPrior().sample(3, np.random.default_rng(0))))
    for row in s:
        trace = pyro.poutine.trace(pyro.poutine.condition(model, data={"s": row})).get_trace()
        expected = model.log_likelihood(row[None])[0]
        torch.testing.assert_close(trace.nodes["obs"]["fn"].log_prob(model.observations), expected)
        u = trace.nodes["u"]["value"].numpy()
        np.testing.assert_allclose(u, generator.scaler.inverse_transform(row[None].numpy())[0])


def test_infer_collapsed_exports_arviz_data_and_health(oracle) -> None:
    import arviz as az

    generator, residual = oracle
    _, problem, values, _ = sample_problem(3, size=SIZE)
    result = infer_collapsed(problem, generator, values, residual=residual, num_samples=200)
    posterior = result.idata.posterior
    assert posterior["u"].shape == (1, 200, 4)
    assert list(posterior["u"].coords["aux"].values) == list(NAMES)
    fields = result.idata.field_summary
    assert (fields["field_q05"] <= fields["field_mean"]).all()
    assert (fields["field_mean"] <= fields["field_q95"]).all()
    assert result.health["pareto_k"] < 0.7 and "warnings" not in result.health
    # the posterior predictive explains the data to within the noise (RMS about 1 sd or less)
    assert result.health["misfit_rms"] < 2.0
    assert az.loo(result.idata).p_loo < 25


def test_infer_collapsed_warns_on_data_it_cannot_explain(oracle) -> None:
    generator, residual = oracle
    _, problem, values, _ = sample_problem(3, size=SIZE)
    with pytest.warns(InferenceWarning, match="miss the observations"):
        result = infer_collapsed(
            problem, generator, values * 1e3, residual=residual, num_samples=50
        )
    assert result.health["misfit_rms"] > 5


def test_infer_collapsed_needs_a_residual_field(oracle) -> None:
    generator, _ = oracle
    _, problem, values, _ = sample_problem(3, size=SIZE)
    with pytest.raises(ValueError, match="no residual field"):
        infer_collapsed(problem, generator, values)


def test_an_auxvae_keeps_its_residual_field_through_save_and_load(tmp_path) -> None:
    from pyro_dlatent import data
    from pyro_dlatent.models import AuxVAE

    ds = data.simulate("sources", 96, size=SIZE, seed=0)
    vae = AuxVAE.from_dataset(ds, residual_dim=2, width=8, hidden=32, seed=0)
    vae.fit(ds, epochs=1, seed=0, progress=False)
    assert bool(vae.residual_field.fitted)
    assert int(vae.residual_field.num_fields) == 96 - round(96 * 0.1)  # the training part
    path = vae.save(tmp_path / "vae.pt")
    loaded = AuxVAE.load(path)
    torch.testing.assert_close(loaded.residual_field.factor, vae.residual_field.factor)
    generator = loaded.generator()
    assert generator.residual_field is not None
    for name, value in loaded.mean_decoder.state_dict().items():
        torch.testing.assert_close(value, vae.mean_decoder.state_dict()[name])
    # the field it fitted is what the conditional mean leaves in those images
    train, _ = data.split(ds, 0.1, seed=0)
    images = torch.as_tensor(train["image"].values, dtype=torch.float64)
    s = torch.as_tensor(vae.scaler.transform(train[list(NAMES)]), dtype=torch.float32)
    with torch.no_grad():
        mean = generator.conditional_mean(s).double()
    residual = (images - mean).reshape(len(s), -1)
    np.testing.assert_allclose(
        loaded.residual_field.mean.numpy().ravel(), residual.mean(0).numpy(), atol=1e-4
    )


def test_nuts_potential_is_pyros_own_potential_of_the_model(oracle) -> None:
    # NUTS samples CollapsedModel.potential; it must be what Pyro builds from the model's trace.
    from pyro.infer.mcmc.util import initialize_model
    from pyro.ops.integrator import potential_grad

    generator, residual = oracle
    _, problem, values, _ = sample_problem(3, size=SIZE)
    model = CollapsedModel(problem, generator, residual, values)
    pyro_potential = initialize_model(model, model_args=())[1]
    rng = np.random.default_rng(0)
    gaps = []
    for t in rng.normal(0.0, 2.0, size=(5, 4)):
        t = torch.as_tensor(t)
        their_grad, theirs = potential_grad(pyro_potential, {"s": t})
        our_grad, ours = potential_grad(model.potential, {"t": t})
        gaps.append(float(ours - theirs))
        torch.testing.assert_close(our_grad["t"], their_grad["s"], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(gaps, gaps[0], atol=1e-8)  # equal up to a constant
    np.testing.assert_allclose(model.from_logit(model.to_logit(np.zeros((1, 4)))), 0.0, atol=1e-9)


@pytest.mark.slow
def test_nuts_on_the_collapsed_model_agrees_with_the_exact_posterior(oracle) -> None:
    generator, residual = oracle
    _, problem, values, _ = sample_problem(1, size=SIZE)
    result = infer_collapsed(
        problem,
        generator,
        values,
        residual=residual,
        sampler="nuts",
        num_samples=300,
        num_warmup=200,
        num_chains=2,
        seed=0,
    )
    health = result.health
    assert health["divergences"] == 0 and health["max_rhat"] < 1.05
    u = np.asarray(result.idata.posterior["u"]).reshape(-1, 4)
    exact = ExactBumpPosterior(problem, values)
    # Monte Carlo error of the chains' mean: sd / sqrt(ESS), ESS at least min_ess_bulk.
    tolerance = 5 * exact.sd() / np.sqrt(health["min_ess_bulk"])
    np.testing.assert_array_less(np.abs(u.mean(0) - exact.mean()), tolerance)
    assert result.idata.posterior["u"].shape == (2, 300, 4)
    assert result.idata.posterior.attrs["sampler"] == "nuts"


def test_nuts_chains_on_two_processes_draw_what_one_process_draws(oracle) -> None:
    generator, residual = oracle
    _, problem, values, _ = sample_problem(1, size=SIZE)
    settings = {"sampler": "nuts", "num_samples": 20, "num_warmup": 20, "num_chains": 2}
    draws = [
        infer_collapsed(
            problem, generator, values, residual=residual, num_processes=n, warn=False, **settings
        )
        .idata.posterior["u"]
        .values
        for n in (1, 2)
    ]
    assert draws[0].shape == (2, 20, 4)
    np.testing.assert_array_equal(draws[0], draws[1])


def test_infer_collapsed_refuses_an_unknown_sampler(oracle) -> None:
    generator, residual = oracle
    _, problem, values, _ = sample_problem(1, size=SIZE)
    with pytest.raises(ValueError, match="sampler"):
        infer_collapsed(problem, generator, values, residual=residual, sampler="hmc")


def test_exact_collapsed_is_the_exact_posterior_as_arviz_data() -> None:
    _, problem, values, _ = sample_problem(2, size=SIZE)
    result = exact_collapsed(problem, values, num_samples=4000)
    u = np.asarray(result.idata.posterior["u"]).reshape(-1, 4)
    exact = ExactBumpPosterior(problem, values)
    tolerance = 5 * exact.sd() / np.sqrt(result.health["ess"]) + 0.02 * exact.sd()
    np.testing.assert_array_less(np.abs(u.mean(0) - exact.mean()), tolerance)
    mean, sd = exact.field_moments(4000, rng=0)
    fields = result.idata.field_summary
    # pixel means of 4000 draws: Monte Carlo error sd / sqrt(ESS) at most 0.2 / 35 here
    np.testing.assert_allclose(fields["field_mean"], mean, atol=5 * sd.max() / np.sqrt(1000))
    np.testing.assert_allclose(fields["field_sd"], sd, rtol=0.1, atol=0.05 * sd.mean())


def test_residual_field_from_covariance_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="covariance"):
        ResidualField.from_covariance(np.ones((5, 5)), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="semi-definite"):
        ResidualField.from_covariance(-np.eye(4), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="standardized_bounds"):
        ResidualField.from_covariance(np.eye(4), np.zeros(2))
