"""Inference entry point: potentials, MAP/SVI/NUTS against closed-form posteriors, run health."""

from __future__ import annotations

import math
import warnings

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import scipy.stats
import torch
import xarray as xr
from pyro.infer import MCMC, NUTS
from pyro.infer.mcmc.util import initialize_model

from pyro_dlatent.export import load_netcdf, save_netcdf
from pyro_dlatent.inverse._pyro_nuts import _RecordingNUTS
from pyro_dlatent.inverse.fem import SourceProblem, default_sensors, simulate_observations
from pyro_dlatent.inverse.grf import GRFPrior
from pyro_dlatent.inverse.health import InferenceWarning, loss_settled
from pyro_dlatent.inverse.infer import infer
from pyro_dlatent.inverse.potential import LatentPotential
from pyro_dlatent.inverse.prior import DeepPrior, GRFFieldPrior, InverseProblemModel
from tests.conftest import assert_close
from tests.inverse.test_prior import F64, LinearGenerator, LinearProblem

QUIET = {"progress": False}


def _u_prior():
    return {
        "a0": dist.Normal(torch.tensor(2.2, dtype=F64), torch.tensor(0.4, dtype=F64)),
        "a1": dist.Normal(torch.tensor(1.8, dtype=F64), torch.tensor(0.7, dtype=F64)),
    }


def _linear_setup(problem_kind: str = "linear", noise_sd: float = 0.1):
    if problem_kind == "linear":
        problem = LinearProblem(size=4, num_sensors=5, noise_sd=noise_sd)
        operator = problem.matrix.numpy()
        generator = LinearGenerator(size=4)
    else:
        problem = SourceProblem(5, default_sensors(2), noise_sd=noise_sd)
        operator = problem.sensor_operator
        generator = LinearGenerator(size=5)
        # The source problem's data are ~1e-2 of the field: scale G so the data inform z.
        with torch.no_grad():
            generator.weight.mul_(30.0)
    prior = DeepPrior(generator, u_prior=_u_prior(), tau=0.3)
    gen = torch.Generator().manual_seed(5)
    data = torch.randn(problem.num_sensors, generator=gen, dtype=F64)
    return problem, prior, operator, data


def linear_gaussian_posterior(prior: DeepPrior, operator: np.ndarray, noise_sd: float, data):
    """Exact posterior of (u, z_aux, z_rec) for Gaussian u, identity scaler, linear G and data.

    Prior: u ~ N(mu_u, S_u), z_aux = D (u - m) + tau eta with D = diag(1/s) (the scaler's
    standardization), z_rec ~ N(0, I); so theta = (u, z_aux, z_rec) is jointly Gaussian with
    mean (mu_u, D (mu_u - m), 0) and covariance blocks S_u, S_u D, D S_u D + tau^2 I, I. Data:
    d = A (W z + b) + eps = J theta + c with J = [0, A W], c = A b. The posterior precision is
    Sigma0^-1 + J^T J / sigma^2 and the mean Sigma (Sigma0^-1 mu0 + J^T (d - c) / sigma^2).
    """
    generator = prior.generator
    k, r = generator.aux_dim, generator.residual_dim
    mu_u = np.array([d.loc.item() for d in prior.u_prior.components])
    s_u = np.array([d.scale.item() for d in prior.u_prior.components])
    d_std = np.diag(1.0 / prior.scaler.std)
    cov_u = np.diag(s_u**2)
    tau = prior.tau
    mean0 = np.concatenate([mu_u, d_std @ (mu_u - prior.scaler.mean), np.zeros(r)])
    cov0 = np.zeros((2 * k + r, 2 * k + r))
    cov0[:k, :k] = cov_u
    cov0[:k, k : 2 * k] = cov_u @ d_std
    cov0[k : 2 * k, :k] = d_std @ cov_u
    cov0[k : 2 * k, k : 2 * k] = d_std @ cov_u @ d_std + tau**2 * np.eye(k)
    cov0[2 * k :, 2 * k :] = np.eye(r)
    weight = generator.weight.detach().numpy()
    bias = generator.bias.detach().numpy()
    jac = np.concatenate([np.zeros((operator.shape[0], k)), operator @ weight], axis=1)
    offset = operator @ bias
    prec0 = np.linalg.inv(cov0)
    precision = prec0 + jac.T @ jac / noise_sd**2
    cov = np.linalg.inv(precision)
    mean = cov @ (prec0 @ mean0 + jac.T @ (np.asarray(data) - offset) / noise_sd**2)
    return mean, 0.5 * (cov + cov.T)


