"""Data-parallel fits on :mod:`torch.distributed`: the process group and the loss DDP wraps."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from pyro.infer import Trace_ELBO

if TYPE_CHECKING:
    from pyro_dlatent.models.base import GuidedLatentModel

__all__ = ["ELBOLoss", "World"]


class ELBOLoss(torch.nn.Module):
    """A model's ``Trace_ELBO`` loss as a module, what ``DistributedDataParallel`` wraps.

    Pyro's :class:`~pyro.infer.elbo.ELBOModule` for a model and guide that are methods of one
    :class:`~pyro.nn.PyroModule`: its parameters are the model's.
    """

    def __init__(self, model: GuidedLatentModel, elbo: Trace_ELBO) -> None:
        super().__init__()
        self.net = model
        self.elbo = elbo

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        try:
            return self.elbo.differentiable_loss(self.net.model, self.net.guide, *args, **kwargs)
        except ValueError as err:
            # A NaN/inf distribution parameter (Pyro's validation): this process's step
            # diverged. A NaN loss reaching every parameter carries that to the others through
            # the averaged gradients, so that all refuse the step instead of waiting for this
            # one's gradients.
            if "invalid values" not in str(err):
                raise
            trained = [p.sum() for p in self.parameters() if p.requires_grad]
            return torch.stack(trained).sum() * math.nan


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place in an initialized :mod:`torch.distributed` process group."""

    rank: int
    size: int

    @classmethod
    def current(cls) -> World | None:
        """The process group's rank and size, or ``None`` outside a process group."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        return cls(dist.get_rank(), dist.get_world_size())

    def check_same(self, values: dict[str, Any]) -> None:
        """Raise on every process unless all hold equal ``values`` (a fit's inputs)."""
        gathered: list[Any] = [None] * self.size
        dist.all_gather_object(gathered, values)
        for rank, theirs in enumerate(gathered):
            differ = [key for key in values if theirs[key] != values[key]]
            if differ:
                raise ValueError(
                    f"data-parallel fit: process {rank} has another {', '.join(differ)} than "
                    f"process {self.rank}; every process must fit the same model config on the "
                    "same dataset with the same settings and resume checkpoint"
                )

    def from_lead(self, value: Any) -> Any:
        """Process 0's ``value`` (a picklable object), on every process."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @torch.no_grad()
    def share_state(self, module: torch.nn.Module) -> None:
        """Overwrite ``module``'s parameters and buffers with process 0's."""
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)
