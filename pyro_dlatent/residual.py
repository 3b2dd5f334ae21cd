"""What a generator's conditional mean leaves in the training fields, as a Gaussian field.

:class:`ResidualField` is the residual model of the collapsed deep prior
(:mod:`pyro_dlatent.inverse.collapsed`): mean and covariance of :math:`f_i - G(\\tilde u_i, 0)`
over training fields. It lives in the core so that a model can fit it after training and keep
it in its checkpoint.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = [
    "MAX_FIELDS",
    "MAX_RANK",
    "MIN_FIELDS",
    "ResidualField",
    "residual_field",
    "standardized_mean",
]

MAX_RANK = 512
"""Most principal components of the residual covariance kept (the rest is a diagonal)."""
MIN_FIELDS = 20
"""Fewest labelled training fields a :class:`ResidualField` is estimated from."""
MAX_FIELDS = 20000
"""Most training fields :func:`residual_field` reads (a random subset beyond)."""
GRAM_PIXELS = 4096
"""Largest field (pixels) fitted from its covariance in one pass; beyond, a randomized SVD."""
FIT_BLOCK = 1024
"""Fields per block of the one-pass fit."""


class ResidualField(torch.nn.Module):
    """Gaussian model of what a generator's conditional mean leaves in the training fields.

    Covariance :math:`\\Sigma_r = F F^\\top + \\mathrm{diag}(D)`: ``F`` the leading ``k``
    principal components of the residuals (scaled by their sd), ``D`` the variance they leave
    per pixel; a low-rank-plus-diagonal form keeps the checkpoint small for large images. Also
    keeps the box of the standardized auxiliaries it was estimated on (the default prior range).

    Parameters
    ----------
    size : int
        Pixels per side of the fields.
    aux_dim : int
        Number of named auxiliaries.
    rank : int, optional
        Components kept, at most ``size**2`` (default ``min(size**2, MAX_RANK)``).
    """

    def __init__(self, size: int, aux_dim: int, rank: int | None = None) -> None:
        super().__init__()
        n = int(size) ** 2
        rank = min(n, MAX_RANK) if rank is None else int(rank)
        if not 1 <= rank <= n:
            raise ValueError(f"expected 1 <= rank <= size**2 = {n}, got {rank!r}")
        self.size = int(size)
        self.register_buffer("fitted", torch.tensor(False))
        self.register_buffer("num_fields", torch.tensor(0, dtype=torch.long))
        self.register_buffer("mean", torch.zeros(self.size, self.size))
        self.register_buffer("factor", torch.zeros(n, rank))
        self.register_buffer("diag", torch.ones(n))
        self.register_buffer("aux_bounds", torch.zeros(int(aux_dim), 2))

    def reset(self) -> None:
        """Forget the fit."""
        self.fitted.fill_(False)
        self.num_fields.zero_()

    def fit(self, residuals: Any, standardized_aux: Any) -> ResidualField:
        """Estimate mean, factor and diagonal from residual fields ``(n, size, size)``.

        ``standardized_aux`` ``(n, aux_dim)`` are the fields' standardized auxiliaries: their
        range is the box of the default prior.
        """
        r = torch.as_tensor(np.asarray(residuals), dtype=torch.float64)
        if r.dim() != 3 or tuple(r.shape[1:]) != (self.size, self.size):
            raise ValueError(
                f"residuals must be (n, {self.size}, {self.size}), got {tuple(r.shape)}"
            )
        flat = r.reshape(r.shape[0], -1)
        if flat.shape[1] <= GRAM_PIXELS:
            return self._fit_blocks(flat.split(FIT_BLOCK), standardized_aux)
        aux = self._checked_aux(standardized_aux, flat)
        n = flat.shape[0]
        mean = flat.mean(0)
        centred = (flat - mean) / math.sqrt(n - 1)
        k = self.factor.shape[1]
        # large images: randomized SVD of the leading components only
        _, s, v = torch.svd_lowrank(centred, q=min(k + 10, *centred.shape), niter=3)
        factor = torch.zeros_like(self.factor, dtype=torch.float64)
        kept = min(k, s.numel())
        factor[:, :kept] = v[:, :kept] * s[:kept]
        return self._set(n, mean, factor, centred.square().sum(0), aux)

    def _fit_blocks(self, blocks: Any, standardized_aux: Any) -> ResidualField:
        """:meth:`fit` from flattened float64 residuals given a block of rows at a time.

        One pass accumulates the mean and the ``(size**2, size**2)`` covariance (shifted by the
        first block's mean against cancellation), whose eigenvectors are the principal
        components: memory does not grow with the number of fields.
        """
        n, shift, total, gram = 0, None, None, None
        for block in blocks:
            if not bool(torch.isfinite(block).all()):
                raise ValueError("residuals and standardized_aux must be finite")
            if shift is None:
                shift = block.mean(0)
                total = torch.zeros_like(shift)
                gram = torch.zeros(shift.numel(), shift.numel(), dtype=torch.float64)
            x = block - shift
            total += x.sum(0)
            gram.addmm_(x.T, x)
            n += block.shape[0]
        aux = self._checked_aux(standardized_aux, n)
        offset = total / n
        covariance = (gram - n * torch.outer(offset, offset)) / (n - 1)
        evals, evecs = torch.linalg.eigh(covariance)
        k = self.factor.shape[1]
        kept = min(k, n, evals.numel())
        factor = torch.zeros_like(self.factor, dtype=torch.float64)
        top = evals.flip(0)[:kept].clamp_min(0.0).sqrt()
        factor[:, :kept] = evecs.flip(1)[:, :kept] * top
        return self._set(n, shift + offset, factor, covariance.diagonal(), aux)

    def _checked_aux(self, standardized_aux: Any, fields: Any) -> torch.Tensor:
        """``standardized_aux`` as float64, checked against ``fields`` (rows, or their count)."""
        n = fields if isinstance(fields, int) else fields.shape[0]
        aux = torch.as_tensor(np.asarray(standardized_aux), dtype=torch.float64)
        if aux.shape != (n, self.aux_bounds.shape[0]):
            raise ValueError(
                f"standardized_aux must be ({n}, {self.aux_bounds.shape[0]}), got "
                f"{tuple(aux.shape)}"
            )
        if n < MIN_FIELDS:
            raise ValueError(f"expected at least {MIN_FIELDS} fields, got {n}")
        finite = torch.isfinite(aux).all()
        if not isinstance(fields, int):
            finite = finite & torch.isfinite(fields).all()
        if not bool(finite):
            raise ValueError("residuals and standardized_aux must be finite")
        return aux

    def _set(
        self,
        n: int,
        mean: torch.Tensor,
        factor: torch.Tensor,
        variance: torch.Tensor,
        aux: torch.Tensor,
    ) -> ResidualField:
        """Store a fit: ``variance`` per pixel, less what ``factor`` explains, is the diagonal."""
        floor = 1e-6 * float(variance.mean()) + 1e-12
        diag = (variance - factor.square().sum(1)).clamp_min(floor)
        self.mean.copy_(mean.reshape(self.size, self.size))
        self.factor.copy_(factor)
        self.diag.copy_(diag)
        self.aux_bounds.copy_(torch.stack([aux.min(0).values, aux.max(0).values], -1))
        self.num_fields.fill_(n)
        self.fitted.fill_(True)
        return self

    @classmethod
    def from_covariance(
        cls, covariance: Any, standardized_bounds: Any, mean: Any = None
    ) -> ResidualField:
        """A residual field of known covariance ``(size**2, size**2)`` (full rank, no estimate).

        ``standardized_bounds`` ``(aux_dim, 2)`` is the prior box in standardized coordinates;
        ``mean`` ``(size, size)`` defaults to zero.
        """
        cov = np.asarray(covariance, dtype=np.float64)
        n = cov.shape[0]
        size = math.isqrt(n)
        if cov.shape != (n, n) or size * size != n or not np.isfinite(cov).all():
            raise ValueError(
                f"covariance must be a finite (size**2, size**2) array, got {cov.shape}"
            )
        box = np.asarray(standardized_bounds, dtype=np.float64)
        if box.ndim != 2 or box.shape[1] != 2:
            raise ValueError(f"standardized_bounds must be (aux_dim, 2), got {box.shape}")
        evals, evecs = np.linalg.eigh(0.5 * (cov + cov.T))
        if evals.min() < -1e-8 * max(evals.max(), 1e-300):
            raise ValueError("covariance is not positive semi-definite")
        field = cls(size, box.shape[0], rank=n)
        field.factor.copy_(torch.as_tensor(evecs * np.sqrt(evals.clip(0))))
        field.diag.fill_(1e-12 * float(np.trace(cov)) / n)
        if mean is not None:
            field.mean.copy_(torch.as_tensor(np.asarray(mean, dtype=np.float64)))
        field.aux_bounds.copy_(torch.as_tensor(np.sort(box, axis=1)))
        field.fitted.fill_(True)
        return field

    def covariance(self) -> np.ndarray:
        """:math:`\\Sigma_r` as a dense ``(size**2, size**2)`` float64 array."""
        f = self.factor.double().numpy()
        return f @ f.T + np.diag(self.diag.double().numpy())


def standardized_mean(generator: torch.nn.Module, s: torch.Tensor) -> torch.Tensor:
    """The field a generator expects at standardized auxiliaries ``s`` ``(n, d)``.

    Its ``conditional_mean`` where it has one (``AuxVAE.generator()``), else ``G(s, 0)``.
    """
    mean = getattr(generator, "conditional_mean", None)
    if mean is not None:
        return mean(s)
    z_rec = s.new_zeros(*s.shape[:-1], int(generator.residual_dim))
    return generator(s, z_rec)


@torch.no_grad()
def residual_field(
    generator: torch.nn.Module,
    images: Any,
    aux: Any,
    *,
    rank: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
) -> ResidualField:
    """Fit a :class:`ResidualField` to training fields and their auxiliaries (physical units).

    Rows with a missing auxiliary are left out; at most :data:`MAX_FIELDS` rows are read.
    """
    scaler = generator.scaler
    images = np.asarray(images, dtype=np.float64)
    s = scaler.transform(aux)
    keep = np.isfinite(s).all(1)
    images, s = images[keep], s[keep]
    if len(images) > MAX_FIELDS:
        rows = np.sort(np.random.default_rng(seed).choice(len(images), MAX_FIELDS, replace=False))
        images, s = images[rows], s[rows]
    dtype = next(generator.parameters()).dtype
    field = ResidualField(int(generator.image_size), int(generator.aux_dim), rank)
    return fit_residuals(
        field,
        lambda chunk: standardized_mean(generator, chunk.to(dtype)),
        images,
        s,
        batch_size=batch_size,
    )


@torch.no_grad()
def fit_residuals(
    field: ResidualField,
    mean: Any,
    images: Any,
    standardized: Any,
    *,
    batch_size: int = 256,
) -> ResidualField:
    """Fit ``field`` to ``images - mean(standardized)``, ``batch_size`` rows of the mean at a time.

    ``mean`` maps a tensor of standardized auxiliaries ``(k, aux_dim)`` to fields ``(k, H, W)``;
    every row is used (filter missing auxiliaries and subsample first).
    """
    images = torch.as_tensor(np.asarray(images))
    s = torch.as_tensor(np.asarray(standardized), dtype=torch.float64)
    if images.dim() != 3 or tuple(images.shape[1:]) != (field.size, field.size):
        raise ValueError(
            f"images must be (n, {field.size}, {field.size}), got {tuple(images.shape)}"
        )

    def blocks() -> Any:
        for i in range(0, len(s), batch_size):
            block = images[i : i + batch_size].to(torch.float64)
            yield (block - mean(s[i : i + batch_size]).cpu().double()).reshape(len(block), -1)

    if field.size**2 <= GRAM_PIXELS:  # one pass: no copy of all the residuals is held
        return field._fit_blocks(blocks(), s)
    return field.fit(torch.cat(list(blocks())).reshape(images.shape).numpy(), s.numpy())