def _stack(samples, names=("u", "z_aux", "z_rec")):
    return np.concatenate([samples[n].detach().numpy() for n in names], axis=-1)


def assert_gaussian_draws(draws: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> None:
    """Draws ``(chain, draw, d)`` agree with ``N(mean, cov)`` within Monte Carlo error.

    The draws are whitened with the exact posterior, ``y = L^{-1} (x - mean)``, so ``y`` should
    be standard normal: every mean ``E[y_i] = 0`` and every second moment
    ``E[y_i y_j] = delta_ij``. Each estimate is compared with its own Monte Carlo standard error
    ``sd(q) / sqrt(ESS(q))`` (ArviZ bulk ESS of the quantity ``q``, so autocorrelation is
    accounted for). The bound is 4 standard errors, raised to a Bonferroni level when there are
    many comparisons: ``z = max(4, Phi^-1(1 - 0.005 / K))`` for ``K`` comparisons, a
    family-wise false-alarm rate below 1%.
    """
    lower = np.linalg.cholesky(cov)
    white = np.linalg.solve(lower, (draws - mean).reshape(-1, mean.size).T).T
    white = white.reshape(*draws.shape[:2], mean.size)
    dim = mean.size
    num = dim + dim * (dim + 1) // 2
    z = max(4.0, float(scipy.stats.norm.isf(0.005 / num)))

    def check(quantity: np.ndarray, target: float, label: str) -> None:
        ess = float(az.ess(quantity))
        error = abs(quantity.mean() - target)
        bound = z * quantity.std() / np.sqrt(ess)
        assert error < bound, f"{label}: error {error:.4f} > {bound:.4f} (ESS {ess:.0f})"

    for i in range(dim):
        check(white[..., i], 0.0, f"mean[{i}]")
        for j in range(i, dim):
            check(white[..., i] * white[..., j], float(i == j), f"moment[{i},{j}]")


# --------------------------------------------------------------------------- potential
def _mixed_model():
    u_prior = {
        "a0": dist.Uniform(torch.tensor(0.5, dtype=F64), torch.tensor(4.0, dtype=F64)),
        "a1": dist.LogNormal(torch.tensor(0.5, dtype=F64), torch.tensor(0.3, dtype=F64)),
    }
    prior = DeepPrior(LinearGenerator(), u_prior=u_prior, tau=0.3)
    return InverseProblemModel(LinearProblem(), prior, torch.zeros(5))


@pytest.mark.parametrize("fast", [True, False])
def test_latent_potential_equals_pyro_potential(fast):
    model = _mixed_model()
    potential, initial = LatentPotential.from_model(model, num_chains=3, fast=fast)
    assert potential.fast is fast
    assert initial.shape == (3, potential.dim) and potential.dim == 7
    _, reference, _, _ = initialize_model(model)
    for theta in initial:
        unpacked = potential.unpack(theta)
        assert_close(potential.pack(unpacked), theta)
        params = {k: v.clone().requires_grad_(True) for k, v in unpacked.items()}
        expected = reference(params)
        expected_grad = torch.autograd.grad(expected, list(params.values()))
        point = theta.clone().requires_grad_(True)
        value = potential({"theta": point})
        (grad,) = torch.autograd.grad(value, point)
        assert_close(value, expected, atol=1e-9, rtol=1e-9)
        assert_close(grad, torch.cat([g.reshape(-1) for g in expected_grad]), atol=1e-8)
        constrained = potential.constrain(theta)
        assert 0.5 < constrained["u"][0] < 4.0 and constrained["u"][1] > 0


def test_jit_compiled_potential_matches_and_rejects_numpy_models():
    model = _mixed_model()
    potential, initial = LatentPotential.from_model(model, jit_compile=True)
    eager, _ = LatentPotential.from_model(model)
    point = {"theta": initial[0] + 0.3}
    assert_close(potential(point), eager(point), atol=1e-9, rtol=1e-9)

    class SolveProblem(SourceProblem):
        """The source problem through its scipy solve (an autograd.Function: traceable)."""

        def forward(self, field):
            return self.observe(self.solve(field))

    problem = SolveProblem(4, default_sensors(1), noise_sd=0.1)
    solve_model = InverseProblemModel(problem, DeepPrior(LinearGenerator(), tau=0.3), [0.0])
    traced, initial = LatentPotential.from_model(solve_model, jit_compile=True)
    eager, _ = LatentPotential.from_model(solve_model)
    point = {"theta": initial[0] - 0.2}
    assert_close(traced(point), eager(point), atol=1e-9, rtol=1e-9)

    class NumpyScaledProblem(LinearProblem):
        """A value leaves torch (a Python float): a trace would freeze it."""

        def forward(self, field):
            scale = float(np.abs(field.detach().numpy()).max())
            return scale * super().forward(field)

    frozen = InverseProblemModel(
        NumpyScaledProblem(), DeepPrior(LinearGenerator(), tau=0.3), [0.0] * 5
    )
    with pytest.raises(RuntimeError, match="jit_compile"):
        LatentPotential.from_model(frozen, jit_compile=True)


# --------------------------------------------------------------------------- closed form
@pytest.mark.parametrize("problem_kind", ["linear", "source"])
def test_map_hits_the_gaussian_posterior_mode(problem_kind):
    problem, prior, operator, data = _linear_setup(problem_kind)
    mean, _ = linear_gaussian_posterior(prior, operator, problem.noise_sd, data)
    result = infer(problem, prior, data, "map", num_starts=4, steps=100, lr=0.05, **QUIET)
    assert result.samples["u"].shape == (1, 1, 2)
    assert_close(_stack(result.samples)[0, 0], mean, atol=1e-3, rtol=0)
    best = result.model.log_joint({k: v[0, 0] for k, v in result.samples.items()})
    assert_close(-best, result.health["start_losses"].min(), atol=1e-6, rtol=1e-8)
    assert "sample_stats" not in result.idata.groups()


def test_fullrank_svi_reproduces_the_gaussian_posterior():
    problem, prior, operator, data = _linear_setup()
    mean, cov = linear_gaussian_posterior(prior, operator, problem.noise_sd, data)
    result = infer(
        problem,
        prior,
        data,
        "svi",
        guide="fullrank",
        num_starts=2,
        steps=200,
        lr=0.003,
        num_particles=8,
        num_samples=1500,
        **QUIET,
    )
    assert result.health["settled"], result.health
    draws = _stack(result.samples)
    assert draws.shape == (1, 1500, 7)
    assert_gaussian_draws(draws, mean, cov)


@pytest.mark.slow
def test_nuts_reproduces_the_gaussian_posterior():
    problem, prior, operator, data = _linear_setup()
    mean, cov = linear_gaussian_posterior(prior, operator, problem.noise_sd, data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InferenceWarning)
        result = infer(
            problem,
            prior,
            data,
            "nuts",
            num_samples=800,
            num_warmup=400,
            num_chains=2,
            dense_mass=True,
            **QUIET,
        )
    assert result.health["divergences"] == 0 and result.health["max_rhat"] <= 1.01
    assert_gaussian_draws(_stack(result.samples), mean, cov)


def _grf_setup():
    # 9x9 nodes, 3x3 sensors; sigma = 0.01 makes the best-measured direction of the whitened
    # posterior about 8x narrower than the prior, so the data clearly move the posterior.
    problem = SourceProblem(9, default_sensors(3), noise_sd=0.01)
    grf = GRFPrior.from_matern(9, correlation_length=0.4, variance=1.0)
    data = simulate_observations(problem, grf.sample(1, seed=1)[0], seed=2)
    mean, cov = grf.posterior(problem, data)
    return problem, grf, data, mean.reshape(-1).numpy(), cov.numpy()


@pytest.mark.slow
def test_nuts_reproduces_the_grf_posterior():
    problem, grf, data, mean, cov = _grf_setup()
    prior = GRFFieldPrior(grf, whiten=True, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InferenceWarning)
        result = infer(
            problem,
            prior,
            data,
            "nuts",
            num_samples=500,
            num_warmup=400,
            num_chains=2,
            field_draws=True,
            **QUIET,
        )
    assert result.health["divergences"] == 0 and result.health["max_rhat"] < 1.03
    fields = result.idata.posterior["field"].values
    assert_gaussian_draws(fields.reshape(*fields.shape[:2], -1), mean, cov)
    summary = result.idata.field_summary
    assert_close(summary["field_mean"].values.ravel(), mean, atol=0.2, rtol=0)


@pytest.mark.slow
def test_fullrank_svi_reproduces_the_grf_posterior():
    problem, grf, data, mean, cov = _grf_setup()
    prior = GRFFieldPrior(grf, whiten=True, dtype=F64)
    result = infer(
        problem,
        prior,
        data,
        "svi",
        guide="fullrank",
        steps=500,
        lr=0.003,
        num_particles=8,
        num_samples=1500,
        field_draws=True,
        **QUIET,
    )
    fields = result.idata.posterior["field"].values
    assert_gaussian_draws(fields.reshape(*fields.shape[:2], -1), mean, cov)


# --------------------------------------------------------------------------- NUTS bookkeeping
class _BananaPotential:
    """A curved 3-d potential that is NaN past ``theta_0 > 2.5`` (diverging trajectories)."""

    site = "theta"

    def energy(self, theta):
        curved = theta[1] - 0.5 * theta[0].square()
        value = 0.5 * (theta[0].square() + 4.0 * curved.square() + (theta[2] / 3.0).square())
        return torch.where(theta[0] > 2.5, torch.full_like(value, math.nan), value)

    def __call__(self, params):
        return self.energy(params[self.site])


@pytest.mark.parametrize("full_mass", [False, True])
@pytest.mark.parametrize("multinomial", [True, False])
def test_lean_nuts_kernel_draws_exactly_what_pyro_nuts_draws(full_mass, multinomial):
    # The package's single-site trajectory must be Pyro's NUTS, op for op: same seed, same
    # draws, bit for bit (including divergent transitions at the NaN wall).
    draws, diagnostics = [], []
    for kernel_class in (NUTS, _RecordingNUTS):
        pyro.set_rng_seed(11)
        kernel = kernel_class(
            potential_fn=_BananaPotential(),
            full_mass=full_mass,
            use_multinomial_sampling=multinomial,
            max_tree_depth=6,
        )
        mcmc = MCMC(
            kernel,
            num_samples=60,
            warmup_steps=40,
            initial_params={"theta": torch.tensor([0.3, -0.2, 1.0], dtype=F64)},
            transforms={},
            disable_progbar=True,
        )
        mcmc.run()
        draws.append(mcmc.get_samples()["theta"])
        diagnostics.append(mcmc.diagnostics())
    assert torch.equal(draws[0], draws[1])
    for key in ("divergences", "acceptance rate"):
        assert diagnostics[0][key] == diagnostics[1][key]
    stats = diagnostics[1]
    assert len(stats["n_steps"]["chain 0"]) == 60
    assert sum(stats["diverging"]["chain 0"]) == len(diagnostics[0]["divergences"]["chain 0"])


def test_auto_jit_draws_match_the_eager_potential():
    problem, prior, _, data = _linear_setup("source", noise_sd=0.5)
    runs = [
        infer(problem, prior, data, "nuts", num_samples=15, num_warmup=15, num_chains=1,
              jit_compile=jit, seed=2, warn=False, **QUIET).samples
        for jit in (None, False)
    ]  # fmt: skip
    for name in runs[0]:
        assert_close(runs[0][name], runs[1][name], atol=1e-6, rtol=1e-6)


@pytest.fixture(scope="module")
def short_nuts():
    problem, prior, _, data = _linear_setup(noise_sd=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InferenceWarning)
        return infer(problem, prior, data, "nuts", num_samples=40, num_warmup=40, seed=3, **QUIET)


def test_nuts_records_consistent_sample_stats(short_nuts):
    stats = short_nuts.idata.sample_stats
    depth = stats["tree_depth"].values
    steps = stats["n_steps"].values
    assert depth.shape == (2, 40)
    # Pyro's tree depth counts completed doublings (2^depth - 1 leapfrog steps); a last
    # subtree cut short by a U-turn or divergence adds at most 2^depth more.
    assert np.all(2.0**depth - 1 <= steps) and np.all(steps <= 2.0 ** (depth + 1) - 1)
    accept = stats["acceptance_rate"].values
    assert np.all((accept >= 0) & (accept <= 1)) and 0.3 < accept.mean() <= 1
    step_size = stats["step_size"].values
    assert np.allclose(step_size, step_size[:, :1]) and np.all(step_size > 0)
    assert np.isfinite(stats["energy"].values).all() and np.isfinite(stats["lp"].values).all()
    assert stats["diverging"].dtype == bool
    # E-BFMI reads the energy; it must be a sane positive number.
    assert np.all(az.bfmi(short_nuts.idata) > 0)


def test_nuts_result_groups_and_shapes(short_nuts):
    idata = short_nuts.idata
    for group in ("posterior", "posterior_predictive", "log_likelihood", "sample_stats"):
        assert group in idata.groups()
    assert idata.posterior["u"].dims == ("chain", "draw", "aux")
    assert list(idata.posterior["aux"].values) == ["a0", "a1"]
    assert idata.log_likelihood["obs"].shape == (2, 40, 5)
    assert idata.field_summary["field_mean"].dims == ("y", "x")
    assert short_nuts.samples["z_rec"].shape == (2, 40, 3)
    constant = idata.constant_data
    assert set(constant.data_vars) == {"noise_sd", "sensor_x", "sensor_y", "node_x", "node_y"}
    assert constant["node_x"].dims == ("y", "x")
    assert np.allclose(constant["node_x"].values[0], idata.field_summary["x"].values)


def test_nuts_result_survives_a_netcdf_round_trip(short_nuts, tmp_path):
    idata = short_nuts.idata
    loaded = load_netcdf(save_netcdf(idata, tmp_path / "posterior.nc"))
    assert loaded.groups() == idata.groups()
    for group in idata.groups():
        xr.testing.assert_identical(loaded[group], idata[group])
    summary = az.summary(loaded, var_names=["u"])
    assert list(summary.index) == ["u[a0]", "u[a1]"]


def test_same_seed_same_draws_and_caller_rng_untouched():
    problem, prior, _, data = _linear_setup(noise_sd=0.5)
    torch.manual_seed(123)
    runs = []
    for _ in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InferenceWarning)
            runs.append(
                infer(problem, prior, data, "nuts", num_samples=10, num_warmup=10, seed=7, **QUIET)
            )
        runs.append(
            infer(
                problem,
                prior,
                data,
                "svi",
                svi_init="median",
                steps=30,
                num_samples=10,
                seed=7,
                **QUIET,
            )
        )
    assert_close(runs[0].samples, runs[2].samples, atol=0, rtol=0)
    assert_close(runs[1].samples, runs[3].samples, atol=0, rtol=0)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert_close(after, torch.rand(3), atol=0, rtol=0)


