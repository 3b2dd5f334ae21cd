"""Tests of the conditional vector field, the linear path, the loss and the ODE sampler."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pyro_dlatent.flow import (
    MIN_REMAINING_TIME,
    ConditionalVectorField,
    base_noise,
    flow_matching_loss,
    linear_path,
    sample_ode,
    sinusoidal_embedding,
)
from tests.conftest import assert_close


class GaussianField(nn.Module):
    """Exact marginal field of the linear path from N(0, I) to N(m, s^2 I), per sample.

    With :math:`x_t = (1-t) x_0 + t x_1`, :math:`\\sigma_t^2 = (1-t)^2 + t^2 s^2` and
    :math:`E[x_1 - x_0 \\mid x_t] = m + (t s^2 - (1 - t)) (x_t - t m) / \\sigma_t^2`.
    The code ``z = (m, log s)`` has shape ``(batch, 2)``.
    """

    def forward(self, t, x, z):
        t = torch.as_tensor(t, dtype=x.dtype)
        if t.dim() == 1:
            t = t[:, None, None]
        m = z[:, 0, None, None]
        s2 = torch.exp(2 * z[:, 1, None, None])
        var = (1 - t) ** 2 + t**2 * s2
        return m + (t * s2 - (1 - t)) * (x - t * m) / var


class ShiftedField(nn.Module):
    """``base`` plus a constant ``shift``."""

    def __init__(self, base: nn.Module, shift: float) -> None:
        super().__init__()
        self.base, self.shift = base, shift

    def forward(self, t, x, z):
        return self.base(t, x, z) + self.shift


@pytest.mark.parametrize(("size", "levels"), [(16, 2), (32, 2), (64, 3)])
def test_vector_field_shapes_and_levels(size, levels):
    field = ConditionalVectorField(size, latent_dim=3, channels=4, embed_dim=8)
    assert field.num_levels == levels
    x, z = torch.randn(2, size, size), torch.randn(2, 3)
    assert field(0.5, x, z).shape == (2, size, size)


def test_vector_field_time_scalar_equals_per_sample_time():
    field = ConditionalVectorField(16, latent_dim=2, channels=8)
    x, z = torch.randn(3, 16, 16), torch.randn(3, 2)
    out_scalar = field(0.3, x, z)
    assert_close(field(torch.tensor(0.3), x, z), out_scalar)
    assert_close(field(torch.full((3,), 0.3), x, z), out_scalar, atol=1e-6)
    # per-sample times: each row equals the row computed with its own scalar time
    t = torch.tensor([0.1, 0.5, 0.9])
    out = field(t, x, z)
    for i in range(3):
        assert_close(out[i], field(float(t[i]), x[i : i + 1], z[i : i + 1])[0], atol=1e-5)


def test_vector_field_depends_on_time_and_latent():
    field = ConditionalVectorField(16, latent_dim=2, channels=8)
    x, z = torch.randn(2, 16, 16), torch.randn(2, 2)
    base = field(0.3, x, z)
    assert (field(0.7, x, z) - base).abs().max() > 1e-4
    assert (field(0.3, x, z + 1.0) - base).abs().max() > 1e-4


@pytest.mark.parametrize(
    ("size", "spatial_size", "side"), [(16, None, 4), (32, 8, 8), (16, 16, 16)]
)
def test_vector_field_latent_map_shapes_and_config(size, spatial_size, side):
    field = ConditionalVectorField(
        size, latent_dim=3, channels=4, embed_dim=8, spatial_channels=2, spatial_size=spatial_size
    )
    assert field.spatial_size == side
    assert field.conv_in.in_channels == 3
    assert field.latent_map[-1].out_features == 2 * side**2
    x, z = torch.randn(2, size, size), torch.randn(2, 3)
    assert field(0.5, x, z).shape == (2, size, size)
    rebuilt = ConditionalVectorField(**field.config())
    rebuilt.load_state_dict(field.state_dict())
    assert_close(rebuilt(0.5, x, z), field(0.5, x, z))


def test_vector_field_latent_map_is_the_only_spatial_path_of_z():
    """With FiLM switched off (zero weights), z still moves the field through the latent map, and
    through it alone: each pixel's change follows the upsampled map."""
    torch.manual_seed(0)
    field = ConditionalVectorField(16, latent_dim=2, channels=8, spatial_channels=1)
    with torch.no_grad():
        for p in field.latent_mlp.parameters():
            p.zero_()
    x = torch.randn(1, 16, 16).expand(2, 16, 16)
    z = torch.randn(2, 2)
    out = field(0.3, x, z)
    assert (out[0] - out[1]).abs().max() > 1e-4
    with torch.no_grad():
        for p in field.latent_map.parameters():
            p.zero_()
    out = field(0.3, x, z)
    assert_close(out[0], out[1])


