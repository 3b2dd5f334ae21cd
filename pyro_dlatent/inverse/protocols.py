"""What the inverse-problem code needs of a forward problem, a generator and a field prior.

Structural types (:class:`typing.Protocol`): any object with these members works, the package's
own classes (:class:`~pyro_dlatent.inverse.fem.SourceProblem`, ``AuxVAE.generator()``,
:class:`~pyro_dlatent.inverse.prior.DeepPrior`) and a user's. :func:`require` checks one at
the door and names what is missing.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

__all__ = [
    "FieldPrior",
    "ForwardProblem",
    "Generator",
    "LinearProblem",
    "ProtocolError",
    "members",
    "require",
]


@runtime_checkable
class ForwardProblem(Protocol):
    """``forward(field (batch, H, W)) -> (batch, num_sensors)`` with its noise."""

    num_sensors: int
    noise_sd: Any  # float or (num_sensors,)

    def forward(self, field: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class LinearProblem(ForwardProblem, Protocol):
    """A forward problem that is a matrix ``A`` on the nodal field (``d = A f + e``)."""

    size: int
    sensor_operator: Any  # (num_sensors, size**2)


@runtime_checkable
class Generator(Protocol):
    """A frozen ``G(z_aux, z_rec) -> (batch, H, W)`` with the scaler of its auxiliaries."""

    aux_dim: int
    residual_dim: int
    image_size: int
    scaler: Any  # a fitted AuxScaler

    def __call__(self, z_aux: torch.Tensor, z_rec: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class FieldPrior(Protocol):
    """A Pyro module whose call emits the field site; ``arviz_metadata`` names its sites."""

    field_shape: tuple[int, int]

    def __call__(self) -> torch.Tensor: ...

    def arviz_metadata(self) -> dict[str, Any]: ...


class ProtocolError(TypeError, ValueError):
    """An argument lacks what its protocol asks for (a ``TypeError``; also a ``ValueError``, as
    the attribute checks it replaced raised)."""


def members(protocol: type) -> list[str]:
    """The attributes and methods a protocol asks for."""
    names: set[str] = set()
    for klass in protocol.__mro__:
        if klass in (object, Protocol) or not getattr(klass, "_is_protocol", False):
            continue
        names |= set(getattr(klass, "__annotations__", {}))
        names |= {k for k, v in vars(klass).items() if callable(v) and not k.startswith("_")}
        if "__call__" in vars(klass):
            names.add("__call__")
    return sorted(names)


def require(obj: Any, protocol: type, name: str) -> Any:
    """``obj`` if it has every member of ``protocol``, else a :class:`ProtocolError` naming the
    missing ones."""
    if isinstance(obj, protocol):
        return obj
    missing = [m for m in members(protocol) if not hasattr(obj, m)]
    raise ProtocolError(
        f"{name} is not a {protocol.__name__} ({type(obj).__name__} lacks {missing}); "
        f"see pyro_dlatent.inverse.protocols.{protocol.__name__}"
    )