# --------------------------------------------------------------------------- health
def test_short_nuts_run_warns_about_rhat():
    problem, prior, _, data = _linear_setup(noise_sd=0.5)
    with pytest.warns(InferenceWarning, match="R-hat"):
        result = infer(problem, prior, data, "nuts", num_samples=5, num_warmup=3, **QUIET)
    assert result.health["max_rhat"] > 1.01 and result.health["warnings"]


def test_unsettled_svi_warns():
    problem, prior, _, data = _linear_setup()
    with pytest.warns(InferenceWarning, match="not settled"):
        # From the prior median the loss falls from ~4500 to ~50 in 100 steps: still falling.
        result = infer(
            problem,
            prior,
            data,
            "svi",
            svi_init="median",
            steps=100,
            num_particles=16,
            lr=0.02,
            lr_decay=1.0,
            num_samples=10,
            **QUIET,
        )
    assert not result.health["settled"]


def test_loss_settled_on_known_sequences():
    rng = np.random.default_rng(0)
    noise = rng.normal(0.0, 1.0, 1000)
    assert loss_settled(10.0 + noise)["settled"]
    assert not loss_settled(10.0 + noise - np.linspace(0.0, 20.0, 1000))["settled"]
    assert loss_settled(np.full(100, 3.0))["settled"]
    assert not loss_settled(np.full(100, 3.0) - np.linspace(0, 1, 100))["settled"]
    assert not loss_settled(np.ones(10))["settled"]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"method": "hmc"}, "method"),
        ({"guide": "flow"}, "guide"),
        ({"num_samples": 0}, "num_samples"),
        ({"method": "nuts", "num_chains": 0}, "num_chains"),
        ({"method": "nuts", "num_warmup": -1}, "num_warmup"),
        ({"num_starts": 0}, "num_starts"),
        ({"steps": 0}, "steps"),
        ({"lr": 0.0}, "lr"),
        ({"lr_decay": 1.5}, "lr_decay"),
        ({"init_scale": -1.0}, "init_scale"),
        ({"num_particles": 0}, "num_particles"),
        ({"method": "nuts", "target_accept_prob": 1.0}, "target_accept_prob"),
        ({"seed": -1}, "seed"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"rank": 0}, "rank"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, name):
    problem, prior, _, data = _linear_setup()
    kwargs = {"method": "svi", **kwargs}
    method = kwargs.pop("method")
    with pytest.raises(ValueError, match=name):
        infer(problem, prior, data, method, **kwargs, **QUIET)


