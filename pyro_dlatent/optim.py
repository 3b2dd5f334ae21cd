"""The optimizer and the weight average of a fit.

:class:`ForeachClippedAdam` is Pyro's :class:`~pyro.optim.clipped_adam.ClippedAdam` update
(Adam with a per-step learning-rate decay and gradient clipping) applied to all parameters at
once with :func:`torch._foreach` kernels, one fused update instead of one optimizer per
parameter. :class:`WeightAverage` keeps an exponential moving average of the weights
(:class:`torch.optim.swa_utils.AveragedModel`) that the fit ends on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import pyro
import torch
from pyro.optim import PyroOptim
from pyro.optim.clipped_adam import ClippedAdam
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

if TYPE_CHECKING:
    from pyro_dlatent.models.base import GuidedLatentModel

__all__ = ["ForeachClippedAdam", "WeightAverage"]


class _AdamSlot:
    """ClippedAdam state of one parameter: its own learning rate, step count and moments.

    ``hyper`` is ``(beta1, beta2, eps, clip_norm, lrd)``; parameters sharing it update together.
    """

    __slots__ = ("exp_avg", "exp_avg_sq", "hyper", "lr", "step")

    def __init__(self, hyper: tuple[float, float, float, float, float], lr: float) -> None:
        self.hyper = hyper
        self.lr = lr
        self.step = 0
        self.exp_avg: torch.Tensor | None = None
        self.exp_avg_sq: torch.Tensor | None = None


class ForeachClippedAdam(PyroOptim):
    """Pyro's ``ClippedAdam`` rule applied to all parameters at once with ``torch._foreach_*``.

    :class:`pyro.optim.ClippedAdam` keeps one torch optimizer per parameter tensor, so a step
    costs one ``Optimizer.step`` (and its Python overhead) per tensor. This applies the same
    update, operation for operation, to every parameter of a step together. For a parameter
    :math:`\\theta` with gradient :math:`g`, learning rate :math:`\\eta` and step count
    :math:`t` (counting the steps where it had a gradient):

    .. math::

        \\eta &\\leftarrow \\eta \\cdot \\mathrm{lrd} \\quad \\text{(every step it is seen)}, \\\\
        g &\\leftarrow \\mathrm{clamp}(g, -c, c), \\\\
        m &\\leftarrow \\beta_1 m + (1 - \\beta_1) g, \\qquad
        v \\leftarrow \\beta_2 v + (1 - \\beta_2) g^2, \\\\
        \\theta &\\leftarrow \\theta - \\eta \\frac{\\sqrt{1 - \\beta_2^t}}{1 - \\beta_1^t}
            \\frac{m}{\\sqrt v + \\epsilon},

    with ``c = clip_norm`` (the gradient is clamped in place, as ClippedAdam does). On the CPU
    ``torch._foreach_*`` runs the very kernels of the per-tensor code, so the parameters are
    bit-identical to ``ClippedAdam``'s; fused CUDA kernels may round differently in the last
    bit. State is kept per parameter and saved (:meth:`get_state`) in the format of
    ``ClippedAdam``'s per-parameter torch optimizers, so either optimizer resumes the other's
    checkpoints.

    Parameters
    ----------
    lr : float
        Initial learning rate.
    lrd : float
        Factor applied to a parameter's learning rate at every step.
    clip_norm : float
        Bound of the elementwise gradient clamp (``math.inf``: off).
    betas : (float, float)
    eps : float
    """

    def __init__(
        self,
        *,
        lr: float,
        lrd: float = 1.0,
        clip_norm: float = 10.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        args = {"lr": lr, "lrd": lrd, "clip_norm": clip_norm, "betas": betas, "eps": eps}
        super().__init__(ClippedAdam, args)
        self._hyper = (float(betas[0]), float(betas[1]), float(eps), float(clip_norm), float(lrd))
        self._lr = float(lr)
        self.slots: dict[torch.Tensor, _AdamSlot] = {}

    def __call__(self, params: Iterable[torch.Tensor], *args: Any, **kwargs: Any) -> None:
        """One ClippedAdam step of every parameter in ``params`` that has a gradient.

        As in ``ClippedAdam``, every parameter passed has its learning rate decayed, while only
        those with a gradient count a step and move.
        """
        groups: dict[tuple[float, ...], list[tuple[torch.Tensor, _AdamSlot]]] = {}
        for p in params:
            slot = self.slots.get(p)
            if slot is None:
                slot = self.slots[p] = self._new_slot(p)
            slot.lr *= slot.hyper[4]
            if p.grad is None:
                continue
            if slot.exp_avg is None:
                slot.exp_avg = torch.zeros_like(p.grad)
                slot.exp_avg_sq = torch.zeros_like(p.grad)
            slot.step += 1
            groups.setdefault(slot.hyper, []).append((p, slot))
        with torch.no_grad():
            for (beta1, beta2, eps, clip, _), members in groups.items():
                params_ = [p for p, _ in members]
                grads = [p.grad for p, _ in members]
                exp_avg = [slot.exp_avg for _, slot in members]
                exp_avg_sq = [slot.exp_avg_sq for _, slot in members]
                torch._foreach_clamp_min_(grads, -clip)
                torch._foreach_clamp_max_(grads, clip)
                torch._foreach_mul_(exp_avg, beta1)
                torch._foreach_add_(exp_avg, grads, alpha=1 - beta1)
                torch._foreach_mul_(exp_avg_sq, beta2)
                torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)
                denom = torch._foreach_sqrt(exp_avg_sq)
                torch._foreach_add_(denom, eps)
                steps = [
                    -(slot.lr * math.sqrt(1 - beta2**slot.step) / (1 - beta1**slot.step))
                    for _, slot in members
                ]
                torch._foreach_addcdiv_(params_, exp_avg, denom, steps)

    def _new_slot(self, p: torch.Tensor) -> _AdamSlot:
        name = pyro.get_param_store().param_name(p)
        saved = self._state_waiting_to_be_consumed.pop(name, None)
        if saved is None:
            return _AdamSlot(self._hyper, self._lr)
        slot = _AdamSlot(saved.hyper, saved.lr)
        slot.step = saved.step
        if saved.exp_avg is not None:
            slot.exp_avg = saved.exp_avg.to(device=p.device, dtype=p.dtype)
            slot.exp_avg_sq = saved.exp_avg_sq.to(device=p.device, dtype=p.dtype)
        return slot

    @staticmethod
    def _state_dict(slot: _AdamSlot) -> dict[str, Any]:
        beta1, beta2, eps, clip, lrd = slot.hyper
        group = {
            "lr": slot.lr,
            "betas": (beta1, beta2),
            "eps": eps,
            "weight_decay": 0,
            "clip_norm": clip,
            "lrd": lrd,
            "centered_variance": False,
            "params": [0],
        }
        state = {}
        if slot.exp_avg is not None:
            state[0] = {"step": slot.step, "exp_avg": slot.exp_avg, "exp_avg_sq": slot.exp_avg_sq}
        return {"state": state, "param_groups": [group]}

    @staticmethod
    def _from_state_dict(name: str, saved: Any) -> _AdamSlot:
        try:
            (group,) = saved["param_groups"]
            hyper = (
                float(group["betas"][0]),
                float(group["betas"][1]),
                float(group["eps"]),
                float(group["clip_norm"]),
                float(group["lrd"]),
            )
            if group.get("weight_decay", 0) != 0 or group.get("centered_variance", False):
                raise ValueError("weight_decay and centered_variance are not supported")
            slot = _AdamSlot(hyper, float(group["lr"]))
            entry = saved["state"].get(group["params"][0], {})
            if entry:
                slot.step = int(entry["step"])
                slot.exp_avg = torch.as_tensor(entry["exp_avg"])
                slot.exp_avg_sq = torch.as_tensor(entry["exp_avg_sq"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"invalid ClippedAdam state for parameter {name!r}: {err}") from err
        return slot

    def param_states(self) -> dict[torch.Tensor, dict[str, Any]]:
        """Per-parameter ``ClippedAdam`` state dicts keyed by the (unconstrained) tensor."""
        return {p: self._state_dict(slot) for p, slot in self.slots.items()}

    def get_state(self) -> dict[str, Any]:
        """Per-parameter ``ClippedAdam`` state dicts keyed by param-store name."""
        store = pyro.get_param_store()
        return {store.param_name(p): self._state_dict(slot) for p, slot in self.slots.items()}

    def set_state(self, state_dict: Mapping[str, Any]) -> None:
        """Queue saved states (as from :meth:`get_state`) for the parameters first seen later."""
        self._state_waiting_to_be_consumed.update(
            {name: self._from_state_dict(name, saved) for name, saved in state_dict.items()}
        )


class WeightAverage:
    """Exponential moving average of a model's network weights over optimizer steps.

    A :class:`torch.optim.swa_utils.AveragedModel` of the networks named in
    :attr:`GuidedLatentModel._networks` (parameters only; buffers follow the live ones). The
    two weight sets trade places with :meth:`swap`: :attr:`applied` says whether the networks
    currently hold the average (and the averager the live weights).
    """

    def __init__(self, model: GuidedLatentModel, decay: float) -> None:
        self.networks = torch.nn.ModuleDict(
            {name: getattr(model, name) for name in model._networks}
        )
        self.average = AveragedModel(self.networks, multi_avg_fn=get_ema_multi_avg_fn(decay))
        self.decay = decay
        self.applied = False
        self.generation: dict[str, torch.Tensor] | None = None  # the live weights' map, at the end
        self.uncertainty: dict[str, torch.Tensor] | None = None  # and their aux calibration

    def update(self) -> None:
        """Fold the live weights into the average (the first call copies them)."""
        if self.applied:
            raise RuntimeError("the averaged weights are applied; swap them out before updating")
        self.average.update_parameters(self.networks)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the networks' weights with the averager's."""
        pairs = list(zip(self.networks.parameters(), self.average.module.parameters(), strict=True))
        for mine, theirs in pairs:
            held = mine.detach().clone()
            mine.copy_(theirs)
            theirs.copy_(held)
        self.applied = not self.applied

    def state(self) -> dict[str, Any]:
        """The weights the networks do not hold, the step count and the decay.

        Once the fit has ended (the average applied) it also holds ``generation``, the live
        weights' own generation map, when the fit calibrated one, and ``uncertainty``, their own
        :class:`~pyro_dlatent.calibration.AuxCalibration` buffers.
        """
        state = {
            "decay": self.decay,
            "updates": self.average.n_averaged.detach().clone(),
            "applied": self.applied,
            "weights": {k: v.detach().clone() for k, v in self.average.module.named_parameters()},
        }
        if self.applied and self.generation is not None:
            state["generation"] = {k: v.detach().clone() for k, v in self.generation.items()}
        if self.applied and self.uncertainty is not None:
            state["uncertainty"] = {k: v.detach().clone() for k, v in self.uncertainty.items()}
        return state

    @torch.no_grad()
    def restore(self, state: Any, what: str) -> None:
        """Load :meth:`state` output written by a run with the same decay and networks."""
        if not isinstance(state, dict) or not isinstance(state.get("weights"), dict):
            raise ValueError(f"{what} holds no averaged weights")
        if state.get("decay") != self.decay:
            raise ValueError(
                f"{what} averaged its weights with decay {state.get('decay')!r}, not {self.decay!r}"
            )
        names = dict(self.average.module.named_parameters())
        weights = state["weights"]
        if set(weights) != set(names):
            raise ValueError(f"{what} holds averaged weights of other networks")
        for name, value in weights.items():
            if not isinstance(value, torch.Tensor) or value.shape != names[name].shape:
                raise ValueError(f"{what} holds averaged weights of other networks")
            names[name].copy_(value)
        self.average.n_averaged.copy_(torch.as_tensor(state.get("updates", 0)))
        self.applied = bool(state.get("applied", False))
        if self.applied:  # a finished fit: the networks hold the average, the file the live weights
            self.swap()
