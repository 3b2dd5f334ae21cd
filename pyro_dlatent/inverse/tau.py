"""Calibration of the deep prior's per-coordinate ``tau`` from held-out labelled images."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch

from pyro_dlatent.inverse.protocols import Generator, require

__all__ = ["TauCalibration", "calibrate_tau"]


class TauCalibration(NamedTuple):
    """Misalignment between a generator's guided coordinates and the standardized auxiliaries.

    Attributes
    ----------
    tau : ndarray, shape ``(aux_dim,)``
        Root-mean-square misalignment per coordinate,
        :math:`\\sqrt{\\overline{(\\hat z_{aux,j} - \\tilde u_j)^2}}` (bias included):
        the per-coordinate ``tau`` to give
        :class:`~pyro_dlatent.inverse.prior.DeepPrior`.
    bias : ndarray, shape ``(aux_dim,)``
        Mean misalignment :math:`\\overline{\\hat z_{aux,j} - \\tilde u_j}`.
    sd : ndarray, shape ``(aux_dim,)``
        Standard deviation of the misalignment (``tau**2 = bias**2 + sd**2``).
    z_aux : ndarray, shape ``(n, aux_dim)``
        The fitted guided coordinates :math:`\\hat z_{aux}`.
    aux_standardized : ndarray, shape ``(n, aux_dim)``
        The standardized auxiliaries :math:`\\tilde u`.
    pixel_rmse : ndarray, shape ``(n,)``
        Root-mean-square pixel misfit :math:`\\lVert G(\\hat z) - x \\rVert / \\sqrt{HW}`.
    residuals : ndarray, shape ``(n, H, W)``
        What the generator leaves unexplained, :math:`x - G(\\hat z)`: samples of its
        approximation error, e.g. to turn into a model-error covariance of the data.
    """

    tau: np.ndarray
    bias: np.ndarray
    sd: np.ndarray
    z_aux: np.ndarray
    aux_standardized: np.ndarray
    pixel_rmse: np.ndarray
    residuals: np.ndarray


def calibrate_tau(
    generator: torch.nn.Module,
    images: Any,
    aux: Any,
    *,
    noise_sd: float,
    init_z_aux: Any = None,
    init_z_rec: Any = None,
    steps: int = 500,
    lr: float = 0.05,
    batch_size: int = 256,
) -> TauCalibration:
    """Calibrate a per-coordinate ``tau`` from held-out labelled images (model-error slack).

    A trained generator does not put the image of auxiliaries :math:`u` exactly at
    :math:`z_{aux} = \\tilde u`: the latent that best reproduces a held-out image sits at
    :math:`\\hat z_{aux} = \\tilde u + e`. In an inverse problem whose data pin the field,
    the posterior of :math:`z_{aux}` concentrates near :math:`\\hat z_{aux}`, so the
    posterior of :math:`u` is only calibrated if the prior's :math:`\\tau_j` covers the
    spread of :math:`e_j`; the generator's training ``tau`` usually does not. For each image
    this function finds the latent the inverse problem would find from a fully observed
    field, the mode of

    .. math::

        \\frac{\\lVert G(z_{aux}, z_{rec}) - x \\rVert^2}{2 \\sigma^2}
        + \\frac{\\lVert z_{aux} \\rVert^2}{2 (1 + \\tau_0^2)}
        + \\frac{\\lVert z_{rec} \\rVert^2}{2},

    with :math:`\\sigma` = ``noise_sd`` and the marginal prior of the guided block (the
    auxiliaries are *not* used, so the fit is not pulled towards them), then returns
    :math:`\\tau_j = \\sqrt{\\overline{e_j^2}}`. This targets the generator's own
    misalignment, unlike the encoder's means on held-out data, whose error also holds the
    encoder's amortization gap, which an inverse problem (that never calls the encoder) does not
    see; the encoder's means are the natural starting point of the fit.

    Parameters
    ----------
    generator : torch.nn.Module
        ``G(z_aux (n, aux_dim), z_rec (n, residual_dim)) -> (n, H, W)`` with ``aux_dim``,
        ``residual_dim`` and a fitted ``scaler`` (as
        :class:`~pyro_dlatent.inverse.prior.DeepPrior` requires); ``tau`` (default 1.0 when
        absent) sets the marginal prior of the guided block. It is not modified.
    images : array-like, shape ``(n, H, W)``
        Held-out images in the generator's output units.
    aux : array-like, shape ``(n, aux_dim)``
        Their auxiliaries in physical units, in the scaler's order.
    noise_sd : float
        Pixel sd of the misfit the generator cannot explain (image units), e.g. the root-mean-
        square reconstruction error of the trained model; it weighs the fit against the prior.
    init_z_aux, init_z_rec : array-like, shapes ``(n, aux_dim)``, ``(n, residual_dim)``, optional
        Starting latents (e.g. the encoder's means); default zeros.
    steps : int
        Adam steps per batch.
    lr : float
        Adam learning rate.
    batch_size : int
        Images fitted together.

    Returns
    -------
    TauCalibration
    """
    require(generator, Generator, "generator")
    if not (isinstance(noise_sd, int | float) and math.isfinite(noise_sd) and noise_sd > 0):
        raise ValueError(f"expected noise_sd > 0, got {noise_sd!r}")
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"expected lr > 0, got {lr!r}")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"expected {name} >= 1, got {value!r}")
    k, r = int(generator.aux_dim), int(generator.residual_dim)
    images = np.asarray(images, dtype=np.float64)
    aux = np.asarray(aux, dtype=np.float64)
    if images.ndim != 3:
        raise ValueError(f"expected images of shape (n, H, W), got {images.shape}")
    n = images.shape[0]
    if n < 2:
        raise ValueError(f"expected at least 2 images, got {n}")
    if aux.shape != (n, k):
        raise ValueError(f"expected aux of shape ({n}, {k}), got {aux.shape}")
    inits = []
    for name, value, dim in (("init_z_aux", init_z_aux, k), ("init_z_rec", init_z_rec, r)):
        value = np.zeros((n, dim)) if value is None else np.asarray(value, dtype=np.float64)
        if value.shape != (n, dim):
            raise ValueError(f"expected {name} of shape ({n}, {dim}), got {value.shape}")
        inits.append(value)
    aux_std = np.asarray(generator.scaler.transform(aux), dtype=np.float64)
    if not np.isfinite(aux_std).all():
        raise ValueError("aux contains values outside the scaler's transform domain")
    tau0 = getattr(generator, "tau", 1.0)
    tau0 = float(torch.as_tensor(tau0).detach().square().mean().sqrt())
    ref = next(iter(generator.parameters()), None)
    dtype = ref.dtype if ref is not None else torch.get_default_dtype()
    device = ref.device if ref is not None else torch.device("cpu")
    aux_precision = 1.0 / (1.0 + tau0**2)
    fitted, residuals = [], []
    for start in range(0, n, batch_size):
        rows = slice(start, start + batch_size)
        target = torch.as_tensor(images[rows], dtype=dtype, device=device)
        z_aux = torch.tensor(inits[0][rows], dtype=dtype, device=device, requires_grad=True)
        z_rec = torch.tensor(inits[1][rows], dtype=dtype, device=device, requires_grad=True)
        optimizer = torch.optim.Adam([z_aux, z_rec], lr=lr)
        for _ in range(steps):
            optimizer.zero_grad()
            misfit = (generator(z_aux, z_rec) - target).square().sum((-2, -1))
            loss = (
                0.5 * misfit / noise_sd**2
                + 0.5 * aux_precision * z_aux.square().sum(-1)
                + 0.5 * z_rec.square().sum(-1)
            )
            loss.sum().backward()
            optimizer.step()
        with torch.no_grad():
            residuals.append((target - generator(z_aux, z_rec)).double().cpu().numpy())
        fitted.append(z_aux.detach().double().cpu().numpy())
    z_hat = np.concatenate(fitted)
    residuals = np.concatenate(residuals)
    error = z_hat - aux_std
    return TauCalibration(
        tau=np.sqrt(np.mean(error**2, axis=0)),
        bias=error.mean(axis=0),
        sd=error.std(axis=0),
        z_aux=z_hat,
        aux_standardized=aux_std,
        pixel_rmse=np.sqrt(np.mean(residuals**2, axis=(-2, -1))),
        residuals=residuals,
    )
