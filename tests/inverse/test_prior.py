"""Field priors and the inverse-problem model: sites, shapes, densities, handlers, bad input."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch.distributions import biject_to

from pyro_dlatent.inverse.fem import SourceProblem, default_sensors
from pyro_dlatent.inverse.grf import GRFPrior
from pyro_dlatent.inverse.prior import (
    AuxPrior,
    DeepPrior,
    GRFFieldPrior,
    InverseProblemModel,
    calibrate_tau,
    check_observations,
)
from pyro_dlatent.latent import AuxScaler
from tests.conftest import assert_close

F64 = torch.float64


class LinearGenerator(torch.nn.Module):
    """Stand-in generator ``G(z) = W [z_aux, z_rec] + b`` reshaped to ``(size, size)`` images."""

    def __init__(
        self,
        aux_dim: int = 2,
        residual_dim: int = 3,
        size: int = 4,
        seed: int = 0,
        transforms: list[str] | None = None,
        dtype: torch.dtype = F64,
    ) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.aux_dim, self.residual_dim, self.image_size = aux_dim, residual_dim, size
        shape = (size * size, aux_dim + residual_dim)
        self.weight = torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=dtype))
        self.bias = torch.nn.Parameter(0.1 * torch.randn(size * size, generator=gen, dtype=dtype))
        names = [f"a{j}" for j in range(aux_dim)]
        self.scaler = AuxScaler(names, units=["m"] * aux_dim, transforms=transforms)
        rng = np.random.default_rng(seed)
        self.scaler.fit(np.exp(rng.normal(0.7, 0.3, size=(50, aux_dim))))

    def forward(self, z_aux: torch.Tensor, z_rec: torch.Tensor) -> torch.Tensor:
        z = torch.cat([z_aux, z_rec], dim=-1)
        return (z @ self.weight.T + self.bias).reshape(-1, self.image_size, self.image_size)


class LinearProblem:
    """Stand-in forward problem ``d = A vec(field)`` with Gaussian noise."""

    def __init__(self, size: int = 4, num_sensors: int = 5, noise_sd: float = 0.1, seed: int = 1):
        gen = torch.Generator().manual_seed(seed)
        self.size, self.num_sensors, self.noise_sd = size, num_sensors, noise_sd
        self.matrix = torch.randn(num_sensors, size * size, generator=gen, dtype=F64) / size
        self.sensors = np.random.default_rng(seed).uniform(0.1, 0.9, size=(num_sensors, 2))
        ticks = np.linspace(0.0, 1.0, size)
        self.node_xy = np.stack(np.meshgrid(ticks, ticks, indexing="xy"), axis=-1)

    def forward(self, field: torch.Tensor) -> torch.Tensor:
        return field.reshape(field.shape[0], -1) @ self.matrix.T.to(field.dtype)


def _sites(model, *args):
    trace = poutine.trace(model).get_trace(*args)
    return {n: s for n, s in trace.nodes.items() if s["type"] == "sample"}


# --------------------------------------------------------------------------- AuxPrior
def test_aux_prior_fuses_one_family_and_matches_components():
    priors = {
        "a": dist.Normal(torch.tensor(1.0), torch.tensor(2.0)),
        "b": dist.Normal(torch.tensor(-1.0), torch.tensor(0.5)),
    }
    joint = AuxPrior(priors, units={"a": "m"})
    assert joint._joint is not None
    assert joint.names == ["a", "b"] and joint.units == ["m", ""]
    value = torch.tensor([[0.3, -0.2], [1.5, 2.0]])
    expected = priors["a"].log_prob(value[:, 0]) + priors["b"].log_prob(value[:, 1])
    assert_close(joint.log_prob(value), expected)
    assert joint.sample((7,)).shape == (7, 2)
    assert joint.event_shape == (2,) and joint.batch_shape == ()


def test_aux_prior_mixed_supports_map_to_unconstrained_space():
    priors = {
        "x0": dist.Uniform(torch.tensor(0.0), torch.tensor(1.0)),
        "amp": dist.LogNormal(torch.tensor(0.0), torch.tensor(0.5)),
        "w": dist.Normal(torch.tensor(0.0), torch.tensor(1.0)),
    }
    joint = AuxPrior(priors)
    assert joint._joint is None
    transform = biject_to(joint.support)
    value = transform(torch.tensor([-3.0, 4.0, 2.5]))
    assert 0 < value[0] < 1 and value[1] > 0
    assert_close(value[2], 2.5)
    expected = sum(d.log_prob(value[j]) for j, d in enumerate(priors.values()))
    assert_close(joint.log_prob(value), expected, atol=1e-5)


def test_aux_prior_expand_keeps_names_and_density():
    joint = AuxPrior({"a": dist.Gamma(torch.tensor(2.0), torch.tensor(3.0))}, units=["s"])
    expanded = joint.expand((4,))
    assert expanded.batch_shape == (4,) and expanded.names == ["a"] and expanded.units == ["s"]
    value = torch.full((4, 1), 0.7)
    assert_close(expanded.log_prob(value), joint.log_prob(value[0]).expand(4))


def test_aux_prior_from_scaler_standardizes_to_unit_normal():
    scaler = AuxScaler(["mass", "c"], transforms={"mass": "log10"})
    rng = np.random.default_rng(0)
    scaler.fit({"mass": 10 ** rng.normal(14, 0.4, 200), "c": rng.normal(5, 1, 200)})
    prior = AuxPrior.from_scaler(scaler, dtype=F64)
    draws = prior.sample((20000,))
    standardized = scaler.transform_tensor(draws)
    # 20000 iid draws: the standard error of a mean is 1/sqrt(20000) = 0.007, of a variance
    # sqrt(2/20000) = 0.01; 5 standard errors.
    assert_close(standardized.mean(0), torch.zeros(2, dtype=F64), atol=0.035, rtol=0)
    assert_close(standardized.var(0), torch.ones(2, dtype=F64), atol=0.05, rtol=0)


@pytest.mark.parametrize(
    ("priors", "error"),
    [
        ({}, ValueError),
        ({"a": 1.0}, TypeError),
        ({"a": dist.MultivariateNormal(torch.zeros(2), torch.eye(2))}, ValueError),
        ({"a": dist.Poisson(torch.tensor(1.0))}, ValueError),
        (
            {"a": dist.Normal(torch.zeros(2), 1.0), "b": dist.Normal(torch.zeros(3), 1.0)},
            ValueError,
        ),
    ],
)
def test_aux_prior_rejects_bad_components(priors, error):
    with pytest.raises(error):
        AuxPrior(priors)


# --------------------------------------------------------------------------- DeepPrior
def test_deep_prior_sites_and_shapes():
    prior = DeepPrior(LinearGenerator(), tau=0.2)
    sites = _sites(prior)
    assert list(sites) == ["u", "z_aux", "z_rec", "field"]
    assert sites["u"]["value"].shape == (2,)
    assert sites["z_aux"]["value"].shape == (2,)
    assert sites["z_rec"]["value"].shape == (3,)
    assert sites["field"]["value"].shape == (4, 4)
    assert sites["field"]["infer"].get("_deterministic")
    assert prior.aux_names == ["a0", "a1"] and prior.aux_units == ["m", "m"]
    meta = prior.arviz_metadata()
    assert meta["dims"]["u"] == ["aux"] and meta["coords"]["aux"] == ["a0", "a1"]


def test_deep_prior_batches_through_a_plate():
    prior = DeepPrior(LinearGenerator(), tau=0.2)
    with pyro.plate("draws", 6, dim=-1):
        sites = _sites(prior)
    assert sites["u"]["value"].shape == (6, 2)
    assert sites["field"]["value"].shape == (6, 4, 4)
    generator = prior.generator
    expected = generator(sites["z_aux"]["value"], sites["z_rec"]["value"])
    assert_close(sites["field"]["value"], expected)


def test_deep_prior_z_aux_is_centred_on_standardized_u():
    prior = DeepPrior(LinearGenerator(transforms=["log10", "identity"]), tau=0.05)
    u = torch.tensor([2.0, 1.5], dtype=F64)
    sites = _sites(poutine.condition(prior, {"u": u}))
    fn = sites["z_aux"]["fn"]
    assert_close(fn.base_dist.loc, prior.scaler.transform_tensor(u))
    assert_close(fn.base_dist.scale, torch.full((2,), 0.05, dtype=F64))


def test_deep_prior_log_density_equals_trace():
    prior = DeepPrior(LinearGenerator(transforms=["log", "identity"]), tau=0.3)
    trace = poutine.trace(prior).get_trace()
    values = {k: trace.nodes[k]["value"] for k in ("u", "z_aux", "z_rec")}
    log_prob, field = prior.log_density(values)
    assert_close(log_prob, trace.log_prob_sum(), atol=1e-10, rtol=1e-10)
    assert_close(field, trace.nodes["field"]["value"])


def test_deep_prior_takes_tau_from_the_generator_and_freezes_it():
    generator = LinearGenerator()
    generator.tau = 0.4
    prior = DeepPrior(generator)
    assert prior.tau == pytest.approx(0.4)
    assert not any(p.requires_grad for p in generator.parameters())
    assert not generator.training


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tau": 0.0}, "tau > 0"),
        ({"tau": -1.0}, "tau > 0"),
        ({"tau": float("nan")}, "tau > 0"),
        ({}, "tau > 0"),
        ({"tau": 0.1, "u_prior": {"a0": dist.Normal(0.0, 1.0)}}, "u_prior"),
        ({"tau": 0.1, "u_prior": [1, 2]}, "u_prior"),
    ],
)
def test_deep_prior_rejects_bad_arguments(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        DeepPrior(LinearGenerator(), **kwargs)


def test_deep_prior_rejects_incomplete_generators():
    generator = LinearGenerator()
    del generator.image_size
    with pytest.raises(ValueError, match="image_size"):
        DeepPrior(generator, tau=0.1)
    with pytest.raises(TypeError, match="generator"):
        DeepPrior(lambda z_aux, z_rec: z_aux, tau=0.1)


def test_protocols_accept_the_packages_classes_and_name_what_a_stranger_lacks():
    from pyro_dlatent.inverse.fem import SourceProblem, default_sensors
    from pyro_dlatent.inverse.protocols import (
        ForwardProblem,
        Generator,
        LinearProblem,
        ProtocolError,
        require,
    )

    problem = SourceProblem(9, default_sensors(3), 0.1)
    assert isinstance(problem, LinearProblem) and isinstance(problem, ForwardProblem)
    assert require(LinearGenerator(), Generator, "generator") is not None

    class HalfProblem:  # forward and noise, but no num_sensors
        noise_sd = 0.1

        def forward(self, field):
            return field.sum((-2, -1))[..., None]

    with pytest.raises(ProtocolError, match=r"problem is not a ForwardProblem.*'num_sensors'"):
        require(HalfProblem(), ForwardProblem, "problem")
    assert issubclass(ProtocolError, TypeError) and issubclass(ProtocolError, ValueError)


def test_deep_prior_per_coordinate_tau_log_density_is_analytic():
    tau = [0.05, 0.3]
    prior = DeepPrior(LinearGenerator(transforms=["log", "identity"]), tau=tau)
    assert prior.tau == pytest.approx(tuple(tau))
    assert_close(prior.tau_vector, torch.tensor(tau, dtype=F64))
    assert prior.arviz_metadata()["attrs"]["z_aux"]["tau"] == pytest.approx(tau)
    trace = poutine.trace(prior).get_trace()
    values = {k: trace.nodes[k]["value"] for k in ("u", "z_aux", "z_rec")}
    log_prob, _ = prior.log_density(values)
    assert_close(log_prob, trace.log_prob_sum(), atol=1e-10, rtol=1e-10)
    # Analytic: log p(u) + sum_j log N(z_aux_j; u~_j, tau_j^2) + log N(z_rec; 0, I).
    u, z_aux, z_rec = (values[k].numpy() for k in ("u", "z_aux", "z_rec"))
    u_std = prior.scaler.transform(u[None])[0]
    # tau is stored in the default dtype (float32) like a scalar tau, then cast to float64.
    tau_arr = prior.tau_vector.numpy()
    assert_close(tau_arr, tau, atol=1e-8)
    expected = (
        float(prior.u_prior.log_prob(values["u"]))
        + np.sum(-0.5 * ((z_aux - u_std) / tau_arr) ** 2 - np.log(tau_arr))
        - 0.5 * np.sum(z_rec**2)
        - 0.5 * (2 + 3) * math.log(2 * math.pi)
    )
    assert float(log_prob) == pytest.approx(expected, rel=1e-12, abs=1e-10)


def test_deep_prior_scalar_tau_still_reports_a_float():
    prior = DeepPrior(LinearGenerator(), tau=0.2)
    assert isinstance(prior.tau, float)
    assert_close(prior.tau_vector, torch.full((2,), 0.2, dtype=F64))


@pytest.mark.parametrize("tau", [[0.1], [0.1, 0.0], [0.1, float("inf")], [[0.1, 0.2]]])
def test_deep_prior_rejects_bad_per_coordinate_tau(tau):
    with pytest.raises(ValueError, match="tau"):
        DeepPrior(LinearGenerator(), tau=tau)


def test_calibrate_tau_recovers_the_least_squares_latent_of_a_linear_generator():
    # Noisy images of a linear generator at z* = (u~ + e, w): the mode of the calibration objective
    # is the ridge solution z_hat = (W^T W / s^2 + P)^-1 W^T (x - b) / s^2 with
    # P = diag(1 / (1 + tau0^2) (aux), 1 (rec)), so tau must equal RMS(z_hat_aux - u~).
    generator = LinearGenerator(aux_dim=2, residual_dim=3, size=4, seed=3)
    generator.tau = 0.1
    rng = np.random.default_rng(4)
    n, noise_sd = 40, 0.05
    aux = np.exp(rng.normal(0.7, 0.3, size=(n, 2)))
    aux_std = generator.scaler.transform(aux)
    shift = rng.normal(0.0, [0.1, 0.4], size=(n, 2))
    z_rec = rng.normal(size=(n, 3))
    with torch.no_grad():
        images = generator(torch.as_tensor(aux_std + shift), torch.as_tensor(z_rec)).numpy()
    images = images + noise_sd * rng.standard_normal(images.shape)
    result = calibrate_tau(
        generator, images, aux, noise_sd=noise_sd, steps=1500, lr=0.05, batch_size=16
    )
    weight = generator.weight.detach().numpy()
    bias = generator.bias.detach().numpy()
    precision = np.diag([1 / (1 + 0.1**2)] * 2 + [1.0] * 3)
    normal = weight.T @ weight / noise_sd**2 + precision
    z_hat = np.linalg.solve(normal, weight.T @ (images.reshape(n, -1) - bias).T / noise_sd**2).T
    assert_close(result.z_aux, z_hat[:, :2], atol=1e-4)
    expected = np.sqrt(np.mean((z_hat[:, :2] - aux_std) ** 2, axis=0))
    assert_close(result.tau, expected, atol=1e-4)
    assert_close(result.tau**2, result.bias**2 + result.sd**2, atol=1e-10)
    residuals = images.reshape(n, -1) - z_hat @ weight.T - bias
    # The pixel noise (sd 0.05) makes the residuals O(0.05); Adam's latent error (~1e-3 in
    # z_rec) times rows of W (entries ~N(0, 1), 5 columns) stays below 5e-3.
    assert np.abs(residuals).max() > 0.05
    assert_close(result.residuals.reshape(n, -1), residuals, atol=5e-3)
    assert_close(result.pixel_rmse, np.sqrt(np.mean(result.residuals**2, axis=(1, 2))))
    prior = DeepPrior(generator, tau=result.tau)
    assert prior.tau == pytest.approx(tuple(result.tau))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"noise_sd": 0.0}, "noise_sd > 0"),
        ({"noise_sd": 0.1, "steps": 0}, "steps >= 1"),
        ({"noise_sd": 0.1, "lr": -1.0}, "lr > 0"),
        ({"noise_sd": 0.1, "init_z_aux": np.zeros((5, 3))}, "init_z_aux"),
    ],
)
def test_calibrate_tau_rejects_bad_arguments(kwargs, message):
    generator = LinearGenerator()
    images = np.zeros((5, 4, 4))
    aux = np.ones((5, 2))
    with pytest.raises(ValueError, match=message):
        calibrate_tau(generator, images, aux, **kwargs)
    with pytest.raises(ValueError, match="aux of shape"):
        calibrate_tau(generator, images, np.ones((5, 3)), noise_sd=0.1)


# --------------------------------------------------------------------------- GRF prior
@pytest.fixture(scope="module")
def grf():
    return GRFPrior.from_matern(5, correlation_length=0.5, variance=1.0, mean=0.3)


@pytest.mark.parametrize("whiten", [False, True])
def test_grf_field_prior_density_matches_grf(grf, whiten):
    prior = GRFFieldPrior(grf, whiten=whiten, dtype=F64)
    trace = poutine.trace(prior).get_trace()
    field = trace.nodes["field"]["value"]
    assert field.shape == (5, 5)
    latent = prior.latent_sites[0]
    log_prob, field_again = prior.log_density({latent: trace.nodes[latent]["value"]})
    assert_close(field_again, field, atol=1e-12, rtol=0)
    assert_close(log_prob, trace.log_prob_sum(), atol=1e-9, rtol=1e-9)
    if not whiten:
        # The sparse-precision density of GRFPrior and the dense MVN agree.
        assert_close(log_prob, grf.log_prob(field), atol=1e-8, rtol=1e-8)


def test_grf_whitened_and_centred_priors_share_moments(grf):
    # The whitened field is loc + L w, so its mean and covariance are exactly loc and L L^T.
    prior = GRFFieldPrior(grf, whiten=True, dtype=F64)
    white = torch.eye(25, dtype=F64)
    _, columns = prior.log_density({"field_white": white})
    zero = prior.log_density({"field_white": torch.zeros(25, dtype=F64)})[1]
    basis = (columns - zero).reshape(25, 25)
    assert_close(zero.ravel(), torch.full((25,), 0.3, dtype=F64), atol=1e-12, rtol=0)
    assert_close(basis.T @ basis, grf.covariance(), atol=1e-10, rtol=1e-8)


# --------------------------------------------------------------------------- model
def test_inverse_problem_model_sites_and_log_joint():
    problem = LinearProblem()
    prior = DeepPrior(LinearGenerator(), tau=0.2)
    data = torch.randn(5, dtype=F64)
    model = InverseProblemModel(problem, prior, data)
    trace = poutine.trace(model).get_trace()
    obs = trace.nodes["obs"]
    assert obs["is_observed"] and obs["fn"].event_shape == (5,)
    assert_close(obs["value"], data)
    values = {k: trace.nodes[k]["value"] for k in prior.latent_sites}
    assert_close(model.log_joint(values), trace.log_prob_sum(), atol=1e-10, rtol=1e-10)
    field = trace.nodes["field"]["value"]
    assert_close(obs["fn"].base_dist.loc, problem.forward(field[None])[0])


def test_inverse_problem_model_composes_with_handlers():
    problem = LinearProblem()
    prior = DeepPrior(LinearGenerator(), tau=0.2)
    model = InverseProblemModel(problem, prior, torch.zeros(5))
    fixed = torch.tensor([0.5, -0.5], dtype=F64)
    trace = poutine.trace(poutine.do(model, {"z_aux": fixed})).get_trace()
    # do() feeds the intervention downstream while the site keeps its own draw.
    expected = prior.generator(fixed[None], trace.nodes["z_rec"]["value"][None])[0]
    assert_close(trace.nodes["field"]["value"], expected)
    free = poutine.trace(poutine.uncondition(model)).get_trace()
    assert not free.nodes["obs"]["is_observed"]
    prior_predictive = InverseProblemModel(problem, prior, None)
    assert not poutine.trace(prior_predictive).get_trace().nodes["obs"]["is_observed"]


def test_inverse_problem_model_on_the_source_problem():
    problem = SourceProblem(5, default_sensors(2), noise_sd=0.01)
    prior = DeepPrior(LinearGenerator(size=5), tau=0.1)
    data = torch.zeros(4, dtype=F64)
    model = InverseProblemModel(problem, prior, data)
    trace = poutine.trace(model).get_trace()
    field = trace.nodes["field"]["value"]
    expected = torch.tensor(problem.sensor_operator) @ field.reshape(-1)
    assert_close(trace.nodes["obs"]["fn"].base_dist.loc, expected)
    grf_model = InverseProblemModel(problem, GRFFieldPrior(GRFPrior(5, 0.1, 1.0), dtype=F64), data)
    values = {"field": poutine.trace(grf_model).get_trace().nodes["field"]["value"]}
    trace = poutine.trace(poutine.condition(grf_model, values)).get_trace()
    assert_close(grf_model.log_joint(values), trace.log_prob_sum(), atol=1e-8, rtol=1e-10)


def test_non_finite_field_gives_nan_likelihood_not_an_exception():
    problem = SourceProblem(4, default_sensors(1), noise_sd=0.1)
    model = InverseProblemModel(problem, DeepPrior(LinearGenerator(), tau=0.1), [0.0])
    field = torch.full((4, 4), math.inf, dtype=F64)
    assert torch.isnan(model.predict(field)).all()


@pytest.mark.parametrize(
    ("observations", "error"),
    [
        (np.zeros(4), ValueError),
        (np.zeros((5, 1)), ValueError),
        (np.array([0.0, 1.0, np.nan, 0.0, 0.0]), ValueError),
        (np.array([0.0, 1.0, np.inf, 0.0, 0.0]), ValueError),
        (np.array(["a"] * 5), TypeError),
        ([object()] * 5, TypeError),
    ],
)
def test_bad_observations_are_rejected(observations, error):
    with pytest.raises(error, match="observations"):
        check_observations(observations, 5)


def test_mismatched_mesh_and_prior_sizes_are_rejected():
    problem = SourceProblem(5, default_sensors(2), noise_sd=0.01)
    with pytest.raises(ValueError, match="mesh"):
        InverseProblemModel(problem, DeepPrior(LinearGenerator(size=4), tau=0.1), np.zeros(4))


def test_bad_noise_is_rejected():
    problem = LinearProblem()
    problem.noise_sd = -1.0
    with pytest.raises(ValueError, match="noise_sd"):
        InverseProblemModel(problem, DeepPrior(LinearGenerator(), tau=0.1), np.zeros(5))
