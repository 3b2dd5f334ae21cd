"""Differentiable batch penalties tying encoder means to auxiliaries: alignment, decorrelation.

These are the training-time (torch, differentiable, mask-aware) versions of the Aux-VAE paper's
penalties. Both work on *polynomial lifts*: a matrix :math:`x` of shape ``(n, d)`` is
standardized column by column over the batch (:math:`s`) and lifted to

.. math:: L_K(x)_{i, j, p} = s_{ij}^{\\,p}, \\qquad p = 1, \\dots, K,

so that a correlation between lifted columns also sees quadratic (``p = 2``) dependence that a
plain Pearson correlation misses (``corr(z, u) = 0`` for symmetric ``u`` even when ``z = u^2``).
With ``K = 1`` both penalties reduce to the paper's linear definitions.

Correlations respect the missing-auxiliary mask: the correlation between any feature ``a`` and a
lifted auxiliary column ``u_l^q`` is computed over the rows where ``u_l`` is observed only (means,
variances and covariance all restricted to those rows). A column with fewer than
``min_count`` observed rows in the batch contributes nothing.
"""

from __future__ import annotations

import torch

__all__ = [
    "DECORRELATION_FORMS",
    "alignment_penalty",
    "decorrelation_penalty",
    "masked_correlation",
    "polynomial_lift",
]


DECORRELATION_FORMS = ("abs", "square")
"""Forms of :func:`decorrelation_penalty`: mean absolute or summed squared correlations."""


def _check_degree(degree: int) -> int:
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise ValueError(f"expected degree >= 1 (an int), got {degree!r}")
    return degree


def polynomial_lift(
    x: torch.Tensor, degree: int = 2, mask: torch.Tensor | None = None, *, eps: float = 1e-8
) -> torch.Tensor:
    """Powers ``s, s**2, ..., s**degree`` of every column standardized over the batch.

    Each column is standardized with its batch mean and sd over the observed rows,
    :math:`s_{ij} = (x_{ij} - \\bar x_j) / \\sqrt{\\mathrm{var}_j + \\epsilon}`, before taking
    powers, so the quadratic feature measures distance from the batch centre whatever the
    column's offset and scale (the same lift as :func:`pyro_dlatent.metrics.polynomial_lift` up
    to a per-feature affine map, which no correlation sees). Unobserved entries are set to 0.

    Parameters
    ----------
    x : Tensor, shape ``(n, d)``
        Entries where ``mask`` is False are ignored (may be NaN).
    degree : int
        Highest power ``K``.
    mask : Tensor of bool, shape ``(n, d)``, optional
        True where observed.
    eps : float
        Variance floor (keeps constant columns finite).

    Returns
    -------
    Tensor, shape ``(n, d, K)``
        ``out[i, j, p - 1] = s[i, j] ** p``.
    """
    _check_degree(degree)
    if x.dim() != 2:
        raise ValueError(f"x must have shape (n, d), got {tuple(x.shape)}")
    if mask is None:
        weight = torch.ones_like(x)
    else:
        if mask.shape != x.shape:
            raise ValueError(f"mask must have the shape of x {tuple(x.shape)}, got {mask.shape}")
        weight = mask.to(x.dtype)
        x = torch.where(mask, x, torch.zeros_like(x))
    count = weight.sum(0).clamp_min(1.0)
    centred = (x - (x * weight).sum(0) / count) * weight
    variance = (centred * centred).sum(0) / count
    standardized = centred / torch.sqrt(variance + eps)
    powers = torch.arange(1, degree + 1, dtype=x.dtype, device=x.device)
    return standardized.unsqueeze(-1) ** powers