@pytest.mark.parametrize("spatial, mean_head", [(0, False), (2, False), (0, True)])
def test_vector_field_gradients_reach_every_parameter(spatial, mean_head):
    field = ConditionalVectorField(
        16, latent_dim=3, channels=8, spatial_channels=spatial, mean_head=mean_head
    )
    loss = flow_matching_loss(field, torch.randn(4, 16, 16), torch.randn(4, 3)).mean()
    loss.backward()
    for name, param in field.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "kwargs",
    [
        {"image_size": 30, "latent_dim": 2, "num_levels": 3},
        {"image_size": 16, "latent_dim": 0},
        {"image_size": 16, "latent_dim": 2, "channels": 0},
        {"image_size": 16, "latent_dim": 2, "embed_dim": 7},
        {"image_size": 16, "latent_dim": 2, "channel_mult": (1,)},
        {"image_size": 16, "latent_dim": 2, "spatial_channels": -1},
        {"image_size": 16, "latent_dim": 2, "spatial_channels": 2, "spatial_size": 3},
        {"image_size": 16, "latent_dim": 2, "spatial_channels": 2, "spatial_size": 0},
        {"image_size": 16, "latent_dim": 2, "mean_head": 1},
    ],
)
def test_vector_field_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="expected"):
        ConditionalVectorField(**kwargs)


def test_vector_field_mean_head_is_the_unets_zero_mean_part_plus_a_level_of_the_state():
    torch.manual_seed(0)
    field = ConditionalVectorField(16, latent_dim=3, channels=8, mean_head=True)
    plain = ConditionalVectorField(16, latent_dim=3, channels=8)
    unet = {k: v for k, v in field.state_dict().items() if not k.startswith("level_mlp.")}
    plain.load_state_dict(unet)  # strict: the head adds level_mlp and nothing else
    assert field.config()["mean_head"] and not plain.config()["mean_head"]
    t = torch.tensor([0.0, 0.4, 0.9, 0.97, 1.0])
    x, z = torch.randn(5, 16, 16) + torch.randn(5, 1, 1), torch.randn(5, 3)
    out, u = field(t, x, z), plain(t, x, z)
    assert_close(out - out.mean((-2, -1), keepdim=True), u - u.mean((-2, -1), keepdim=True))
    level = x.mean((-2, -1))
    features = [sinusoidal_embedding(t, field.embed_dim), z, level[:, None]]
    final = field.level_mlp(torch.cat(features, dim=-1))[:, 0]
    remaining = (1 - t).clamp(min=MIN_REMAINING_TIME)
    assert_close(out.mean((-2, -1)), (final - level) / remaining)
    # the two parts share no weights: the mean reaches only the head (all of it), the rest only
    # the U-Net (in double precision, where removing the U-Net's mean leaves roundoff < 1e-9)
    field = field.double()
    out = field(t.double(), x.double(), z.double())
    names = [name for name, _ in field.named_parameters()]
    in_head = [name.startswith("level_mlp.") for name in names]
    zero_mean = out - out.mean((-2, -1), keepdim=True)
    for part, may_reach in ((out.mean((-2, -1)), in_head), (zero_mean, [not h for h in in_head])):
        grads = torch.autograd.grad(
            part.pow(2).sum(), list(field.parameters()), retain_graph=True, allow_unused=True
        )
        for name, grad, allowed in zip(names, grads, may_reach, strict=True):
            reached = grad is not None and bool(grad.abs().max() > 1e-9)
            assert reached <= allowed, name
            if part.dim() == 1 and allowed:
                assert reached, name