def test_method_objects_hold_and_check_their_own_settings():
    from pyro_dlatent.inverse import MAP, NUTS, SVI

    with pytest.raises(ValueError, match="num_chains"):
        NUTS(num_chains=0)
    with pytest.raises(ValueError, match="init"):
        SVI(init="prior")
    with pytest.raises(TypeError):
        MAP(num_chains=2)  # not a MAP setting
    assert NUTS(num_samples=30).num_warmup == 30
    assert SVI().lr == 0.005 and SVI(init="median").lr == 0.02
    problem, prior, _, data = _linear_setup()
    with pytest.raises(TypeError, match="steps"):
        infer(problem, prior, data, MAP(), steps=10, **QUIET)
    with pytest.raises(TypeError, match="bogus"):
        infer(problem, prior, data, "map", bogus=1, **QUIET)
    with pytest.warns(FutureWarning, match="num_chains"):
        infer(problem, prior, data, "map", steps=20, lbfgs_steps=5, num_chains=3, **QUIET)


def test_a_method_object_runs_what_its_name_and_settings_run():
    from pyro_dlatent.inverse import MAP, SVI

    problem, prior, _, data = _linear_setup()
    by_name = infer(problem, prior, data, "svi", steps=60, num_samples=40, seed=3, **QUIET)
    # the string form starts SVI at a MAP of min(steps, 500) Adam steps
    method = SVI(steps=60, num_samples=40, init=MAP(steps=60))
    by_object = infer(problem, prior, data, method, seed=3, **QUIET)
    assert by_name.health["misfit_rms"] == by_object.health["misfit_rms"]
    for name, draws in by_name.samples.items():
        torch.testing.assert_close(draws, by_object.samples[name], rtol=0, atol=0)


