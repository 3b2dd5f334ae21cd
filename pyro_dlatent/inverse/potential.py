"""A model's posterior as one flat potential: what NUTS and the Laplace approximation work on."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer.autoguide.initialization import init_to_sample
from pyro.infer.mcmc.util import initialize_model
from pyro.poutine.messenger import Messenger

__all__ = ["LatentPotential"]


class _LogJoint(Messenger):
    """Sum ``log_prob`` of every non-deterministic sample site, without recording a trace."""

    def __init__(self) -> None:
        super().__init__()
        self.total: torch.Tensor | float = 0.0

    def _postprocess_message(self, msg: dict) -> None:
        if msg["type"] != "sample" or msg["infer"].get("_deterministic", False):
            return
        log_prob = msg["fn"].log_prob(msg["value"])
        self.total = self.total + scale_and_mask(log_prob, msg["scale"], msg["mask"]).sum()


def _is_identity(transform: torch.distributions.Transform) -> bool:
    """Whether a (possibly inverted, possibly independent) transform is the identity map."""
    while True:
        if isinstance(transform, torch.distributions.transforms._InverseTransform):
            transform = transform.inv
        elif isinstance(transform, torch.distributions.transforms.IndependentTransform):
            transform = transform.base_transform
        else:
            break
    return isinstance(transform, torch.distributions.transforms.ComposeTransform) and not (
        transform.parts
    )


class LatentPotential:
    """Potential energy of a model over one packed, unconstrained latent vector.

    The latent sites ``x_s`` (constrained) are mapped to unconstrained ``y_s = T_s(x_s)`` by
    the bijections Pyro's :func:`~pyro.infer.mcmc.util.initialize_model` chooses, flattened and
    concatenated into ``theta`` of length ``dim``:

    .. math:: U(\\theta) = -\\log p(d, x(\\theta)) - \\sum_s \\log
              \\Big|\\det \\frac{\\partial x_s}{\\partial y_s}\\Big|.

    The log joint comes from ``model.log_joint(values)`` when the model has one (the
    :class:`~pyro_dlatent.inverse.prior.InverseProblemModel` fast path: plain tensor algebra,
    tested equal to the trace's log density) and ``fast`` is true. Otherwise it is accumulated
    by a small messenger while the model runs under ``poutine.condition`` (no trace is built),
    with ``poutine.block`` keeping the model's sites from outer handlers. NUTS sees one site
    ``"theta"``, which keeps its per-leapfrog bookkeeping minimal.

    Parameters
    ----------
    model : callable
        A Pyro model without arguments.
    transforms : mapping of str to Transform
        Constrained-to-unconstrained bijection of each latent site.
    shapes : mapping of str to torch.Size
        Unconstrained shape of each latent site, in packing order.
    fast : bool
        Use ``model.log_joint`` when available.
    jit_compile : bool
        Trace :meth:`log_density` with ``torch.jit.trace``. Custom ``autograd.Function``
        solves (like the FEM ones) stay Python calls inside the trace, but any value that
        leaves torch outside them (numpy, ``.item()``) would be frozen into a constant, so the
        trace is checked against the eager function, value and gradient, at a second point;
        a mismatch raises.
    """

    site = "theta"
    """Name of the packed site NUTS sees."""

    def __init__(
        self,
        model: Any,
        transforms: Mapping[str, torch.distributions.Transform],
        shapes: Mapping[str, torch.Size],
        *,
        fast: bool = True,
        jit_compile: bool = False,
    ) -> None:
        if set(transforms) != set(shapes):
            raise ValueError("transforms and shapes must name the same sites")
        self.model = model
        log_joint = getattr(model, "log_joint", None)
        self.fast = bool(fast) and callable(log_joint)
        self.transforms = dict(transforms)
        self.shapes = {k: torch.Size(v) for k, v in shapes.items()}
        self.sizes = {k: int(math.prod(v)) for k, v in self.shapes.items()}
        self.dim = sum(self.sizes.values())
        self._identity = {k: _is_identity(t) for k, t in self.transforms.items()}
        self._compiled: Any = None
        self.jit_compile = bool(jit_compile)

    @classmethod
    def from_model(
        cls,
        model: Any,
        *,
        num_chains: int = 1,
        init_strategy: Any = init_to_sample,
        fast: bool = True,
        jit_compile: bool = False,
    ) -> tuple[LatentPotential, torch.Tensor]:
        """Build the potential and initial points from a model.

        Returns
        -------
        potential : LatentPotential
        initial : Tensor, shape ``(num_chains, dim)``
            Unconstrained starting points, one per chain (drawn by ``init_strategy``; the
            default draws each chain's start from the prior).
        """
        init, _, transforms, trace = initialize_model(
            model, init_strategy=init_strategy, num_chains=num_chains
        )
        names = [
            name
            for name, site in trace.iter_stochastic_nodes()
            if not site["infer"].get("_deterministic", False)
        ]
        if num_chains == 1:
            init = {k: v.unsqueeze(0) for k, v in init.items()}
        shapes = {k: init[k].shape[1:] for k in names}
        potential = cls(model, {k: transforms[k] for k in names}, shapes, fast=fast)
        initial = potential.pack({k: init[k] for k in names})
        if jit_compile:
            potential.compile(initial[0])
        return potential, initial

    def pack(self, unconstrained: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate per-site unconstrained values ``(*batch, *shape)`` into ``(*batch, dim)``."""
        parts = []
        for name, shape in self.shapes.items():
            value = unconstrained[name]
            batch = value.shape[: value.dim() - len(shape)]
            parts.append(value.reshape(*batch, self.sizes[name]))
        return torch.cat(parts, dim=-1)

    def unpack(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split ``theta (*batch, dim)`` into unconstrained per-site values."""
        out = {}
        start = 0
        for name, shape in self.shapes.items():
            stop = start + self.sizes[name]
            out[name] = theta[..., start:stop].reshape(*theta.shape[:-1], *shape)
            start = stop
        return out

    def constrain(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Constrained latent values ``{site: (*batch, *event)}`` of ``theta (*batch, dim)``."""
        return {k: self.transforms[k].inv(v) for k, v in self.unpack(theta).items()}

    def log_density(self, theta: torch.Tensor) -> torch.Tensor:
        """Log joint plus log-Jacobian at one unconstrained point ``theta (dim,)``; a scalar."""
        constrained = {}
        log_jacobian = 0.0
        for name, value in self.unpack(theta).items():
            if self._identity[name]:
                constrained[name] = value
                continue
            transform = self.transforms[name]
            x = transform.inv(value)
            constrained[name] = x
            log_jacobian = log_jacobian - transform.log_abs_det_jacobian(x, value).sum()
        if self.fast:
            return self.model.log_joint(constrained) + log_jacobian
        log_joint = _LogJoint()
        with poutine.block(), poutine.condition(data=constrained), log_joint:
            self.model()
        return log_joint.total + log_jacobian

    def compile(self, example: torch.Tensor) -> None:
        """Trace :meth:`log_density` at ``example (dim,)`` and use the trace from now on.

        Raises
        ------
        RuntimeError
            When the trace disagrees with the eager function at a perturbed point (value or
            gradient), e.g. because the model computes a value outside torch's autograd.
        """
        example = example.detach()
        probe = example + 0.1 * torch.linspace(-1.0, 1.0, example.numel()).to(example)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(self.log_density, (example,), check_trace=False)
        values, grads = [], []
        for fn in (self.log_density, traced):
            point = probe.clone().requires_grad_(True)
            value = fn(point)
            (grad,) = torch.autograd.grad(value, point)
            values.append(value.detach())
            grads.append(grad)
        scale = 1e-4 if example.dtype == torch.float32 else 1e-9
        if not (
            torch.allclose(values[0], values[1], rtol=scale, atol=scale)
            and torch.allclose(grads[0], grads[1], rtol=scale * 10, atol=scale * 10)
        ):
            raise RuntimeError(
                "jit_compile: the traced potential disagrees with the model (does the model "
                "compute a value outside torch, e.g. with numpy or .item()?); run without "
                "jit_compile"
            )
        self._compiled = traced

    def energy(self, theta: torch.Tensor) -> torch.Tensor:
        """Potential energy ``U(theta) = -log_density(theta)`` of a flat ``theta (dim,)``.

        Uses the traced function after :meth:`compile`.
        """
        if self._compiled is not None:
            return -self._compiled(theta)
        return -self.log_density(theta)

    def __call__(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Potential energy ``-log_density(params["theta"])`` (the ``potential_fn`` of NUTS)."""
        return self.energy(params[self.site])