def masked_correlation(
    a: torch.Tensor,
    b: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    min_count: int = 3,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pearson correlation of every column of ``a`` with every column of ``b``, over observed rows.

    For column ``q`` of ``b`` with observed rows :math:`O_q = \\{i : m_{iq}\\}`,

    .. math::

        C_{pq} = \\frac{\\sum_{i \\in O_q} (a_{ip} - \\bar a_{p|q})(b_{iq} - \\bar b_q)}
                      {\\sqrt{(\\sum_{i \\in O_q} (a_{ip} - \\bar a_{p|q})^2 + \\epsilon')
                              (\\sum_{i \\in O_q} (b_{iq} - \\bar b_q)^2 + \\epsilon')}},

    where the means are over :math:`O_q` and :math:`\\epsilon' = |O_q| \\epsilon` keeps the
    gradient finite for a constant column (whose correlations are then 0).

    Parameters
    ----------
    a : Tensor, shape ``(n, P)``
        Fully observed features (encoder means or their lifts).
    b : Tensor, shape ``(n, Q)``
        Features of the auxiliaries; entries where ``mask`` is False are ignored (may be NaN).
    mask : Tensor of bool, shape ``(n, Q)``, optional
        True where ``b`` is observed; ``None`` means all observed.
    min_count : int
        Columns of ``b`` observed in fewer rows are marked invalid.
    eps : float
        Per-row variance floor.

    Returns
    -------
    corr : Tensor, shape ``(P, Q)``
        Correlations; 0 in invalid columns.
    valid : Tensor of bool, shape ``(Q,)``
        Whether column ``q`` of ``b`` had at least ``min_count`` observed rows.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(
            f"a and b must be 2-d with the same number of rows, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )
    if mask is None:
        weight = torch.ones_like(b)
    else:
        if mask.shape != b.shape:
            raise ValueError(f"mask must have the shape of b {tuple(b.shape)}, got {mask.shape}")
        weight = mask.to(b.dtype)
    b = torch.where(weight > 0, b, torch.zeros_like(b))
    count = weight.sum(0)
    valid = count >= min_count
    safe_count = count.clamp_min(1.0)
    # Centre a on its full-batch mean first: it does not change the correlation and keeps the
    # one-pass variance below free of cancellation.
    a = a - a.mean(0)
    b_centred = (b - (b * weight).sum(0) / safe_count) * weight
    a_mean = (a.T @ weight) / safe_count
    a_sq = ((a * a).T @ weight) / safe_count - a_mean**2
    cov = (a.T @ b_centred) / safe_count
    b_sq = (b_centred * b_centred).sum(0) / safe_count
    corr = cov / torch.sqrt((a_sq.clamp_min(0.0) + eps) * (b_sq + eps))
    return torch.where(valid, corr, torch.zeros_like(corr)), valid


def _lifted_with_mask(
    u: torch.Tensor, mask: torch.Tensor | None, degree: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    n, k = u.shape
    lifted = polynomial_lift(u, degree, mask).reshape(n, k * degree)
    if mask is None:
        return lifted, None
    return lifted, mask.unsqueeze(-1).expand(n, k, degree).reshape(n, k * degree)


def _check_pair(z: torch.Tensor, u: torch.Tensor, z_name: str) -> None:
    if z.dim() != 2 or u.dim() != 2 or z.shape[0] != u.shape[0]:
        raise ValueError(
            f"{z_name} and u must be 2-d with the same batch size, got {tuple(z.shape)} and "
            f"{tuple(u.shape)}"
        )


def alignment_penalty(
    mu_aux: torch.Tensor,
    u: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    degree: int = 2,
    min_count: int = 3,
) -> torch.Tensor:
    """Alignment of guided encoder means with their auxiliaries, on polynomial lifts.

    With :math:`C^{pq}_{jl} = \\mathrm{corr}(\\mu_j^{\\,p}, \\tilde u_l^{\\,q})` over the batch
    (rows where :math:`u_l` is observed),

    .. math::

        \\mathcal{A} = \\sum_j \\frac{1}{K} \\sum_{p=1}^K \\bigl(1 - C^{pp}_{jj}\\bigr)
                     + \\sum_{j \\ne l} \\frac{1}{K^2} \\sum_{p,q=1}^K \\bigl|C^{pq}_{jl}\\bigr|.

    The first sum rewards each guided coordinate for matching its own auxiliary power by power;
    the second penalizes any (linear or quadratic) dependence on the other auxiliaries. Each
    power is averaged, so the penalty ranges over ``[0, 2k + k(k - 1)]`` for every ``K`` and
    equals the paper's ``sum_j (1 - corr(mu_j, u_j)) + sum_{j != l} |corr(mu_j, u_l)|`` at
    ``K = 1``. Auxiliaries observed in fewer than ``min_count`` rows contribute nothing.

    Parameters
    ----------
    mu_aux : Tensor, shape ``(n, k)``
        Encoder means of the guided block.
    u : Tensor, shape ``(n, k)``
        Standardized auxiliaries (entries where ``mask`` is False are ignored).
    mask : Tensor of bool, shape ``(n, k)``, optional
        True where observed.
    degree : int
        Lift degree ``K``.

    Returns
    -------
    Tensor, shape ``()``
    """
    _check_pair(mu_aux, u, "mu_aux")
    if mu_aux.shape[1] != u.shape[1]:
        raise ValueError(
            f"mu_aux must have one column per auxiliary ({u.shape[1]}), got {mu_aux.shape[1]}"
        )
    n, k = u.shape
    lifted_u, lifted_mask = _lifted_with_mask(u, mask, degree)
    lifted_mu = polynomial_lift(mu_aux, degree).reshape(n, k * degree)
    corr, valid = masked_correlation(lifted_mu, lifted_u, lifted_mask, min_count=min_count)
    corr = corr.reshape(k, degree, k, degree)
    valid = valid.reshape(k, degree)[:, 0]
    eye_k = torch.eye(k, dtype=torch.bool, device=u.device)
    matched = torch.diagonal(torch.diagonal(corr, dim1=0, dim2=2), dim1=0, dim2=1)  # (k, K)
    on_diagonal = ((1.0 - matched).mean(-1) * valid).sum()
    cross = corr.abs().mean(dim=(1, 3))  # (k, k): averaged over the K^2 power pairs
    off_diagonal = (cross * (~eye_k & valid.unsqueeze(0))).sum()
    return on_diagonal + off_diagonal


def decorrelation_penalty(
    mu_rec: torch.Tensor,
    u: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    degree: int = 2,
    min_count: int = 3,
    form: str = "abs",
) -> torch.Tensor:
    """Leakage of the auxiliaries into the residual encoder means, on polynomial lifts.

    With :math:`C_{ip,lq} = \\mathrm{corr}(\\mu_{rec, i}^{\\,p}, \\tilde u_l^{\\,q})` over the
    rows where :math:`u_l` is observed, the ``"abs"`` form (the Aux-VAE paper's, lifted) is the
    mean absolute correlation

    .. math::

        \\mathcal{D}_{abs} = \\frac{1}{r K \\, k_{obs} K} \\sum_{i=1}^{r} \\sum_{l \\text{ valid}}
                           \\sum_{p, q = 1}^{K} \\bigl|C_{ip,lq}\\bigr|,

    and the ``"square"`` form sums the squared correlations of each lifted residual coordinate
    and averages over those,

    .. math::

        \\mathcal{D}_{sq} = \\frac{1}{r K} \\sum_{i=1}^{r} \\sum_{p=1}^{K}
                          \\sum_{l \\text{ valid}} \\sum_{q=1}^{K} C_{ip,lq}^2,

    which for mutually uncorrelated lifted auxiliaries (independent ``u_l`` with symmetric
    marginals) is the mean R² of a lifted residual coordinate regressed on all lifted
    auxiliaries. Both see nonlinear leakage such as ``mu_rec = u**2``. They differ in where
    they push: ``|C|`` has a gradient of constant size however small the correlation, so the
    batch noise of independent coordinates (each ``|C| ~ 1/sqrt(batch)``) keeps kicking the
    encoder and one large leak is diluted by the average; ``C^2`` has a gradient ``2 C`` that
    vanishes at the noise floor and grows with the leak, so it suppresses the *largest*
    correlations (what the leakage score measures) and leaves the rest of the residual block
    free. Zero when ``r = 0`` or no auxiliary has ``min_count`` observed rows.

    Parameters
    ----------
    mu_rec : Tensor, shape ``(n, r)``
        Encoder means of the residual block.
    u : Tensor, shape ``(n, k)``
        Standardized auxiliaries.
    mask : Tensor of bool, shape ``(n, k)``, optional
    degree : int
        Lift degree ``K``.
    min_count : int
        Auxiliaries observed in fewer rows are left out.
    form : {"abs", "square"}

    Returns
    -------
    Tensor, shape ``()``
    """
    if form not in DECORRELATION_FORMS:
        raise ValueError(f"expected form in {DECORRELATION_FORMS}, got {form!r}")
    _check_pair(mu_rec, u, "mu_rec")
    n = u.shape[0]
    r = mu_rec.shape[1]
    if r == 0:
        return mu_rec.sum() * 0.0
    lifted_u, lifted_mask = _lifted_with_mask(u, mask, degree)
    lifted_rec = polynomial_lift(mu_rec, degree).reshape(n, r * degree)
    corr, valid = masked_correlation(lifted_rec, lifted_u, lifted_mask, min_count=min_count)
    if form == "square":
        return corr.pow(2).sum() / (r * degree)
    n_valid = valid.sum().clamp_min(1)
    return corr.abs().sum() / (r * degree * n_valid)