def test_missing_or_malformed_observations_are_rejected():
    problem, prior, _, _ = _linear_setup()
    with pytest.raises(ValueError, match="observations"):
        infer(problem, prior, None, "map", **QUIET)
    with pytest.raises(ValueError, match="observations"):
        infer(problem, prior, np.zeros(3), "map", **QUIET)


def test_deep_prior_from_a_trained_model_generator_runs_end_to_end():
    from pyro_dlatent.data import simulate
    from pyro_dlatent.models.auxvae import AuxVAE

    dataset = simulate("sources", 8, size=16, seed=0)
    vae = AuxVAE.from_dataset(dataset, residual_dim=2, width=8, hidden=16, seed=0)
    prior = DeepPrior(vae.generator())
    problem = SourceProblem(16, default_sensors(2), noise_sd=0.01)
    data = simulate_observations(problem, torch.as_tensor(dataset["image"].values[0]), seed=0)
    result = infer(problem, prior, data, "map", num_starts=2, steps=20, lbfgs_steps=5, **QUIET)
    posterior = result.idata.posterior
    assert list(posterior["aux"].values) == ["x0", "y0", "log_amplitude", "width"]
    assert posterior["u"].shape == (1, 1, 4)
    assert np.isfinite(result.idata.field_summary["field_mean"].values).all()