@pytest.mark.slow
def test_mean_head_learns_the_level_that_white_noise_hides():
    # Images whose mean is the code z (pixel noise 0.1, so the mean given z has sd 0.1 / 16);
    # the mean of the white initial noise has sd 1 / 16 = 0.0625. With the head, the generated
    # mean follows z with a spread under 0.015, a quarter of the noise's (0.0117 measured; the
    # sd of 1,000 draws has a relative error of 2%). Without the head 800 steps left 0.060: the
    # U-Net passes most of the noise's mean through.
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    field = ConditionalVectorField(16, 1, channels=8, embed_dim=16, mean_head=True)
    opt = torch.optim.Adam(field.parameters(), lr=3e-3)

    def data(n):
        z = torch.randn(n, 1, generator=gen)
        return z[:, :, None] + 0.1 * torch.randn(n, 16, 16, generator=gen), z

    for _ in range(400):
        x1, z = data(64)
        loss = flow_matching_loss(field, x1, z, generator=gen).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x1, z = data(1000)
    with torch.no_grad():
        x = sample_ode(field, z, base_noise(x1.shape, generator=gen), "rk4", 8).x
    assert float((x.mean((-2, -1)) - z[:, 0]).std()) < 0.015


def test_vector_field_rejects_bad_inputs():
    field = ConditionalVectorField(16, latent_dim=2, channels=4)
    with pytest.raises(ValueError, match="x of shape"):
        field(0.5, torch.zeros(2, 8, 8), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="z of shape"):
        field(0.5, torch.zeros(2, 16, 16), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="t of shape"):
        field(torch.zeros(3), torch.zeros(2, 16, 16), torch.zeros(2, 2))


def test_sinusoidal_embedding_frequencies():
    t = torch.tensor([0.0, 0.5, 1.0])
    emb = sinusoidal_embedding(t, 16, max_frequency=100.0)
    assert emb.shape == (3, 16)
    assert_close(emb[0, :8], torch.ones(8))
    assert_close(emb[:, 0], torch.cos(t))  # slowest: 1 rad per unit time
    assert_close(emb[:, 7], torch.cos(100.0 * t), atol=1e-5)  # fastest: max_frequency
    assert_close(emb[:, 15], torch.sin(100.0 * t), atol=1e-5)
    with pytest.raises(ValueError, match="max_frequency"):
        sinusoidal_embedding(t, 16, max_frequency=1.0)
    with pytest.raises(ValueError, match="dim"):
        sinusoidal_embedding(t, 7)


def test_linear_path_endpoints_and_velocity():
    x0, x1 = torch.randn(3, 4, 4), torch.randn(3, 4, 4)
    x_t, u_t = linear_path(x0, x1, 0.0)
    assert_close(x_t, x0)
    assert_close(u_t, x1 - x0)
    assert_close(linear_path(x0, x1, 1.0)[0], x1)
    t = torch.tensor([0.0, 0.25, 1.0])
    x_t, _ = linear_path(x0, x1, t)
    assert_close(x_t[1], 0.75 * x0[1] + 0.25 * x1[1])
    # the velocity is the time derivative of the path (central difference is exact: linear)
    h = 1e-3
    deriv = (linear_path(x0, x1, 0.5 + h)[0] - linear_path(x0, x1, 0.5 - h)[0]) / (2 * h)
    assert_close(deriv, u_t, atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="same shape"):
        linear_path(x0, x1[:2], 0.5)


@pytest.mark.parametrize("noise", ["white", "zero-mean"])
def test_flow_matching_loss_is_zero_for_the_exact_field_of_a_point_mass(noise):
    # All data equal m: x_0 = (x_t - t m) / (1 - t) is known from x_t, so the regression target
    # x_1 - x_0 = (m - x_t) / (1 - t) is a deterministic function and the loss is exactly 0.
    m = torch.tensor(1.7, dtype=torch.float64)

    def exact(t, x, z):
        return (m - x) / (1 - t[:, None, None])

    x1 = m.expand(64, 8, 8).clone()
    gen = torch.Generator().manual_seed(1)
    z = torch.zeros(64, 1, dtype=torch.float64)
    loss = flow_matching_loss(exact, x1, z, generator=gen, noise=noise)
    assert loss.shape == (64,)
    assert loss.max() < 1e-16


def test_base_noise_kinds():
    gen = torch.Generator().manual_seed(0)
    white = base_noise((4000, 4, 8), generator=gen)
    assert torch.equal(white, torch.randn(4000, 4, 8, generator=torch.Generator().manual_seed(0)))
    zero = base_noise((4000, 4, 8), "zero-mean", generator=torch.Generator().manual_seed(0))
    assert_close(zero, white - white.mean(dim=(-2, -1), keepdim=True))
    assert zero.mean(dim=(-2, -1)).abs().max() < 1e-6
    # per-pixel variance 1 - 1/D (D = 32), within 5 standard errors of a variance estimate
    var = zero.var(dim=0)
    assert ((var - (1 - 1 / 32)).abs() < 5 * (1 - 1 / 32) * math.sqrt(2 / 4000)).all()
    with pytest.raises(ValueError, match="noise"):
        base_noise((2, 4, 4), "pink")


