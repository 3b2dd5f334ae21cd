"""Known-answer tests of the differentiable alignment and decorrelation penalties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pyro_dlatent.penalties import (
    alignment_penalty,
    decorrelation_penalty,
    masked_correlation,
    polynomial_lift,
)


def _normal(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_polynomial_lift_standardizes_then_takes_powers():
    x = _normal(500, 2) * torch.tensor([3.0, 0.5], dtype=torch.float64) + 7.0
    lifted = polynomial_lift(x, degree=3)
    assert lifted.shape == (500, 2, 3)
    s = lifted[..., 0]
    torch.testing.assert_close(s.mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(s.std(0, unbiased=False), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(lifted[..., 2], s**3)


def test_polynomial_lift_uses_observed_rows_only():
    x = _normal(200, 1)
    mask = torch.arange(200).unsqueeze(-1) % 2 == 0
    x_missing = torch.where(mask, x, torch.full_like(x, float("nan")))
    lifted = polynomial_lift(x_missing, degree=2, mask=mask)
    reference = polynomial_lift(x[mask].unsqueeze(-1), degree=2)
    torch.testing.assert_close(lifted[mask.squeeze(-1)], reference)
    assert torch.all(lifted[~mask.squeeze(-1)] == 0)


def test_masked_correlation_matches_numpy_without_mask():
    a, b = _normal(300, 3, seed=1), _normal(300, 2, seed=2)
    b = b + 0.7 * a[:, :2]
    corr, valid = masked_correlation(a, b)
    expected = np.corrcoef(a.numpy().T, b.numpy().T)[:3, 3:]
    np.testing.assert_allclose(corr.numpy(), expected, atol=1e-7)
    assert valid.all()


def test_masked_correlation_matches_numpy_on_observed_rows():
    a, b = _normal(400, 2, seed=3), _normal(400, 2, seed=4)
    b = b - 0.5 * a
    mask = torch.rand(400, 2, generator=torch.Generator().manual_seed(5)) < 0.6
    b_missing = torch.where(mask, b, torch.full_like(b, float("nan")))
    corr, _ = masked_correlation(a, b_missing, mask)
    for q in range(2):
        rows = mask[:, q].numpy()
        for p in range(2):
            expected = np.corrcoef(a[rows, p].numpy(), b[rows, q].numpy())[0, 1]
            assert corr[p, q].item() == pytest.approx(expected, abs=1e-7)


def test_masked_correlation_marks_sparse_columns_invalid():
    a, b = _normal(50, 1), _normal(50, 2, seed=1)
    mask = torch.ones(50, 2, dtype=torch.bool)
    mask[2:, 1] = False
    corr, valid = masked_correlation(a, b, mask, min_count=3)
    assert valid.tolist() == [True, False]
    assert corr[0, 1].item() == 0.0


def test_alignment_matches_the_paper_formula_at_degree_one():
    u = _normal(256, 3, seed=6)
    mu = u @ torch.tensor([[1.0, 0.3, 0.0], [0.2, 1.0, -0.4], [0.0, 0.1, 1.0]], dtype=u.dtype)
    mu = mu + 0.5 * _normal(256, 3, seed=7)
    c = np.corrcoef(mu.numpy().T, u.numpy().T)[:3, 3:]
    expected = np.sum(1 - np.diag(c)) + np.sum(np.abs(c)) - np.sum(np.abs(np.diag(c)))
    assert alignment_penalty(mu, u, degree=1).item() == pytest.approx(expected, abs=1e-6)


def test_alignment_is_near_zero_for_identity_and_large_for_a_swap():
    n, k = 4000, 3
    u = _normal(n, k, seed=8)
    identity = alignment_penalty(u.clone(), u, degree=2).item()
    # The diagonal term is exactly 0; each of the k(k-1) = 6 off-diagonal entries averages K^2 = 4
    # |corr| of independent features, each |N(0, 1/n)| with mean sqrt(2/pi)/sqrt(n) = 0.0126.
    # Their sum has mean 0.076 and sd below 0.04, so 0.25 is more than 4 sd away.
    assert identity < 0.25
    swapped = alignment_penalty(u[:, [1, 0, 2]], u, degree=2).item()
    # Two coordinates lose their diagonal (about 1 each) and gain an off-diagonal |corr| = 1 on
    # the matched powers (p = q) out of the four power pairs: at least 2 * 1 + 2 * 0.5.
    assert swapped > 2.5


def test_alignment_of_constant_means_has_finite_gradient():
    u = _normal(64, 2)
    mu = torch.zeros(64, 2, dtype=torch.float64, requires_grad=True)
    value = alignment_penalty(mu, u)
    assert value.item() == pytest.approx(2.0, abs=1e-6)  # two diagonal terms of 1, nothing else
    value.backward()
    assert torch.isfinite(mu.grad).all()


def test_alignment_gradcheck():
    u = _normal(24, 2, seed=9)
    mu = (_normal(24, 2, seed=10) + u).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda m: alignment_penalty(m, u, degree=2), (mu,))


def test_decorrelation_sees_quadratic_leakage_only_with_lifts():
    n = 4000
    u = _normal(n, 1, seed=11)
    leaking = u**2
    linear = decorrelation_penalty(leaking, u, degree=1).item()
    lifted = decorrelation_penalty(leaking, u, degree=2).item()
    # corr(u^2, u) has sd 1/sqrt(n) around 0 (E u^3 = 0), so the linear score is below
    # 4/sqrt(n) = 0.063; with K = 2 one of the four entries, corr(s(u^2), s(u)^2), is
    # 1 and the mean of the four is above 1/4.
    assert linear < 4 / math.sqrt(n)
    assert lifted > 0.25
    independent = decorrelation_penalty(_normal(n, 3, seed=12), u, degree=2).item()
    # Mean of 12 |N(0, 1/n)| entries: mean 0.0126, sd below 0.01.
    assert independent < 0.05


def test_decorrelation_with_mask_equals_penalty_on_observed_rows():
    n = 300
    u = _normal(n, 1, seed=13)
    rec = 0.8 * u + _normal(n, 2, seed=14)
    mask = (torch.arange(n) % 3 != 0).unsqueeze(-1)
    u_missing = torch.where(mask, u, torch.full_like(u, float("nan")))
    masked = decorrelation_penalty(rec, u_missing, mask, degree=1)
    rows = mask.squeeze(-1)
    subset = decorrelation_penalty(rec[rows], u[rows], degree=1)
    # Equal up to the 1e-8 variance floor, which enters with the full-batch vs subset variances.
    assert masked.item() == pytest.approx(subset.item(), abs=1e-8)
    rec.requires_grad_(True)
    decorrelation_penalty(rec, u_missing, mask, degree=2).backward()
    assert torch.isfinite(rec.grad).all()


def test_square_decorrelation_is_the_mean_explained_variance():
    n = 4000
    u = _normal(n, 2, seed=17)
    # mu_rec = u_0: the lifted residual (s, s^2) matches (u_0, u_0^2) exactly and is uncorrelated
    # with u_0^2, u_0 (odd moments of a normal vanish) and with u_1: the two lifted coordinates
    # each have summed squared correlation 1 (+ O(1/n) from the other three columns).
    full = decorrelation_penalty(u[:, :1], u, degree=2, form="square").item()
    assert full == pytest.approx(1.0, abs=0.01)
    # Independent coordinates: each squared correlation has mean 1/n, so the per-coordinate sum
    # over k K = 4 columns has mean 4/n = 0.001 (sd about 0.0007 for the mean over 6 of them).
    independent = decorrelation_penalty(_normal(n, 3, seed=18), u, degree=2, form="square")
    assert independent.item() < 0.005
    # Half-strength linear leak: corr(rec, u_0) = 1/sqrt(2) for rec = (u_0 + e) with var(e) = 1,
    # so corr^2 = 1/2 on the linear coordinate; for jointly normal (rec, u_0) with correlation rho
    # the squares have correlation rho^2 = 1/2, so corr^2 = 1/4 on the quadratic coordinate: the
    # mean over the two is 3/8. Sampling sd of each corr^2 at n = 4000 is about 0.015.
    half = u[:, :1] + _normal(n, 1, seed=19)
    value = decorrelation_penalty(half, u, degree=2, form="square").item()
    assert value == pytest.approx(0.375, abs=0.03)


def test_square_decorrelation_gradient_vanishes_at_the_noise_floor():
    n = 256
    u = _normal(n, 2, seed=20)
    independent = _normal(n, 2, seed=21).requires_grad_(True)
    leaking = (u + 0.5 * _normal(n, 2, seed=22)).requires_grad_(True)
    norms = {}
    for form in ("abs", "square"):
        for name, rec in (("independent", independent), ("leaking", leaking)):
            rec.grad = None
            decorrelation_penalty(rec, u, degree=2, form=form).backward()
            norms[form, name] = rec.grad.norm().item()
    # |C| pushes as hard on noise-level correlations (about 1/sqrt(256) = 0.06) as on leaks;
    # C^2 pushes in proportion to C, so its push at the noise floor is far below its push on a
    # leak with C near 0.9.
    assert norms["abs", "independent"] > 0.3 * norms["abs", "leaking"]
    assert norms["square", "independent"] < 0.2 * norms["square", "leaking"]


def test_square_decorrelation_with_mask_equals_penalty_on_observed_rows():
    n = 300
    u = _normal(n, 2, seed=23)
    rec = 0.8 * u[:, :1] + _normal(n, 2, seed=24)
    mask = torch.stack([torch.arange(n) % 3 != 0, torch.ones(n, dtype=torch.bool)], -1)
    u_missing = torch.where(mask, u, torch.full_like(u, float("nan")))
    masked = decorrelation_penalty(rec, u_missing, mask, degree=1, form="square")
    rows = mask[:, 0]
    corr_0 = np.corrcoef(rec[rows].numpy().T, u[rows, 0].numpy())[:2, 2]
    corr_1 = np.corrcoef(rec.numpy().T, u[:, 1].numpy())[:2, 2]
    expected = ((corr_0**2).sum() + (corr_1**2).sum()) / 2
    assert masked.item() == pytest.approx(expected, abs=1e-6)


def test_alignment_ignores_a_column_without_observations():
    u = _normal(100, 2, seed=15)
    mask = torch.ones(100, 2, dtype=torch.bool)
    mask[:, 1] = False
    u_missing = torch.where(mask, u, torch.full_like(u, float("nan")))
    mu = torch.stack([u[:, 0], _normal(100, 1, seed=16)[:, 0]], dim=-1)
    value = alignment_penalty(mu, u_missing, mask, degree=1)
    # Only column 0 is valid: diagonal 1 - corr(u0, u0) = 0 plus |corr(mu_1, u_0)|.
    expected = abs(np.corrcoef(mu[:, 1].numpy(), u[:, 0].numpy())[0, 1])
    assert value.item() == pytest.approx(expected, abs=1e-7)


def test_residual_dim_zero_gives_zero():
    u = _normal(10, 2)
    assert decorrelation_penalty(torch.zeros(10, 0, dtype=u.dtype), u).item() == 0.0


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: polynomial_lift(torch.zeros(4, 2), degree=0), "degree"),
        (lambda: alignment_penalty(torch.zeros(4, 2), torch.zeros(5, 2)), "mu_aux"),
        (lambda: alignment_penalty(torch.zeros(4, 3), torch.zeros(4, 2)), "mu_aux"),
        (lambda: decorrelation_penalty(torch.zeros(4), torch.zeros(4, 2)), "mu_rec"),
        (lambda: masked_correlation(torch.zeros(4, 1), torch.zeros(3, 1)), "same number of rows"),
        (lambda: decorrelation_penalty(torch.zeros(4, 1), torch.zeros(4, 2), form="l1"), "form"),
    ],
)
def test_bad_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()