def test_svi_restarts_after_non_finite_losses(monkeypatch):
    # The first two optimizations fail as a non-finite loss would; SVI then restarts from the
    # MAP with a narrow guide, then from the prior median, and the third attempt's draws are kept.
    from pyro_dlatent.inverse import methods as infer_module

    real = infer_module._optimize
    calls = []

    def flaky(svi, steps, desc, progress, fail=2):
        if not desc.startswith("SVI"):  # the MAP runs that start SVI go through as usual
            return real(svi, steps, desc, progress)
        calls.append(svi.guide)
        if len(calls) <= fail:
            raise RuntimeError(f"{desc}: the loss became non-finite at step 0")
        return real(svi, steps, desc, progress)

    monkeypatch.setattr(infer_module, "_optimize", flaky)
    problem, prior, _, data = _linear_setup()
    settings = {"steps": 20, "num_samples": 10, "warn": False, **QUIET}
    with pytest.warns(InferenceWarning) as record:
        result = infer(problem, prior, data, "svi", guide="fullrank", **settings)
    messages = [str(w.message) for w in record if issubclass(w.category, InferenceWarning)]
    assert any("restarting SVI from the MAP" in m for m in messages), messages
    assert any("restarting SVI from the prior median" in m for m in messages), messages
    assert len(calls) == 3 and len({id(guide) for guide in calls}) == 3
    assert np.isfinite(_stack(result.samples)).all()

    calls.clear()
    monkeypatch.setattr(infer_module, "_optimize", lambda *args: flaky(*args, fail=10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InferenceWarning)
        with pytest.raises(RuntimeError, match="non-finite"):
            infer(problem, prior, data, "svi", guide="normal", **settings)
    assert len(calls) == 2  # the diagonal guide has only the prior-median restart


def test_the_pyro_internals_the_nuts_kernel_overrides_are_as_it_expects():
    # Fails, naming what moved, when a Pyro upgrade changes NUTS's private methods or _TreeInfo.
    from pyro_dlatent.inverse._pyro_nuts import check_pyro_internals

    check_pyro_internals()


def test_nuts_chains_on_two_processes_draw_what_one_process_draws():
    from pyro_dlatent.inverse import NUTS

    problem, prior, _, data = _linear_setup()
    draws = [
        infer(problem, prior, data, NUTS(num_samples=30, num_chains=2, num_processes=n), **QUIET)
        for n in (1, 2)
    ]
    for name, values in draws[0].samples.items():
        assert values.shape[:2] == (2, 30)
        torch.testing.assert_close(values, draws[1].samples[name], rtol=0, atol=0)
    stats = [d.idata.sample_stats for d in draws]
    np.testing.assert_array_equal(stats[0]["n_steps"].values, stats[1]["n_steps"].values)