def test_zero_mean_noise_gives_a_field_blind_to_the_mean_level_the_exact_level():
    # A field that ignores x and returns the data's level m moves every sample's spatial mean
    # from x0's to x0's + m: exactly m from zero-mean noise, m +- D^-1/2 from white noise.
    m = 0.3

    def level(t, x, z):
        return torch.full_like(x, m)

    z = torch.zeros(500, 1)
    gen = torch.Generator().manual_seed(2)
    for noise, sd in (("zero-mean", 0.0), ("white", 1 / 8)):
        x0 = base_noise((500, 8, 8), noise, generator=gen)
        means = sample_ode(level, z, x0, "euler", 3).x.mean(dim=(-2, -1))
        assert abs(means.mean() - m) < 1e-6 + 4 * sd / math.sqrt(500)
        assert abs(means.std() - sd) < 1e-6 + 4 * sd / math.sqrt(2 * 500)


def test_flow_matching_loss_excess_of_a_shifted_field_is_the_squared_shift():
    # E||v - u||^2 = E||v* - u||^2 + E||v - v*||^2 for the conditional-expectation field v*. With
    # v = v* + c the per-sample excess is c^2 + 2c mean_pixels(v* - u). Given t the 64 pixels of
    # v* - u are independent with mean 0 and variance <= Var(u | t) = 1 + s^2, so the excess has
    # sd <= 2c sqrt((1 + s^2) / 64) per sample and <= 2c sqrt((1 + s^2) / 64) / sqrt(256) =
    # 0.0087 for the batch mean (c = 0.5, s = 0.5). Tolerance 0.05 is > 5 sd.
    field = GaussianField()
    batch, c = 256, 0.5
    z = torch.tensor([[1.0, math.log(0.5)]], dtype=torch.float64).expand(batch, 2)
    x1 = 1.0 + 0.5 * torch.randn(batch, 8, 8, dtype=torch.float64)
    losses = []
    for candidate in (field, ShiftedField(field, c)):
        gen = torch.Generator().manual_seed(7)
        losses.append(flow_matching_loss(candidate, x1, z, generator=gen).mean())
    assert abs(float(losses[1] - losses[0]) - c**2) < 0.05


def test_flow_matching_loss_uses_the_generator():
    field = GaussianField()
    x1, z = torch.randn(4, 8, 8), torch.zeros(4, 2)
    a = flow_matching_loss(field, x1, z, generator=torch.Generator().manual_seed(3))
    b = flow_matching_loss(field, x1, z, generator=torch.Generator().manual_seed(3))
    c = flow_matching_loss(field, x1, z, generator=torch.Generator().manual_seed(4))
    assert_close(a, b)
    assert (a - c).abs().max() > 1e-6


def test_flow_matching_loss_of_a_mean_head_regresses_the_final_mean():
    # per pixel: the zero-mean residual's square plus the head's squared error on the final mean
    torch.manual_seed(1)
    field = ConditionalVectorField(8, 2, channels=4, embed_dim=8, mean_head=True).double()
    x1, z = torch.randn(64, 8, 8, dtype=torch.float64) + 2.0, torch.randn(64, 2).double()
    loss = flow_matching_loss(field, x1, z, generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)  # the same draws of x0 and t
    x0 = torch.randn(x1.shape, generator=gen, dtype=x1.dtype)
    t = torch.rand((64,), generator=gen, dtype=x1.dtype)
    x_t, u_t = linear_path(x0, x1, t)
    v = field(t, x_t, z)
    centred = (v - v.mean((-2, -1), keepdim=True)) - (u_t - u_t.mean((-2, -1), keepdim=True))
    features = [sinusoidal_embedding(t, 8), z, x_t.mean((-2, -1))[:, None]]
    final = field.level_mlp(torch.cat(features, dim=-1))[:, 0]
    late = t > 1 - MIN_REMAINING_TIME  # there the head's velocity is floored
    assert late.any() and not late.all()
    expected = centred.pow(2).mean((-2, -1)) + (final - x1.mean((-2, -1))) ** 2
    assert_close(loss[~late], expected[~late])


