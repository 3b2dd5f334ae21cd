"""Pyro's NUTS with a lean single-site trajectory and per-draw statistics: the one place that
reaches into Pyro's private NUTS internals.

:class:`_RecordingNUTS` overrides ``NUTS._sample_r``, ``_is_turning``, ``_build_basetree`` and
``_build_tree`` and builds Pyro's private ``_TreeInfo``; it uses ``_logaddexp`` and the
integrator's ``_EXCEPTION_HANDLERS``. :data:`PYRO_INTERNALS` lists what it relies on and
:func:`check_pyro_internals` checks it against the installed Pyro (a test runs it, so a Pyro
upgrade that moves them fails loudly there, not as a wrong draw).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch
from pyro.infer import NUTS
from pyro.infer.mcmc.nuts import _logaddexp, _TreeInfo
from pyro.ops.integrator import _EXCEPTION_HANDLERS

__all__ = ["PYRO_INTERNALS", "SAMPLE_STATS", "check_pyro_internals"]

PYRO_INTERNALS = {
    "_sample_r": ["self", "name"],
    "_is_turning": ["self", "r_left_unscaled", "r_right_unscaled", "r_sum"],
    "_build_basetree": ["self", "z", "r", "z_grads", "log_slice", "direction", "energy_current"],
    "_build_tree": [
        "self", "z", "r", "z_grads", "log_slice", "direction", "tree_depth", "energy_current"
    ],
}  # fmt: skip
"""The private ``NUTS`` methods :class:`_RecordingNUTS` overrides, with their parameters."""

_TREE_FIELDS = (
    "z_left", "r_left", "r_left_unscaled", "z_left_grads",
    "z_right", "r_right", "r_right_unscaled", "z_right_grads",
    "z_proposal", "z_proposal_pe", "z_proposal_grads",
    "r_sum", "weight", "turning", "diverging", "sum_accept_probs", "num_proposals",
)  # fmt: skip


def check_pyro_internals() -> None:
    """Raise ``RuntimeError`` naming what changed when Pyro's NUTS internals are not as used."""
    problems = []
    for name, params in PYRO_INTERNALS.items():
        method = getattr(NUTS, name, None)
        if method is None:
            problems.append(f"NUTS.{name} is gone")
        elif list(inspect.signature(method).parameters) != params:
            problems.append(f"NUTS.{name}{inspect.signature(method)} is not ({', '.join(params)})")
    if tuple(getattr(_TreeInfo, "_fields", ())) != _TREE_FIELDS:
        problems.append(f"_TreeInfo fields are {getattr(_TreeInfo, '_fields', None)}")
    if problems:
        raise RuntimeError(
            "pyro_dlatent's NUTS kernel relies on Pyro internals that changed: "
            + "; ".join(problems)
        )


