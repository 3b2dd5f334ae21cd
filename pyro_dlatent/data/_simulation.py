"""A simulated dataset before its images exist: per-sample variables and image blocks."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr

from pyro_dlatent.data.io import from_arrays

__all__ = ["Simulation"]


@dataclass
class Simulation:
    """What a simulator draws, with its images still to be rendered block by block.

    A simulator draws every per-sample variable first (a few numbers per sample) and then renders
    the images in blocks of its own size, continuing one random stream; ``blocks`` is that
    rendering, so consuming it in order gives the same images however they are then grouped.

    Attributes
    ----------
    num : int
        Number of samples.
    blocks : iterator of numpy.ndarray, each shape ``(count, height, width)``, float32
        Consecutive image blocks covering samples ``0 .. num - 1``; one pass only.
    aux, extra : mapping of str to numpy.ndarray, leading dimension ``num``
        Auxiliaries and other per-sample variables (see :func:`~pyro_dlatent.data.from_arrays`).
    units, transforms, attrs : mapping
        As in :func:`~pyro_dlatent.data.from_arrays`.
    decorate : callable
        Adds coordinates and variable attributes to a dataset built from a run of samples.
    """

    num: int
    blocks: Iterator[np.ndarray]
    aux: Mapping[str, np.ndarray]
    units: Mapping[str, str]
    attrs: Mapping[str, Any]
    decorate: Callable[[xr.Dataset], xr.Dataset]
    transforms: Mapping[str, str] = field(default_factory=dict)
    extra: Mapping[str, np.ndarray] = field(default_factory=dict)

    def part(self, images: np.ndarray, start: int) -> xr.Dataset:
        """The dataset of samples ``start .. start + len(images) - 1``, given their images."""
        run = slice(start, start + len(images))
        ds = from_arrays(
            images,
            {name: values[run] for name, values in self.aux.items()},
            units=self.units,
            transforms=self.transforms,
            extra={name: values[run] for name, values in self.extra.items()},
            attrs=self.attrs,
        )
        return self.decorate(ds)

    def dataset(self) -> xr.Dataset:
        """The whole dataset in memory."""
        images = None
        start = 0
        for block in self.blocks:
            if images is None:
                images = np.empty((self.num, *block.shape[1:]), dtype=np.float32)
            images[start : start + len(block)] = block
            start += len(block)
        if start != self.num:
            raise RuntimeError(f"the simulator rendered {start} images, expected {self.num}")
        return self.part(images, 0)

    def chunks(self, chunk_size: int) -> Iterator[xr.Dataset]:
        """The dataset as consecutive parts of ``chunk_size`` samples (the last may be shorter).

        Holds at most one part and one block of images at a time.
        """
        pending: list[np.ndarray] = []
        held = 0
        start = 0
        for block in self.blocks:
            pending.append(block)
            held += len(block)
            while held >= chunk_size:
                images = pending[0] if len(pending) == 1 else np.concatenate(pending)
                yield self.part(images[:chunk_size], start)
                start += chunk_size
                rest = images[chunk_size:]
                pending = [rest] if len(rest) else []
                held = len(rest)
        if held:
            yield self.part(np.concatenate(pending), start)
            start += held
        if start != self.num:
            raise RuntimeError(f"the simulator rendered {start} images, expected {self.num}")