def _gaussian_problem(batch: int = 16):
    gen = torch.Generator().manual_seed(0)
    m = torch.linspace(-2.0, 3.0, batch, dtype=torch.float64)
    s = torch.linspace(0.3, 2.0, batch, dtype=torch.float64)
    z = torch.stack([m, s.log()], dim=-1)
    x0 = torch.randn(batch, 6, 6, generator=gen, dtype=torch.float64)
    return z, x0, m[:, None, None] + s[:, None, None] * x0


def test_sample_ode_transports_gaussian_to_gaussian_exactly():
    # The exact field is linear in x, so its flow is the monotone affine map x0 -> m + s x0.
    z, x0, target = _gaussian_problem()
    sol = sample_ode(GaussianField(), z, x0, method="dopri5", rtol=1e-9, atol=1e-9)
    assert_close(sol.x, target, atol=1e-6, rtol=0)
    assert sol.trajectory is None


def test_rk4_with_20_steps_matches_dopri5():
    z, x0, target = _gaussian_problem()
    reference = sample_ode(GaussianField(), z, x0, method="dopri5", rtol=1e-9, atol=1e-9).x
    rk4 = sample_ode(GaussianField(), z, x0, method="rk4", steps=20).x
    assert (rk4 - reference).abs().max() < 1e-4
    euler = sample_ode(GaussianField(), z, x0, method="euler", steps=20).x
    # Euler is first order: visibly worse than rk4 on the same grid, but converging
    assert (euler - target).abs().max() > 10 * (rk4 - target).abs().max()
    assert (euler - target).abs().max() < 0.5


@pytest.mark.parametrize(("method", "per_step"), [("euler", 1), ("midpoint", 2), ("rk4", 4)])
@pytest.mark.parametrize("steps", [1, 7, 20, 49, 61])
def test_fixed_step_evaluation_counts(method, per_step, steps):
    z, x0, _ = _gaussian_problem(2)
    for dtype in (torch.float32, torch.float64):
        sol = sample_ode(GaussianField(), z.to(dtype), x0.to(dtype), method=method, steps=steps)
        assert sol.nfe == per_step * steps


def test_dopri5_counts_evaluations_and_tightens_with_tolerance():
    z, x0, target = _gaussian_problem(4)
    loose = sample_ode(GaussianField(), z, x0, method="dopri5", rtol=1e-3, atol=1e-3)
    tight = sample_ode(GaussianField(), z, x0, method="dopri5", rtol=1e-9, atol=1e-9)
    assert 6 <= loose.nfe < tight.nfe
    assert (tight.x - target).abs().max() <= (loose.x - target).abs().max()


@pytest.mark.parametrize("method", ["midpoint", "dopri5"])
def test_sample_ode_intermediates_and_determinism(method):
    z, x0, _ = _gaussian_problem(3)
    sol = sample_ode(GaussianField(), z, x0, method=method, steps=5, return_intermediates=True)
    assert sol.trajectory.shape == (6, *x0.shape)
    assert_close(sol.times, torch.linspace(0, 1, 6, dtype=torch.float64))
    assert_close(sol.trajectory[0], x0)
    assert_close(sol.trajectory[-1], sol.x)
    again = sample_ode(GaussianField(), z, x0, method=method, steps=5)
    assert_close(again.x, sol.x, atol=1e-12, rtol=0)


def test_sample_ode_is_differentiable_in_z_and_x0():
    field = ConditionalVectorField(8, latent_dim=2, channels=4, embed_dim=8).double()
    z = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    x0 = torch.randn(2, 8, 8, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(
        lambda z_, x_: sample_ode(field, z_, x_, method="euler", steps=2).x, (z, x0), atol=1e-6
    )


def test_sample_ode_with_conv_field_keeps_samples_independent():
    field = ConditionalVectorField(16, latent_dim=2, channels=8)
    z, x0 = torch.randn(3, 2), torch.randn(3, 16, 16)
    with torch.no_grad():
        full = sample_ode(field, z, x0, method="midpoint", steps=4).x
        single = sample_ode(field, z[1:2], x0[1:2], method="midpoint", steps=4).x
    assert_close(single[0], full[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "heun"}, "method"),
        ({"steps": 0}, "steps"),
        ({"rtol": 0.0}, "rtol"),
        ({"atol": -1.0}, "atol"),
    ],
)
def test_sample_ode_rejects_bad_arguments(kwargs, match):
    z, x0, _ = _gaussian_problem(2)
    with pytest.raises(ValueError, match=match):
        sample_ode(GaussianField(), z, x0, **kwargs)
    with pytest.raises(ValueError, match="batch size"):
        sample_ode(GaussianField(), z[:1], x0)


