"""Tests for the guided/residual latent split and the AuxScaler."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyro_dlatent import AUX_SITE, REC_SITE, AuxScaler, LatentSplit
from tests.conftest import assert_close


def _model(split, aux, mask=None, n=5):
    with pyro.plate("data", n):
        return split(aux, mask)


def _normal_logpdf(x, loc, scale):
    return -0.5 * ((x - loc) / scale) ** 2 - math.log(scale) - 0.5 * math.log(2 * math.pi)


def test_sites_names_and_shapes():
    split = LatentSplit(aux_dim=3, residual_dim=4, tau=0.2)
    aux = torch.randn(5, 3)
    trace = poutine.trace(_model).get_trace(split, aux)
    assert trace.nodes[AUX_SITE]["value"].shape == (5, 3)
    assert trace.nodes[REC_SITE]["value"].shape == (5, 4)
    assert trace.nodes[AUX_SITE]["fn"].event_shape == (3,)
    assert trace.nodes[REC_SITE]["fn"].batch_shape == (5,)
    assert split.latent_dim == 7


def test_log_prob_matches_analytic_density():
    tau = 0.3
    split = LatentSplit(aux_dim=2, residual_dim=3, tau=tau)
    aux = torch.randn(5, 2, dtype=torch.float32)
    trace = poutine.trace(_model).get_trace(split, aux)
    trace.compute_log_prob()
    z_aux = trace.nodes[AUX_SITE]["value"].double().numpy()
    z_rec = trace.nodes[REC_SITE]["value"].double().numpy()
    expected_aux = _normal_logpdf(z_aux, aux.double().numpy(), tau).sum(-1)
    expected_rec = _normal_logpdf(z_rec, 0.0, 1.0).sum(-1)
    assert_close(trace.nodes[AUX_SITE]["log_prob"], expected_aux, atol=1e-5, rtol=1e-5)
    assert_close(trace.nodes[REC_SITE]["log_prob"], expected_rec, atol=1e-5, rtol=1e-5)


def test_mask_uses_marginal_for_missing_coordinates():
    tau = 0.5
    split = LatentSplit(aux_dim=2, residual_dim=1, tau=tau)
    aux = torch.tensor([[1.0, float("nan")], [float("inf"), -2.0]])
    mask = torch.tensor([[True, False], [False, True]])
    d = split.aux_dist(aux, mask)
    z = torch.tensor([[0.7, 0.4], [1.5, -1.0]])
    marginal = math.sqrt(1 + tau**2)
    expected = [
        _normal_logpdf(0.7, 1.0, tau) + _normal_logpdf(0.4, 0.0, marginal),
        _normal_logpdf(1.5, 0.0, marginal) + _normal_logpdf(-1.0, -2.0, tau),
    ]
    assert_close(d.log_prob(z), expected, atol=1e-5, rtol=1e-5)


def test_marginal_when_aux_is_none_is_prior_predictive_of_the_tether():
    # If u~ ~ N(0, 1) and z_aux | u ~ N(u, tau^2), then z_aux ~ N(0, 1 + tau^2) marginally.
    tau = 0.4
    split = LatentSplit(aux_dim=1, residual_dim=0, tau=tau)
    d = split.aux_dist()
    assert_close(d.base_dist.scale, [math.sqrt(1 + tau**2)], atol=1e-6)
    u = torch.randn(200_000, 1)
    z = split.aux_dist(u).sample()
    # sd estimate has relative MC error ~ 1/sqrt(2n) = 0.0016; 5 sigma
    assert abs(z.std().item() / math.sqrt(1 + tau**2) - 1) < 5 / math.sqrt(2 * 200_000)


def test_condition_and_do_compose():
    split = LatentSplit(aux_dim=2, residual_dim=2, tau=0.1)
    aux = torch.zeros(5, 2)
    fixed = torch.full((5, 2), 3.0)
    conditioned = poutine.condition(_model, data={AUX_SITE: fixed})
    trace = poutine.trace(conditioned).get_trace(split, aux)
    assert trace.nodes[AUX_SITE]["is_observed"]
    assert torch.equal(trace.nodes[AUX_SITE]["value"], fixed)
    # far in the tail of N(0, 0.1^2): the observed log-density says so
    trace.compute_log_prob()
    assert (trace.nodes[AUX_SITE]["log_prob"] < -800).all()

    intervened = poutine.do(_model, data={AUX_SITE: fixed})
    z_aux, _ = intervened(split, aux)
    assert torch.equal(z_aux, fixed)


def test_learnable_tau_is_a_positive_param():
    split = LatentSplit(aux_dim=1, residual_dim=1, tau=0.2, learn_tau=True)
    trace = poutine.trace(_model).get_trace(split, torch.zeros(5, 1))
    params = [n for n, s in trace.nodes.items() if s["type"] == "param"]
    assert any(n.endswith("tau") for n in params)
    assert_close(split.tau, 0.2, atol=1e-6)
    assert split.tau.requires_grad


def test_guide_autoguide_compatibility():
    split = LatentSplit(aux_dim=2, residual_dim=3, tau=0.5)
    aux = torch.randn(5, 2)
    guide = pyro.infer.autoguide.AutoNormal(_model)
    elbo = pyro.infer.Trace_ELBO().differentiable_loss(_model, guide, split, aux)
    assert torch.isfinite(elbo)


def test_per_coordinate_tau_matches_analytic_density():
    tau = [0.1, 0.4, 0.9]
    split = LatentSplit(aux_dim=3, residual_dim=2, tau=tau)
    assert split.tau.shape == (3,)
    aux = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.3, -0.7]])
    mask = torch.tensor([[True, True, True], [True, False, True]])
    z = torch.tensor([[0.6, -0.2, 1.0], [0.1, 0.8, -0.5]])
    expected = [
        sum(_normal_logpdf(z[0, j].item(), aux[0, j].item(), tau[j]) for j in range(3)),
        _normal_logpdf(0.1, 0.0, tau[0])
        + _normal_logpdf(0.8, 0.0, math.sqrt(1 + tau[1] ** 2))
        + _normal_logpdf(-0.5, -0.7, tau[2]),
    ]
    assert_close(split.aux_dist(aux, mask).log_prob(z), expected, atol=1e-5, rtol=1e-5)
    marginal = split.aux_dist().base_dist.scale
    assert_close(marginal, [math.sqrt(1 + t**2) for t in tau], atol=1e-6)


def test_per_coordinate_tau_traces_and_learns():
    split = LatentSplit(aux_dim=2, residual_dim=1, tau=np.array([0.2, 0.5]), learn_tau=True)
    trace = poutine.trace(_model).get_trace(split, torch.zeros(5, 2))
    assert trace.nodes[AUX_SITE]["value"].shape == (5, 2)
    assert_close(split.tau, [0.2, 0.5], atol=1e-6)
    assert split.tau.requires_grad


@pytest.mark.parametrize("tau", [[0.1, 0.2], [0.1, 0.0, 0.3], [0.1, float("nan"), 0.2], "a", True])
def test_bad_per_coordinate_tau_raises(tau):
    with pytest.raises(ValueError, match="tau"):
        LatentSplit(aux_dim=3, residual_dim=1, tau=tau)


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_tau_raises(tau):
    with pytest.raises(ValueError, match="tau"):
        LatentSplit(aux_dim=1, residual_dim=1, tau=tau)


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"aux_dim": 0, "residual_dim": 1}, "aux_dim"),
        ({"aux_dim": 1, "residual_dim": -1}, "residual_dim"),
    ],
)
def test_bad_dims_raise(kwargs, word):
    with pytest.raises(ValueError, match=word):
        LatentSplit(**kwargs)


def test_bad_aux_raises():
    split = LatentSplit(aux_dim=2, residual_dim=1)
    with pytest.raises(ValueError, match="aux"):
        split.aux_dist(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="aux"):
        split.aux_dist(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="aux"):
        split.aux_dist(torch.tensor([[0.0, float("inf")]]), torch.tensor([[True, True]]))
    with pytest.raises(ValueError, match="mask"):
        split.aux_dist(torch.zeros(2, 2), torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        split.aux_dist(torch.zeros(2, 2), torch.ones(2, 2))
    with pytest.raises(TypeError, match="aux"):
        split.aux_dist(torch.zeros(2, 2, dtype=torch.long))


# ---------------------------------------------------------------------------- AuxScaler
def _scaler():
    return AuxScaler(["log_mass", "c"], units=["Msun", ""], transforms={"log_mass": "log10"})


def test_scaler_round_trip_and_standardization():
    rng = np.random.default_rng(1)
    values = {"log_mass": 10 ** rng.uniform(13, 15, 100), "c": rng.normal(4, 1, 100)}
    scaler = _scaler().fit(values)
    standardized = scaler.transform(values)
    assert_close(standardized.mean(0), [0, 0], atol=1e-10)
    assert_close(standardized.std(0), [1, 1], atol=1e-10)
    back = scaler.inverse_transform(standardized)
    assert_close(back[:, 0] / values["log_mass"], np.ones(100), atol=1e-10)
    assert_close(back[:, 1], values["c"], atol=1e-10)
    t = scaler.transform_tensor(torch.as_tensor(np.column_stack(list(values.values()))))
    assert_close(t, standardized, atol=1e-10)
    assert_close(scaler.inverse_transform_tensor(t).numpy()[:, 1], values["c"], atol=1e-10)


def test_scaler_ignores_missing_when_fitting():
    scaler = AuxScaler(["a"]).fit([[1.0], [3.0], [np.nan]])
    assert_close(scaler.mean, [2.0])
    assert np.isnan(scaler.transform([[np.nan]])).all()


def test_scaler_json_round_trip(tmp_path):
    scaler = _scaler().fit({"log_mass": [1e14, 1e15, 3e14], "c": [3.0, 5.0, 4.0]})
    path = tmp_path / "scaler.json"
    scaler.to_json(path)
    loaded = AuxScaler.from_json(path)
    assert loaded.names == scaler.names and loaded.units == scaler.units
    assert loaded.transforms == scaler.transforms
    assert_close(loaded.mean, scaler.mean) and assert_close(loaded.std, scaler.std)
    assert_close(AuxScaler.from_json(scaler.to_json()).mean, scaler.mean)


def test_scaler_bad_inputs():
    scaler = _scaler().fit({"log_mass": [1e14, 1e15], "c": [3.0, 5.0]})
    with pytest.raises(ValueError, match="unknown auxiliary names"):
        scaler.transform({"log_mass": [1e14], "c": [3.0], "z": [0.1]})
    with pytest.raises(ValueError, match="lacks"):
        scaler.transform({"c": [3.0]})
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        scaler.transform(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="infinite"):
        scaler.transform([[np.inf, 1.0]])
    with pytest.raises(ValueError, match="> 0"):
        scaler.transform([[-1.0, 1.0]])
    with pytest.raises(ValueError, match="transforms"):
        AuxScaler(["a"], transforms=["sqrt"])
    with pytest.raises(ValueError, match="unique"):
        AuxScaler(["a", "a"])
    with pytest.raises(ValueError, match="constant"):
        AuxScaler(["a"]).fit([[1.0], [1.0]])
    with pytest.raises(RuntimeError, match="fit"):
        AuxScaler(["a"]).transform([[1.0]])
    with pytest.raises(ValueError, match="malformed"):
        AuxScaler.from_json("{not json")
    with pytest.raises(ValueError, match="lacks field"):
        AuxScaler.from_json('{"names": ["a"]}')


def test_log_prob_in_model_gradients_flow_to_tau():
    split = LatentSplit(aux_dim=1, residual_dim=1, tau=0.5, learn_tau=True)
    z = torch.tensor([[1.0]])
    d = split.aux_dist(torch.zeros(1, 1))
    d.log_prob(z).sum().backward()
    unconstrained = dict(split.named_parameters())["tau_unconstrained"]
    # d/dtau log N(1; 0, tau) = -1/tau + 1/tau^3 = -2 + 8 = 6 at tau = 0.5; chain rule to the
    # unconstrained parameter (tau = exp(theta)) multiplies by tau.
    assert isinstance(d.base_dist, dist.Normal)
    assert_close(unconstrained.grad, 6.0 * 0.5, atol=1e-5)


def test_two_named_splits_in_one_model_keep_their_own_tau_and_sites():
    # Unnamed, both splits would emit "tau", "z_aux" and "z_rec": one value for two parameters.
    first = LatentSplit(aux_dim=2, residual_dim=1, tau=0.1, learn_tau=True, name="first")
    second = LatentSplit(aux_dim=2, residual_dim=1, tau=0.3, learn_tau=True, name="second")

    def model(aux):
        with pyro.plate("data", aux.shape[0]):
            first(aux)
            second(aux)

    pyro.clear_param_store()
    trace = poutine.trace(model).get_trace(torch.zeros(4, 2))
    params = {n: s["value"] for n, s in trace.nodes.items() if s["type"] == "param"}
    assert set(params) == {"first.tau", "second.tau"}
    assert_close(params["first.tau"], 0.1, atol=1e-6)
    assert_close(params["second.tau"], 0.3, atol=1e-6)
    samples = {n for n, s in trace.nodes.items() if s["type"] == "sample"} - {"data"}
    assert samples == {"first.z_aux", "first.z_rec", "second.z_aux", "second.z_rec"}
    # Pyro's own inference sees two parameters: one SVI step moves each by its own gradient.
    guide = pyro.infer.autoguide.AutoDelta(model)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.1}), pyro.infer.Trace_ELBO())
    svi.step(torch.zeros(4, 2))
    store = pyro.get_param_store()
    assert {"first.tau", "second.tau"} <= set(store.keys())
    assert float(store["first.tau"]) != float(store["second.tau"])
    pyro.clear_param_store()