class _CountingPotential:
    """Wrap a :class:`LatentPotential` and count its evaluations (one per leapfrog step).

    Any potential with a ``site`` name and a flat ``energy(theta)`` works (the benchmarks
    wrap a quadratic one).
    """

    def __init__(self, potential: Any) -> None:
        self.potential = potential
        self.site = potential.site
        self.calls = 0

    def __call__(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self.calls += 1
        return self.potential(params)

    def energy_and_grad(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Potential ``U(theta)`` (detached) and its gradient, for a flat ``theta (dim,)``.

        What :func:`pyro.ops.integrator.potential_grad` computes, without its dict packing;
        exceptions that Pyro's registered handlers accept (e.g. a singular matrix) give a
        NaN energy and zero gradient, as there.
        """
        self.calls += 1
        theta.requires_grad_(True)
        try:
            energy = self.potential.energy(theta)
        except Exception as err:
            if any(handler(err) for handler in _EXCEPTION_HANDLERS.values()):
                theta.requires_grad_(False)
                return theta.new_tensor(float("nan")), theta.new_zeros(theta.shape)
            raise
        (grad,) = torch.autograd.grad(energy, theta)
        theta.requires_grad_(False)
        return energy.detach(), grad


def _matvec(matrix: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """Diagonal (1-d ``matrix``) or dense matrix-vector product, as Pyro's mass matrix does it."""
    return matrix.mul(vector) if matrix.dim() == 1 else matrix.matmul(vector)


SAMPLE_STATS = (
    "diverging",
    "step_size",
    "tree_depth",
    "n_steps",
    "energy",
    "acceptance_rate",
    "lp",
)
"""Per-draw NUTS statistics recorded into ``sample_stats`` (ArviZ names)."""


class _RecordingNUTS(NUTS):
    """Pyro's NUTS over one flat site, with a lean trajectory and per-draw statistics.

    The kernel is Pyro's :class:`~pyro.infer.NUTS` (step-size and mass-matrix adaptation,
    multinomial or slice sampling, the transition loop of ``sample``). For a single packed site
    ``theta (dim,)`` (what :class:`LatentPotential` gives) the trajectory is built without
    Pyro's per-leapfrog dict handling: one leapfrog step is

    .. math:: r \\leftarrow r - \\tfrac{\\epsilon}{2} \\nabla U(\\theta), \\quad
              \\theta \\leftarrow \\theta + \\epsilon M^{-1} r, \\quad
              r \\leftarrow r - \\tfrac{\\epsilon}{2} \\nabla U(\\theta),

    on tensors ``(dim,)`` with the adapted (diagonal ``(dim,)`` or dense ``(dim, dim)``)
    inverse mass ``M^{-1}``, the gradient from :meth:`LatentPotential.energy` directly, and
    the subtree's proposal choice drawn with the same Bernoulli draw Pyro makes (so a run
    draws exactly what :class:`~pyro.infer.NUTS` draws with the same seed; tested).

    After each post-warmup transition it stores

    - ``diverging``: the transition was flagged divergent by Pyro;
    - ``step_size``: the adapted step size;
    - ``tree_depth``: number of successful trajectory doublings (Pyro's tree depth);
    - ``n_steps``: leapfrog steps, i.e. potential-gradient evaluations, of the transition;
    - ``energy``: the Hamiltonian ``U(theta) + |r|^2 / 2`` at the start of the transition, just
      after the momentum ``r`` is resampled (what E-BFMI needs);
    - ``acceptance_rate``: the transition's mean Metropolis acceptance probability over the
      trajectory, recovered exactly from Pyro's running mean;
    - ``lp``: log density of the draw in the unconstrained space (``-U``).

    The statistics travel back with ``diagnostics()``, so they survive chains run in worker
    processes.
    """

    def setup(self, warmup_steps: int, *args: Any, **kwargs: Any) -> None:
        if not isinstance(self.potential_fn, _CountingPotential):
            if not callable(getattr(self.potential_fn, "energy", None)):
                raise TypeError(
                    "_RecordingNUTS needs a potential with a flat energy(theta) and a site "
                    "name, like LatentPotential"
                )
            self.potential_fn = _CountingPotential(self.potential_fn)
        self._draw_stats = {name: [] for name in SAMPLE_STATS}
        self._momentum_sq = math.nan
        self._doublings = 0
        self._block = (self.potential_fn.site,)
        super().setup(warmup_steps, *args, **kwargs)
        if list(self.mass_matrix_adapter.mass_matrix_size) != [self._block]:
            raise ValueError(f"expected the single site {self.potential_fn.site!r}")

    def _sample_r(self, name: str) -> tuple[dict, dict]:
        r, r_unscaled = super()._sample_r(name)
        self._momentum_sq = float(r_unscaled[self._block].square().sum())
        return r, r_unscaled

    def _is_turning(self, r_left_unscaled: dict, r_right_unscaled: dict, r_sum: dict) -> bool:
        left, right = r_left_unscaled[self._block], r_right_unscaled[self._block]
        rho = r_sum[self._block] - (left + right) / 2
        return bool(left.dot(rho) <= 0) or bool(right.dot(rho) <= 0)

    def _build_basetree(
        self,
        z: dict,
        r: dict,
        z_grads: dict,
        log_slice: torch.Tensor,
        direction: int,
        energy_current: torch.Tensor,
    ) -> _TreeInfo:
        site, block = self.potential_fn.site, self._block
        adapter = self.mass_matrix_adapter
        half = 0.5 * (self.step_size if direction == 1 else -self.step_size)
        momentum = r[site] + half * (-z_grads[site])
        theta = z[site] + (2.0 * half) * _matvec(adapter.inverse_mass_matrix[block], momentum)
        potential_energy, grad = self.potential_fn.energy_and_grad(theta)
        momentum = momentum + half * (-grad)
        unscaled = _matvec(adapter._mass_matrix_sqrt_inverse[block], momentum)
        energy_new = potential_energy + 0.5 * unscaled.dot(unscaled)
        if torch.isnan(energy_new):
            energy_new = torch.full_like(energy_new, math.inf)
        sliced_energy = energy_new + log_slice
        diverging = bool(sliced_energy > self._max_sliced_energy)
        accept_prob = (energy_current - energy_new).exp().clamp(max=1.0)
        if self.use_multinomial_sampling:
            weight = -sliced_energy
        else:
            weight = torch.full_like(sliced_energy, 1.0 if sliced_energy <= 0 else 0.0)
        z_new, r_new, g_new, r_unscaled = {site: theta}, {site: momentum}, {site: grad}, {}
        r_unscaled[block] = unscaled
        return _TreeInfo(
            z_new, r_new, r_unscaled, g_new,
            z_new, r_new, r_unscaled, g_new,
            z_new, potential_energy, g_new,
            r_unscaled, weight, False, diverging, accept_prob, 1,
        )  # fmt: skip

    def _subtree(
        self,
        z: dict,
        r: dict,
        z_grads: dict,
        log_slice: torch.Tensor,
        direction: int,
        depth: int,
        energy_current: torch.Tensor,
    ) -> _TreeInfo:
        """Pyro's recursive doubling (``NUTS._build_tree``) for one site."""
        if depth == 0:
            return self._build_basetree(z, r, z_grads, log_slice, direction, energy_current)
        first = self._subtree(z, r, z_grads, log_slice, direction, depth - 1, energy_current)
        if first.turning or first.diverging:
            return first
        if direction == 1:
            start = first.z_right, first.r_right, first.z_right_grads
        else:
            start = first.z_left, first.r_left, first.z_left_grads
        second = self._subtree(*start, log_slice, direction, depth - 1, energy_current)
        if self.use_multinomial_sampling:
            weight = _logaddexp(first.weight, second.weight)
            second_prob = (second.weight - weight).exp()
        else:
            weight = first.weight + second.weight
            second_prob = second.weight / weight if weight > 0 else torch.zeros_like(weight)
        # Bernoulli(second_prob).sample(): the draw Pyro's "is_other_half_tree" site makes.
        with torch.no_grad():
            take_second = bool(torch.bernoulli(second_prob) == 1)
        proposal = second if take_second else first
        left, right = (first, second) if direction == 1 else (second, first)
        block = self._block
        r_sum = {block: first.r_sum[block] + second.r_sum[block]}
        turning = second.turning or self._is_turning(
            left.r_left_unscaled, right.r_right_unscaled, r_sum
        )
        return _TreeInfo(
            left.z_left, left.r_left, left.r_left_unscaled, left.z_left_grads,
            right.z_right, right.r_right, right.r_right_unscaled, right.z_right_grads,
            proposal.z_proposal, proposal.z_proposal_pe, proposal.z_proposal_grads,
            r_sum, weight, turning, second.diverging,
            first.sum_accept_probs + second.sum_accept_probs,
            first.num_proposals + second.num_proposals,
        )  # fmt: skip

    def _build_tree(
        self,
        z: dict,
        r: dict,
        z_grads: dict,
        log_slice: torch.Tensor,
        direction: int,
        tree_depth: int,
        energy_current: torch.Tensor,
    ) -> _TreeInfo:
        # Called by Pyro's ``sample`` once per doubling; the recursion stays in ``_subtree``.
        tree = self._subtree(z, r, z_grads, log_slice, direction, tree_depth, energy_current)
        if not (tree.turning or tree.diverging):
            self._doublings += 1
        return tree

    def sample(self, params: dict) -> dict:
        t = self._t
        potential_before = self._potential_energy_last
        mean_accept_before = self._mean_accept_prob
        divergences_before = len(self._divergences)
        calls_before = self.potential_fn.calls
        self._momentum_sq = math.nan
        self._doublings = 0
        params = super().sample(params)
        if t < self._warmup_steps:
            return params
        kinetic = 0.5 * self._momentum_sq
        energy = math.nan if potential_before is None else float(potential_before) + kinetic
        n = t + 1 - self._warmup_steps
        accept = n * self._mean_accept_prob - (n - 1) * mean_accept_before
        stats = self._draw_stats
        stats["diverging"].append(len(self._divergences) > divergences_before)
        stats["step_size"].append(float(self.step_size))
        stats["tree_depth"].append(self._doublings)
        stats["n_steps"].append(self.potential_fn.calls - calls_before)
        stats["energy"].append(energy)
        stats["acceptance_rate"].append(float(min(max(accept, 0.0), 1.0)))
        stats["lp"].append(-float(self._potential_energy_last))
        return params

    def diagnostics(self) -> dict:
        out = super().diagnostics()
        out.update({name: list(values) for name, values in self._draw_stats.items()})
        return out