def _constant_level_field(c: float) -> ConditionalVectorField:
    """A mean-head field whose head always predicts the final level ``c`` and whose U-Net is 0."""
    field = ConditionalVectorField(8, latent_dim=2, channels=4, embed_dim=8, mean_head=True)
    field = field.double()
    with torch.no_grad():
        field.conv_out.weight.zero_()
        field.conv_out.bias.zero_()
        field.level_mlp[-1].weight.zero_()
        field.level_mlp[-1].bias.fill_(c)
    return field


@pytest.mark.parametrize(("method", "steps"), [("euler", 1), ("midpoint", 4), ("rk4", 4)])
def test_fixed_step_solvers_integrate_a_mean_heads_level_apart(method, steps):
    # With a head that predicts the level c, d(level)/dt = (c - level) / max(1 - t, eps): the
    # offset e = level - c falls linearly to eps * e0 at t = 1 - eps, then as exp(-(t - 1 + eps)
    # / eps), to e0 * eps / e at t = 1; the zero U-Net leaves the zero-mean part of x0 as it is.
    # On the coupled state these solvers end 0.013 e0 (RK4, 4 steps) and 0.018 e0 (Euler, one
    # step; midpoint, 4 steps) off, their steps being too long for the rate 1 / eps of the end;
    # with the level apart, 2.2e-4 e0 (tolerance 5e-4 e0).
    c, eps = 0.7, MIN_REMAINING_TIME
    field = _constant_level_field(c)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, 2, generator=gen, dtype=torch.float64)
    x0 = (
        torch.randn(3, 8, 8, generator=gen, dtype=torch.float64)
        + torch.tensor([-2.0, 0, 3.0])[:, None, None]
    )
    start = x0.mean((-2, -1))
    exact = c + (start - c) * eps / math.e
    sol = sample_ode(field, z, x0, method, steps, return_intermediates=True)
    assert ((sol.x.mean((-2, -1)) - exact).abs() < 5e-4 * (start - c).abs()).all()
    assert_close(sol.x - sol.x.mean((-2, -1), keepdim=True), x0 - start[:, None, None])
    assert sol.nfe == {"euler": 1, "midpoint": 2, "rk4": 4}[method] * steps
    # intermediates: the level's exact straight line before 1 - eps
    times = torch.linspace(0, 1, steps + 1, dtype=torch.float64)[:-1]
    line = c + (start[None] - c) * (1 - times[:, None])
    assert_close(sol.trajectory[:-1].mean((-2, -1)), line, atol=1e-9, rtol=0)
    # dopri5 integrates the coupled state to the same end
    tight = sample_ode(field, z, x0, "dopri5", rtol=1e-9, atol=1e-9).x
    assert_close(tight.mean((-2, -1)), exact, atol=1e-6, rtol=0)


def test_level_velocity_is_the_mean_of_the_field_and_needs_a_head():
    torch.manual_seed(1)
    field = ConditionalVectorField(8, latent_dim=2, channels=4, embed_dim=8, mean_head=True)
    t = torch.tensor([0.1, 0.6, 0.99])
    x, z = torch.randn(3, 8, 8), torch.randn(3, 2)
    assert_close(field.level_velocity(t, x.mean((-2, -1)), z), field(t, x, z).mean((-2, -1)))
    assert_close(field.level_velocity(0.3, x.mean((-2, -1)), z), field(0.3, x, z).mean((-2, -1)))
    with pytest.raises(ValueError, match="mean_head"):
        ConditionalVectorField(8, 2, channels=4).level_velocity(0.5, torch.zeros(3), z)


def test_sample_ode_with_a_mean_head_is_differentiable_in_z_and_x0():
    torch.manual_seed(2)
    field = ConditionalVectorField(8, latent_dim=2, channels=4, embed_dim=8, mean_head=True)
    field = field.double()
    z = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    x0 = torch.randn(2, 8, 8, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(
        lambda z_, x_: sample_ode(field, z_, x_, method="midpoint", steps=2).x, (z, x0), atol=1e-6
    )
