"""Figures: dataset previews, latent traversals, aux-vs-latent scatter, posterior fields."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

if not os.environ.get("MPLBACKEND"):
    matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import xarray as xr

__all__ = ["image_grid", "preview", "save_figure"]


def save_figure(fig: plt.Figure, path: str | os.PathLike, *, dpi: int = 120) -> Path:
    """Save ``fig`` to ``path`` (format from the suffix) and close it; returns the path."""
    path = Path(path)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


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
) -> plt.Figure:
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
        raise ValueError(f"images must hold nrows*ncols={nrows * ncols} images, got {images.shape[0]}")
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(panel_size * ncols, panel_size * nrows), squeeze=False
    )
    vmin, vmax = (np.percentile(images, 0.5), np.percentile(images, 99.5)) if shared_scale else (None, None)
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


def preview(ds: xr.Dataset, *, num: int = 16, ncols: int = 4, title: str | None = None) -> plt.Figure:
    """First ``num`` images of a dataset with their auxiliary values (physical units) as titles."""
    num = min(num, ds.sizes["sample"])
    ncols = min(ncols, num)
    nrows = int(np.ceil(num / ncols))
    images = ds["image"].values[:num]
    if nrows * ncols > num:
        pad = np.full((nrows * ncols - num, *images.shape[1:]), np.nan)
        images = np.concatenate([images, pad])
    titles = [_format_aux(ds, i) if i < num else "" for i in range(nrows * ncols)]
    fig = image_grid(images, nrows=nrows, ncols=ncols, titles=titles, shared_scale=False, panel_size=1.6)
    if title:
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
    return fig
