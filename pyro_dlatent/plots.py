"""Figures: dataset previews, latent traversals, aux-vs-latent scatter, posterior fields.

Every function returns a matplotlib ``Figure``; :func:`save_figure` writes and closes it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from matplotlib.figure import Figure

from pyro_dlatent.utils import atomic_write

__all__ = [
    "anomaly_gallery",
    "aux_scatter",
    "image_grid",
    "latent_traversal",
    "marginal_posteriors",
    "observed_vs_predicted",
    "posterior_fields",
    "preview",
    "save_figure",
    "training_history",
]


def save_figure(fig: Figure, path: str | os.PathLike, *, dpi: int = 120) -> Path:
    """Save ``fig`` to ``path`` atomically (format from its suffix), return the path."""
    path = Path(path)
    fmt = path.suffix[1:] or None
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=fmt))
    return path


def subplots(*args: Any, figsize: tuple[float, float], **kwargs: Any) -> tuple[Figure, Any]:
    """A new ``Figure`` and its axes (``Figure.subplots`` arguments), without pyplot.

    Figures are made directly, not through ``pyplot``, so importing or drawing never picks or
    changes the user's matplotlib backend and no figure is left open in pyplot's registry.
    """
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def image_grid(
    images: np.ndarray,
    *,
    nrows: int,
    ncols: int,
    titles: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    cmap: str = "viridis",
    shared_scale: bool = True,
    panel_size: float = 1.3,
) -> Figure:
    """A grid of images ``(nrows * ncols, H, W)`` in row-major order.

    Parameters
    ----------
    images : array, shape ``(nrows * ncols, H, W)``
    titles : per-panel titles, optional
    row_labels, col_labels : labels on the left of each row / above each column, optional
    shared_scale : one colour scale for all panels (so brightness is comparable)
    """
    images = np.asarray(images)
    if images.shape[0] != nrows * ncols:
        raise ValueError(
            f"images must hold nrows*ncols={nrows * ncols} images, got {images.shape[0]}"
        )
    fig, axes = subplots(
        nrows, ncols, figsize=(panel_size * ncols, panel_size * nrows), squeeze=False
    )
    vmin, vmax = (
        (np.percentile(images, 0.5), np.percentile(images, 99.5)) if shared_scale else (None, None)
    )
    for k, ax in enumerate(axes.flat):
        ax.imshow(images[k], origin="lower", cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_xticks([])
        ax.set_yticks([])
        if titles is not None:
            ax.set_title(titles[k], fontsize=6)
    if row_labels is not None:
        for r, label in enumerate(row_labels):
            axes[r, 0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    if col_labels is not None:
        for c, label in enumerate(col_labels):
            axes[0, c].set_title(label, fontsize=7)
    fig.tight_layout()
    return fig


def _format_aux(ds: xr.Dataset, index: int) -> str:
    parts = []
    for name in ds.attrs["aux_names"]:
        value = float(ds[name].values[index])
        parts.append(f"{name}={value:.3g}" if np.isfinite(value) else f"{name}=?")
    return "\n".join(parts)


def preview(ds: xr.Dataset, *, num: int = 16, ncols: int = 4, title: str | None = None) -> Figure:
    """First ``num`` images of a dataset with their auxiliary values (physical units) as titles."""
    num = min(num, ds.sizes["sample"])
    ncols = min(ncols, num)
    nrows = int(np.ceil(num / ncols))
    images = ds["image"].values[:num]
    if nrows * ncols > num:
        pad = np.full((nrows * ncols - num, *images.shape[1:]), np.nan)
        images = np.concatenate([images, pad])
    titles = [_format_aux(ds, i) if i < num else "" for i in range(nrows * ncols)]
    fig = image_grid(
        images, nrows=nrows, ncols=ncols, titles=titles, shared_scale=False, panel_size=1.6
    )
    if title:
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
    return fig


def latent_traversal(
    decode,
    z_aux: np.ndarray,
    z_rec: np.ndarray,
    *,
    span: float = 2.5,
    steps: int = 7,
    aux_labels: Sequence[str] | None = None,
    aux_values: np.ndarray | None = None,
    max_residual_rows: int = 6,
) -> Figure:
    """Latent traversal: one row per latent coordinate, the others held at a base code.

    Parameters
    ----------
    decode : callable ``(z_aux (B, k), z_rec (B, r)) -> images (B, H, W)`` on numpy arrays
    z_aux, z_rec : arrays ``(k,)`` and ``(r,)``, the base code (standardized units)
    span : each coordinate moves over ``[-span, span]`` (prior standard deviations)
    steps : number of columns
    aux_labels : names (with units) of the guided coordinates, used as row labels
    aux_values : array ``(k, steps)``, the physical value of each guided row's column, optional;
        written above each panel of that row
    max_residual_rows : at most this many residual rows are shown
    """
    z_aux = np.asarray(z_aux, dtype=np.float64)
    z_rec = np.asarray(z_rec, dtype=np.float64)
    k, r = z_aux.shape[0], min(z_rec.shape[0], max_residual_rows)
    grid = np.linspace(-span, span, steps)
    rows_aux, rows_rec, labels = [], [], []
    for j in range(k + r):
        za = np.repeat(z_aux[None], steps, axis=0)
        zr = np.repeat(z_rec[None], steps, axis=0)
        if j < k:
            za[:, j] = grid
            labels.append(aux_labels[j] if aux_labels is not None else f"z_aux[{j}]")
        else:
            zr[:, j - k] = grid
            labels.append(f"z_rec[{j - k}]")
        rows_aux.append(za)
        rows_rec.append(zr)
    images = np.asarray(decode(np.concatenate(rows_aux), np.concatenate(rows_rec)))
    titles = None
    if aux_values is not None:
        titles = [
            f"{aux_values[j, c]:.3g}" if j < k else "" for j in range(k + r) for c in range(steps)
        ]
    col_labels = None if titles is not None else [f"{g:+.1f}" for g in grid]
    return image_grid(
        images, nrows=k + r, ncols=steps, titles=titles, row_labels=labels, col_labels=col_labels
    )


def aux_scatter(
    latents: np.ndarray,
    aux: np.ndarray,
    *,
    aux_labels: Sequence[str],
    aux_dim: int,
    max_residual: int = 3,
    max_points: int = 2000,
    predicted: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    max_error_bars: int = 150,
) -> Figure:
    """Scatter of each auxiliary (rows) against each guided and a few residual latents (columns).

    Parameters
    ----------
    latents : array ``(n, aux_dim + residual_dim)``, encoded posterior means
    aux : array ``(n, aux_dim)``, auxiliaries in physical units (NaN = missing, skipped)
    aux_labels : names (with units) of the auxiliaries
    predicted : (mean, lower, upper), arrays ``(n, aux_dim)``, optional
        Reported means and interval bounds in physical units: a first column plots the truth
        against the mean with the intervals as error bars on the first ``max_error_bars``
        images, and the diagonal.
    """
    latents = np.asarray(latents)
    aux = np.asarray(aux)
    extra = 0 if predicted is None else 1
    ncols = aux_dim + min(latents.shape[1] - aux_dim, max_residual)
    n = min(latents.shape[0], max_points)
    fig, axes = subplots(
        aux_dim, ncols + extra, figsize=(1.9 * (ncols + extra), 1.8 * aux_dim), squeeze=False
    )
    for i in range(aux_dim):
        if predicted is not None:
            ax = axes[i, 0]
            mean, lower, upper = (np.asarray(a)[:n, i] for a in predicted)
            ok = np.isfinite(aux[:n, i])
            ax.scatter(mean[ok], aux[:n, i][ok], s=2, alpha=0.3, color="C0", rasterized=True)
            bars = np.flatnonzero(ok)[:max_error_bars]
            ax.errorbar(
                mean[bars],
                aux[bars, i],
                xerr=np.stack([mean[bars] - lower[bars], upper[bars] - mean[bars]]),
                fmt="none",
                ecolor="C1",
                elinewidth=0.5,
                alpha=0.6,
            )
            span = [np.nanmin(aux[:n, i]), np.nanmax(aux[:n, i])]
            ax.plot(span, span, color="k", lw=0.6)
            ax.tick_params(labelsize=5)
            ax.set_ylabel(aux_labels[i], fontsize=7)
            if i == aux_dim - 1:
                ax.set_xlabel("predicted, 90% interval", fontsize=7)
        for c in range(ncols):
            ax = axes[i, c + extra]
            ok = np.isfinite(aux[:n, i])
            x, y = latents[:n, c][ok], aux[:n, i][ok]
            ax.scatter(x, y, s=2, alpha=0.4, color="C0" if c == i else "C7", rasterized=True)
            r = np.corrcoef(x, y)[0, 1] if x.size > 2 and x.std() > 0 and y.std() > 0 else np.nan
            ax.text(0.03, 0.9, f"r={r:.2f}", transform=ax.transAxes, fontsize=6)
            ax.tick_params(labelsize=5)
            if i == aux_dim - 1:
                ax.set_xlabel(f"z_aux[{c}]" if c < aux_dim else f"z_rec[{c - aux_dim}]", fontsize=7)
            if c == 0 and predicted is None:
                ax.set_ylabel(aux_labels[i], fontsize=7)
    fig.tight_layout()
    return fig


def calibration_curve(
    levels: Sequence[float], coverage: dict[str, Sequence[float]], *, n: int | None = None
) -> Figure:
    """Empirical against nominal coverage of central intervals, one line per auxiliary.

    Parameters
    ----------
    levels : nominal levels of the intervals
    coverage : auxiliary label -> empirical coverage at each level (NaN = not measured)
    n : number of held-out truths, for the title
    """
    fig, ax = subplots(figsize=(3.4, 3.2))
    ax.plot([0, 1], [0, 1], color="k", lw=0.8, ls="--", label="calibrated")
    for label, values in coverage.items():
        ax.plot(levels, values, marker="o", ms=3, lw=1, label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("nominal coverage", fontsize=8)
    ax.set_ylabel("empirical coverage", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, loc="upper left")
    ax.set_title("interval calibration" + ("" if n is None else f" ({n} held out)"), fontsize=9)
    fig.tight_layout()
    return fig


def posterior_fields(
    truth: np.ndarray | None,
    mean: np.ndarray,
    sd: np.ndarray | None,
    *,
    extent: tuple[float, float, float, float] = (0.0, 1.0, 0.0, 1.0),
    sensors: np.ndarray | None = None,
    title: str | None = None,
) -> Figure:
    """Truth (if known), posterior mean and (if known) posterior sd of a field ``(H, W)``."""
    panels = [("truth", truth), ("posterior mean", mean), ("posterior sd", sd)]
    panels = [(name, field) for name, field in panels if field is not None]
    fig, axes = subplots(1, len(panels), figsize=(3.2 * len(panels), 3.0), squeeze=False)
    value_fields = [np.asarray(f) for n, f in panels if n != "posterior sd"]
    vmin = min(float(f.min()) for f in value_fields)
    vmax = max(float(f.max()) for f in value_fields)
    for ax, (name, field) in zip(axes[0], panels, strict=True):
        kwargs = {"vmin": vmin, "vmax": vmax} if name != "posterior sd" else {"cmap": "magma"}
        im = ax.imshow(np.asarray(field), origin="lower", extent=extent, **kwargs)
        if sensors is not None:
            ax.plot(sensors[:, 0], sensors[:, 1], "w.", ms=3)
        ax.set_title(name, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def observed_vs_predicted(
    observed: np.ndarray, predicted_mean: np.ndarray, predicted_sd: np.ndarray | None = None
) -> Figure:
    """Observed data against posterior-predictive mean (with ±2 sd bars), one point per sensor."""
    observed = np.asarray(observed).ravel()
    predicted_mean = np.asarray(predicted_mean).ravel()
    fig, ax = subplots(figsize=(3.4, 3.2))
    yerr = None if predicted_sd is None else 2 * np.asarray(predicted_sd).ravel()
    ax.errorbar(observed, predicted_mean, yerr=yerr, fmt="o", ms=3, lw=0.8)
    lo, hi = min(observed.min(), predicted_mean.min()), max(observed.max(), predicted_mean.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xlabel("observed")
    ax.set_ylabel("predicted (posterior mean ± 2 sd)")
    fig.tight_layout()
    return fig


def marginal_posteriors(
    draws: np.ndarray,
    *,
    names: Sequence[str],
    truth: np.ndarray | None = None,
    prior_draws: np.ndarray | None = None,
    reference: np.ndarray | None = None,
) -> Figure:
    """Histogram of each named parameter's draws ``(num_draws, k)``, the truth marked.

    ``reference`` (draws ``(n, k)`` of the exact posterior, where one is known) is drawn as a black
    outline over the same bins.
    """
    draws = np.asarray(draws)
    k = draws.shape[1]
    fig, axes = subplots(1, k, figsize=(2.6 * k, 2.3), squeeze=False)
    for j, ax in enumerate(axes[0]):
        if prior_draws is not None:
            ax.hist(prior_draws[:, j], bins=40, density=True, color="C7", alpha=0.4, label="prior")
        _, bins, _ = ax.hist(
            draws[:, j], bins=40, density=True, color="C0", alpha=0.8, label="posterior"
        )
        if reference is not None:
            low = min(bins[0], reference[:, j].min())
            high = max(bins[-1], reference[:, j].max())
            width = bins[1] - bins[0]
            edges = np.arange(low, high + width, width)
            ax.hist(
                reference[:, j],
                bins=edges if len(edges) <= 400 else 40,
                density=True,
                histtype="step",
                color="k",
                lw=1.0,
                label="exact",
            )
        if truth is not None:
            ax.axvline(truth[j], color="C3", lw=1.5, label="truth")
        ax.set_title(names[j], fontsize=9)
        ax.tick_params(labelsize=6)
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    return fig


def training_history(history: Sequence[dict]) -> Figure:
    """Per-epoch curves of a training history: ELBO (train/validation) and each penalty."""
    epochs = [h["epoch"] for h in history]
    panels = [
        ("ELBO per image", ["elbo", "val_elbo"]),
        ("alignment penalty", ["alignment", "val_alignment"]),
        ("decorrelation penalty", ["decorrelation", "val_decorrelation"]),
    ]
    panels = [(t, [k for k in keys if k in history[0]]) for t, keys in panels]
    panels = [(t, keys) for t, keys in panels if keys]
    fig, axes = subplots(1, len(panels), figsize=(3.2 * len(panels), 2.6), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels, strict=True):
        for key in keys:
            values = [np.nan if h.get(key) is None else h[key] for h in history]
            ax.plot(epochs, values, marker=".", label=key)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.legend(fontsize=6)
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    return fig


def anomaly_gallery(
    images: Any,
    table: xr.Dataset,
    *,
    top_k: int = 16,
    ncols: int = 4,
    annotate: Sequence[str] = (),
    cmap: str = "viridis",
    panel_size: float = 1.6,
) -> Figure:
    """Gallery of the ``top_k`` most anomalous images with their scores and p-values.

    Parameters
    ----------
    images : array-like, shape ``(n, H, W)``
        The images the table ranks; ``table["sample"]`` must index their first axis.
    table : xarray.Dataset
        Output of :func:`~pyro_dlatent.anomaly.rank_anomalies` (default ``sample``: row index).
    top_k : int
        Number of panels (at most the table's length).
    ncols : int
        Panels per row.
    annotate : sequence of str
        Further table variables shown in each title (e.g. a known flag, for checking).
    cmap : str
        Colour map; each panel has its own colour scale, so faint structure stays visible.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"expected images of shape (n, H, W), got {images.shape}")
    for key in ("sample", "score", "p_value", *annotate):
        if key not in table:
            raise ValueError(f"table lacks the variable {key!r}; build it with rank_anomalies")
    if isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1:
        raise ValueError(f"expected top_k >= 1 (an int), got {top_k!r}")
    if isinstance(ncols, bool) or int(ncols) != ncols or ncols < 1:
        raise ValueError(f"expected ncols >= 1 (an int), got {ncols!r}")
    k = min(int(top_k), table.sizes["rank"])
    index = table["sample"].values[:k].astype(np.int64)
    if (index < 0).any() or (index >= images.shape[0]).any():
        raise ValueError("table['sample'] does not index images (out of range)")
    ncols = min(int(ncols), k)
    nrows = math.ceil(k / ncols)
    fig, axes = subplots(
        nrows, ncols, figsize=(panel_size * ncols, panel_size * nrows + 0.2), squeeze=False
    )
    for panel, ax in enumerate(axes.ravel()):
        ax.set_axis_off()
        if panel >= k:
            continue
        ax.imshow(images[index[panel]], cmap=cmap, origin="lower")
        score = float(table["score"].values[panel])
        p = float(table["p_value"].values[panel])
        extra = "".join(f"\n{key}={table[key].values[panel]}" for key in annotate)
        ax.set_title(f"#{panel} s={score:.1f}\np={p:.2g}{extra}", fontsize=7)
    fig.suptitle("most anomalous residual blocks", fontsize=9)
    fig.tight_layout()
    return fig
