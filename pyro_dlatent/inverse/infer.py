"""One entry point for Bayesian inversion with a field prior: MAP, SVI or NUTS, as ArviZ data.

:func:`infer` builds the :class:`~pyro_dlatent.inverse.prior.InverseProblemModel`
``p(d, theta) = p(d | field(theta)) p(theta)`` and runs

- ``method="map"``: :class:`~pyro.infer.autoguide.AutoDelta` from several prior draws at once
  (a ``pyro.plate`` over the starts), Adam and then L-BFGS; the start with the highest log joint
  is kept;
- ``method="svi"``: :class:`~pyro.infer.autoguide.AutoNormal`,
  :class:`~pyro.infer.autoguide.AutoLowRankMultivariateNormal` or
  :class:`~pyro.infer.autoguide.AutoMultivariateNormal` fitted with ``Trace_ELBO``, started by
  default at the multi-start MAP (the full-rank guide at the Laplace approximation there);
- ``method="nuts"``: :class:`~pyro.infer.NUTS` in :class:`~pyro.infer.MCMC` with several chains,
  on a :class:`LatentPotential` (all latent sites packed into one unconstrained vector, the log
  joint from the model's plain-tensor ``log_joint``, optionally traced by ``torch.jit``),
  recording per-draw sampler statistics.

Posterior draws are pushed through the model in vectorized chunks
(:class:`~pyro.infer.Predictive` with ``parallel=True``) for the posterior predictive, the
pointwise log-likelihood and the field's posterior mean and standard deviation, and exported
with :func:`pyro_dlatent.export.to_arviz`. Run health (divergences, R-hat, ESS; whether the
SVI loss settled) is checked and reported with an :class:`InferenceWarning`.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import (
    AutoDelta,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from pyro.infer.autoguide.initialization import init_to_median, init_to_sample, init_to_value
from pyro.infer.mcmc.nuts import _logaddexp, _TreeInfo
from pyro.infer.mcmc.util import initialize_model
from pyro.nn import PyroParam
from pyro.ops.integrator import _EXCEPTION_HANDLERS
from pyro.poutine.messenger import Messenger
from tqdm.auto import tqdm

from pyro_dlatent.export import field_summary_from_moments, to_arviz
from pyro_dlatent.inverse.prior import FIELD_SITE, OBS_SITE, InverseProblemModel
from pyro_dlatent.validation import check_int

__all__ = [
    "GUIDES",
    "METHODS",
    "InferenceResult",
    "InferenceWarning",
    "LatentPotential",
    "data_misfit",
    "infer",
    "loss_settled",
    "report_health",
    "run_health",
]

METHODS = ("map", "svi", "nuts")
"""Inference methods of :func:`infer`."""
GUIDES = ("normal", "lowrank", "fullrank")
"""Variational families of ``method="svi"``."""


class InferenceWarning(UserWarning):
    """A run that finished but whose health checks failed (divergences, R-hat, unsettled loss)."""


@dataclass
class InferenceResult:
    """What :func:`infer` returns.

    Attributes
    ----------
    idata : arviz.InferenceData or xarray.DataTree
        Groups ``posterior``, ``posterior_predictive``, ``log_likelihood``, ``sample_stats``
        (NUTS), ``observed_data``, ``constant_data`` and ``field_summary``.
    method : str
        ``"map"``, ``"svi"`` or ``"nuts"``.
    model : InverseProblemModel
        The Pyro model that was inverted.
    samples : dict of str to Tensor
        Posterior draws of the prior's latent sites, shape ``(chain, draw, *event)``.
    health : dict
        Divergences, R-hat and ESS (NUTS), whether the loss settled (SVI), start losses (MAP).
    losses : numpy.ndarray, optional
        Loss per optimization step (SVI, MAP; for MAP the sum over the starts).
    guide : pyro.infer.autoguide.AutoGuide, optional
        The fitted guide (SVI, MAP).
    """

    idata: Any
    method: str
    model: InverseProblemModel
    samples: dict[str, torch.Tensor]
    health: dict[str, Any] = field(default_factory=dict)
    losses: np.ndarray | None = None
    guide: Any = None


# --------------------------------------------------------------------------- RNG
@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Run with torch's RNG seeded by ``seed`` and restore the caller's RNG state afterwards."""
    if seed is None:
        yield
        return
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------- potential
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


# --------------------------------------------------------------------------- NUTS with statistics
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


# --------------------------------------------------------------------------- runners


def _progress(total: int, desc: str, enabled: bool) -> Any:
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def _optimize(svi: SVI, steps: int, desc: str, progress: bool) -> np.ndarray:
    losses = np.empty(steps)
    with _progress(steps, desc, progress) as bar:
        for i in range(steps):
            loss = svi.step()
            if not math.isfinite(loss):
                raise RuntimeError(f"{desc}: the loss became non-finite at step {i}")
            losses[i] = loss
            bar.update()
            if i % 50 == 0 or i == steps - 1:
                bar.set_postfix(loss=f"{loss:.4g}")
    return losses


def _run_map(
    model: InverseProblemModel,
    *,
    num_starts: int,
    steps: int,
    lr: float,
    lr_decay: float,
    lbfgs_steps: int,
    progress: bool,
) -> tuple[dict[str, torch.Tensor], AutoDelta, np.ndarray, np.ndarray]:
    def starts_model() -> torch.Tensor:
        with pyro.plate("starts", num_starts, dim=-1):
            return model()

    guide = AutoDelta(starts_model, init_loc_fn=init_to_sample)
    optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": lr_decay ** (1.0 / max(steps, 1))})
    svi = SVI(starts_model, guide, optim, Trace_ELBO())
    losses = _optimize(svi, steps, "MAP (Adam)", progress) if steps else np.empty(0)
    if not steps:
        guide()
    if lbfgs_steps:
        params = [p for p in guide.parameters() if p.requires_grad]
        lbfgs = torch.optim.LBFGS(
            params,
            lr=1.0,
            max_iter=lbfgs_steps,
            line_search_fn="strong_wolfe",
            tolerance_grad=1e-10,
            tolerance_change=1e-14,
        )
        loss_fn = Trace_ELBO().differentiable_loss

        def closure() -> torch.Tensor:
            lbfgs.zero_grad()
            loss = loss_fn(starts_model, guide)
            loss.backward()
            return loss

        lbfgs.step(closure)
    with torch.no_grad():
        values = {k: v.detach() for k, v in guide.median().items()}
        trace = poutine.trace(poutine.condition(starts_model, data=values)).get_trace()
        trace.compute_log_prob()
        log_joint = sum(
            site["log_prob"]
            for site in trace.nodes.values()
            if site["type"] == "sample" and not site["infer"].get("_deterministic", False)
        )
    log_joint = log_joint.expand(num_starts).double().cpu().numpy()
    if not np.isfinite(log_joint).any():
        raise RuntimeError("MAP: every start ended at a non-finite log joint")
    best = int(np.nanargmax(np.where(np.isfinite(log_joint), log_joint, -np.inf)))
    latent = {k: values[k][best][None, None] for k in model.prior.latent_sites}
    return latent, guide, losses, -log_joint


def _make_guide(
    model: InverseProblemModel, guide: str, rank: int | None, scale: float, init: Any
) -> Any:
    if guide == "normal":
        return AutoNormal(model, init_loc_fn=init, init_scale=scale)
    if guide == "lowrank":
        return AutoLowRankMultivariateNormal(model, init_loc_fn=init, init_scale=scale, rank=rank)
    return AutoMultivariateNormal(model, init_loc_fn=init, init_scale=scale)


def _laplace(
    model: InverseProblemModel, point: Mapping[str, torch.Tensor], lbfgs_steps: int
) -> tuple[LatentPotential, torch.Tensor, torch.Tensor | None]:
    """Laplace approximation in the packed unconstrained space, started at a MAP point.

    The mode ``theta*`` of the unconstrained density (which includes the log-Jacobian, so it
    differs from the constrained MAP when a support is bounded) is polished with L-BFGS, and
    the covariance is the inverse Hessian of the potential there.

    Returns
    -------
    potential : LatentPotential
    mode : Tensor, shape ``(dim,)``
    covariance : Tensor, shape ``(dim, dim)``, or None when the Hessian is not positive definite
    """
    potential, _ = LatentPotential.from_model(model)
    theta = potential.pack({k: potential.transforms[k](v) for k, v in point.items()})
    theta = theta.detach().clone().requires_grad_(True)
    if lbfgs_steps:
        lbfgs = torch.optim.LBFGS(
            [theta],
            lr=1.0,
            max_iter=lbfgs_steps,
            line_search_fn="strong_wolfe",
            tolerance_grad=1e-10,
            tolerance_change=1e-14,
        )

        def closure() -> torch.Tensor:
            lbfgs.zero_grad()
            value = potential({potential.site: theta})
            value.backward()
            return value

        lbfgs.step(closure)
    mode = theta.detach()
    hessian = torch.autograd.functional.hessian(lambda t: potential({potential.site: t}), mode)
    covariance = torch.linalg.inv(0.5 * (hessian + hessian.mT))
    if not torch.isfinite(covariance).all() or torch.linalg.cholesky_ex(covariance)[1] != 0:
        return potential, mode, None
    return potential, mode, covariance


def _laplace_guide(
    model: InverseProblemModel, potential: LatentPotential, mode: torch.Tensor, covariance: Any
) -> AutoMultivariateNormal | None:
    """A full-rank guide whose loc and covariance are the Laplace approximation."""
    guide = AutoMultivariateNormal(
        model, init_loc_fn=init_to_value(values=potential.constrain(mode))
    )
    guide._setup_prototype()
    if list(guide._unconstrained_shapes) != list(potential.shapes):
        return None
    # Pyro's full-rank guide has covariance (diag(scale) T)(diag(scale) T)^T with T unit lower
    # triangular: scale is the diagonal of the Cholesky factor, T its rows divided by it.
    cholesky = torch.linalg.cholesky(covariance)
    scale = cholesky.diagonal()
    unit_tril = cholesky / scale[:, None]
    guide.loc = torch.nn.Parameter(mode.clone())
    guide.scale = PyroParam(scale, guide.scale_constraint)
    guide.scale_tril = PyroParam(unit_tril, guide.scale_tril_constraint)
    return guide


def _run_svi(
    model: InverseProblemModel,
    *,
    guide: str,
    rank: int | None,
    init_scale: float,
    init: str,
    num_starts: int,
    lbfgs_steps: int,
    steps: int,
    lr: float,
    lr_decay: float,
    num_particles: int,
    num_samples: int,
    chunk_size: int,
    progress: bool,
) -> tuple[dict[str, torch.Tensor], Any, np.ndarray]:
    autoguide = None
    if init == "map":
        point, _, _, _ = _run_map(
            model,
            num_starts=num_starts,
            steps=min(steps, 500),
            lr=0.02,
            lr_decay=0.1,
            lbfgs_steps=lbfgs_steps,
            progress=progress,
        )
        point = {k: v[0, 0] for k, v in point.items()}
        if guide == "fullrank":
            potential, mode, covariance = _laplace(model, point, lbfgs_steps)
            if covariance is not None:
                autoguide = _laplace_guide(model, potential, mode, covariance)
        init_fn = init_to_value(values=point)
    else:
        init_fn = init_to_median(num_samples=15)
    if autoguide is None:
        autoguide = _make_guide(model, guide, rank, init_scale, init_fn)
    optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": lr_decay ** (1.0 / max(steps, 1))})
    # The inverse-problem model has no plates of its own, so particles vectorize at dim -1.
    elbo = Trace_ELBO(
        num_particles=num_particles,
        vectorize_particles=num_particles > 1,
        max_plate_nesting=0,
    )
    svi = SVI(model, autoguide, optim, elbo)
    # Restarts after a non-finite loss: the Laplace start can be too wide where the Hessian is
    # nearly singular (a weakly identified direction), so first a narrow guide at the MAP point;
    # a MAP point itself can sit where the gradient overflows, so then the prior median.
    restarts = []
    if init == "map" and guide == "fullrank":
        restarts.append((f"the MAP with init_scale={init_scale}", init_fn))
    if init == "map":
        restarts.append(("the prior median", init_to_median(num_samples=15)))
    while True:
        try:
            losses = _optimize(svi, steps, f"SVI ({guide})", progress)
            break
        except RuntimeError as err:
            if not restarts:
                raise
            where, init_fn = restarts.pop(0)
            warnings.warn(f"{err}; restarting SVI from {where}", InferenceWarning, stacklevel=3)
            store = pyro.get_param_store()
            for name in [n for n in store.keys() if n.startswith(autoguide._pyro_name)]:
                del store[name]
            autoguide = _make_guide(model, guide, rank, init_scale, init_fn)
            optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": lr_decay ** (1.0 / max(steps, 1))})
            svi = SVI(model, autoguide, optim, elbo)
    draws: dict[str, list[torch.Tensor]] = {k: [] for k in model.prior.latent_sites}
    with torch.no_grad():
        for start in range(0, num_samples, chunk_size):
            n = min(chunk_size, num_samples - start)
            predictive = Predictive(
                model,
                guide=autoguide,
                num_samples=n,
                return_sites=list(model.prior.latent_sites),
                parallel=True,
            )
            out = predictive()
            for k in draws:
                draws[k].append(out[k])
    latent = {k: torch.cat(v)[None] for k, v in draws.items()}
    return latent, autoguide, losses


def _run_nuts(
    model: InverseProblemModel,
    *,
    num_samples: int,
    num_warmup: int,
    num_chains: int,
    target_accept_prob: float,
    max_tree_depth: int,
    dense_mass: bool,
    jit_compile: bool | None,
    progress: bool,
    mp_context: str | None,
) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
    potential, initial = LatentPotential.from_model(
        model, num_chains=num_chains, jit_compile=bool(jit_compile)
    )
    # A traced function cannot be pickled into spawned chain processes.
    if jit_compile is None and mp_context in (None, "fork"):
        try:
            potential.compile(initial[0])
        except Exception:  # any failure to trace or a disagreeing trace: stay eager
            potential._compiled = None
    kernel = _RecordingNUTS(
        potential_fn=potential,
        target_accept_prob=target_accept_prob,
        max_tree_depth=max_tree_depth,
        adapt_mass_matrix=True,
        full_mass=dense_mass,
    )
    init = {potential.site: initial if num_chains > 1 else initial[0]}
    with warnings.catch_warnings():
        # On few cores Pyro runs the chains one after another and says so; that is expected.
        warnings.filterwarnings("ignore", message=".*Chains will be drawn sequentially.*")
        mcmc = MCMC(
            kernel,
            num_samples=num_samples,
            warmup_steps=num_warmup,
            num_chains=num_chains,
            initial_params=init,
            transforms={},
            disable_progbar=not progress,
            mp_context=mp_context,
        )
        mcmc.run()
    theta = mcmc.get_samples(group_by_chain=True)[potential.site]
    with torch.no_grad():
        constrained = potential.constrain(theta)
    latent = {k: constrained[k] for k in model.prior.latent_sites}
    diagnostics = mcmc.diagnostics()
    stats = {}
    for name in SAMPLE_STATS:
        per_chain = diagnostics[name]
        stats[name] = np.asarray([per_chain[f"chain {c}"] for c in range(num_chains)])
    return latent, stats


# --------------------------------------------------------------------------- posterior outputs
def _posterior_outputs(
    model: InverseProblemModel,
    latent: Mapping[str, torch.Tensor],
    chunk_size: int,
    keep_fields: bool = False,
) -> dict[str, Any]:
    """Push posterior draws through the model in vectorized chunks.

    Returns the posterior predictive and pointwise log-likelihood of ``"obs"``
    ``(chain, draw, num_sensors)``, the field's draw count, mean and ``M2`` (sum of squared
    deviations) accumulated in float64 with Chan's pairwise update, and, with ``keep_fields``,
    every field draw ``(chain, draw, H, W)``.
    """
    first = next(iter(latent.values()))
    num_chains, num_draws = first.shape[:2]
    total = num_chains * num_draws
    flat = {k: v.reshape(total, *v.shape[2:]) for k, v in latent.items()}
    predictive_obs, log_lik, kept = [], [], []
    count, mean, m2 = 0, None, None
    with torch.no_grad():
        for start in range(0, total, chunk_size):
            chunk = {k: v[start : start + chunk_size] for k, v in flat.items()}
            n = next(iter(chunk.values())).shape[0]
            trace = Predictive(model, posterior_samples=chunk, parallel=True).get_vectorized_trace()
            obs_fn = trace.nodes[OBS_SITE]["fn"]
            base = obs_fn.base_dist if isinstance(obs_fn, dist.Independent) else obs_fn
            log_lik.append(base.log_prob(model.observations).reshape(n, -1))
            predictive_obs.append(obs_fn.sample().reshape(n, -1))
            fields = trace.nodes[FIELD_SITE]["value"].reshape(n, *model.prior.field_shape)
            if keep_fields:
                kept.append(fields.detach().cpu())
            fields = fields.detach().to(torch.float64).cpu().numpy()
            chunk_mean = fields.mean(axis=0)
            chunk_m2 = ((fields - chunk_mean) ** 2).sum(axis=0)
            if mean is None:
                count, mean, m2 = n, chunk_mean, chunk_m2
            else:
                delta = chunk_mean - mean
                new_count = count + n
                mean = mean + delta * (n / new_count)
                m2 = m2 + chunk_m2 + delta**2 * (count * n / new_count)
                count = new_count
    shape = (num_chains, num_draws)
    return {
        "posterior_predictive": torch.cat(predictive_obs).reshape(*shape, -1),
        "log_likelihood": torch.cat(log_lik).reshape(*shape, -1),
        "field_count": count,
        "field_mean": mean,
        "field_m2": m2,
        "fields": torch.cat(kept).reshape(*shape, *model.prior.field_shape) if kept else None,
    }


def _problem_metadata(
    problem: Any, noise_sd: torch.Tensor, num_sensors: int, field_shape: tuple[int, int]
) -> tuple[dict, dict, dict]:
    """constant_data variables, their dims, and coords (sensors, noise, mesh nodes).

    ``node_x``, ``node_y`` ``(y, x)`` are the mesh-node coordinates (``node_xy[i, j] = (x, y)``
    of the field's pixel ``[i, j]``); the index coordinates ``x`` and ``y`` are its first row
    and column, exact for the structured unit-square mesh.
    """
    constant: dict[str, Any] = {"noise_sd": noise_sd.detach().cpu().numpy()}
    dims: dict[str, list[str]] = {}
    if constant["noise_sd"].ndim == 1:
        dims["noise_sd"] = ["sensor"]
    coords: dict[str, Any] = {"sensor": list(range(num_sensors))}
    sensors = getattr(problem, "sensors", None)
    if sensors is not None:
        sensors = np.asarray(sensors, dtype=np.float64)
        if sensors.shape == (num_sensors, 2):
            constant["sensor_x"] = sensors[:, 0]
            constant["sensor_y"] = sensors[:, 1]
            dims["sensor_x"] = ["sensor"]
            dims["sensor_y"] = ["sensor"]
    height, width = field_shape
    node_xy = getattr(problem, "node_xy", None)
    if node_xy is not None and np.shape(node_xy) == (height, width, 2):
        node_xy = np.asarray(node_xy, dtype=np.float64)
        coords["x"] = node_xy[0, :, 0]
        coords["y"] = node_xy[:, 0, 1]
        constant["node_x"] = node_xy[..., 0]
        constant["node_y"] = node_xy[..., 1]
        dims["node_x"] = dims["node_y"] = ["y", "x"]
    else:
        coords["x"] = np.arange(width, dtype=np.float64)
        coords["y"] = np.arange(height, dtype=np.float64)
    return constant, dims, coords


# --------------------------------------------------------------------------- health
def loss_settled(losses: np.ndarray, *, window: float = 0.1, atol: float = 0.01) -> dict[str, Any]:
    """Whether an optimization loss has stopped moving.

    Compares the mean loss over the last ``window`` fraction of the steps (``A``) with the
    mean over the ``window`` before it (``B``). The loss settled when

    .. math:: |\\bar A - \\bar B| \\le \\max\\big(4 \\sqrt{s_A^2 / n + s_B^2 / n},\\;
              \\text{atol}\\big),

    i.e. the change is within four standard errors of the loss's own step-to-step noise (or
    below ``atol`` nats for a loss that has become deterministic).

    Returns
    -------
    dict
        ``settled`` (bool), ``change`` (``mean(B) - mean(A)``), ``noise`` (standard error).
    """
    losses = np.asarray(losses, dtype=np.float64)
    n = int(len(losses) * window)
    if n < 2:
        return {"settled": False, "change": float("nan"), "noise": float("nan")}
    last, previous = losses[-n:], losses[-2 * n : -n]
    change = float(previous.mean() - last.mean())
    noise = float(np.sqrt(last.var(ddof=1) / n + previous.var(ddof=1) / n))
    return {"settled": abs(change) <= max(4.0 * noise, atol), "change": change, "noise": noise}


MAX_MISFIT_RMS = 5.0
"""Largest RMS over sensors, in noise sds, of the posterior-mean data misfit before a warning."""


def data_misfit(model: Any, predictive: Any) -> dict[str, float]:
    """RMS over sensors of ``(d - mean predicted d) / noise_sd``: about 1 for a fit that explains d.

    Parameters
    ----------
    model : InverseProblemModel
        Its ``observations`` and ``noise_sd``.
    predictive : array, shape ``(..., m)``
        Posterior predictive draws of the data.
    """
    predicted = np.asarray(predictive, dtype=np.float64)
    predicted = predicted.reshape(-1, predicted.shape[-1]).mean(0)
    observed = model.observations.detach().cpu().double().numpy()
    noise = model.noise_sd.detach().cpu().double().numpy()
    with np.errstate(over="ignore", invalid="ignore"):
        rms = float(np.sqrt(np.mean(((observed - predicted) / noise) ** 2)))
    return {"misfit_rms": rms if math.isfinite(rms) else math.inf}


def report_health(
    health: dict[str, Any],
    messages: list[str],
    label: str,
    *,
    warn: bool = True,
    rhat_advice: str | None = None,
) -> None:
    """Add the shared run-health messages to ``messages``; store them and warn once.

    NUTS's divergences and R-hat (when ``health`` has them, with ``rhat_advice`` appended) and
    the data misfit beyond :data:`MAX_MISFIT_RMS` join the method's own ``messages``; all of
    them go to ``health["warnings"]`` and, with ``warn``, one :class:`InferenceWarning`.
    """
    if health.get("divergences", 0) > 0:
        messages.append(f"{health['divergences']} divergent transitions")
    if "max_rhat" in health and not health["max_rhat"] <= 1.01:
        advice = f": {rhat_advice}" if rhat_advice else ""
        messages.append(f"max R-hat {health['max_rhat']:.3f} > 1.01{advice}")
    if not health["misfit_rms"] <= MAX_MISFIT_RMS:
        messages.append(
            f"the posterior's predicted data miss the observations by {health['misfit_rms']:.3g} "
            f"noise sds (RMS over sensors, > {MAX_MISFIT_RMS:g}): the prior cannot explain these "
            "data; check the observations' units and noise_sd"
        )
    if messages:
        health["warnings"] = messages
        if warn:
            warnings.warn(f"{label}: " + "; ".join(messages), InferenceWarning, stacklevel=3)


def run_health(idata: Any, var_names: list[str] | None = None) -> dict[str, Any]:
    """Divergences, worst R-hat and smallest bulk/tail ESS of a sampled posterior (via ArviZ).

    Returns
    -------
    dict
        ``divergences`` (int), ``max_rhat``, ``min_ess_bulk``, ``min_ess_tail`` (floats;
        ``max_rhat`` is ``inf`` when a chain did not move, an undefined ESS counts as 0).
    """
    import arviz as az

    posterior = idata["posterior"]
    if hasattr(posterior, "to_dataset"):
        posterior = posterior.to_dataset()
    if var_names is not None:
        posterior = posterior[var_names]
    with np.errstate(divide="ignore", invalid="ignore"):
        rhat = az.rhat(posterior)
        ess_bulk = az.ess(posterior, method="bulk")
        ess_tail = az.ess(posterior, method="tail")

    def _values(ds: Any) -> np.ndarray:
        values = [np.asarray(ds[v], dtype=np.float64).ravel() for v in ds.data_vars]
        return np.concatenate(values) if values else np.array([np.nan])

    rhat_values = _values(rhat)
    # A non-finite R-hat means a chain did not move (zero within-chain variance): the worst case.
    max_rhat = float(np.max(rhat_values)) if np.isfinite(rhat_values).all() else math.inf

    divergences = 0
    groups = idata.groups() if hasattr(idata, "groups") and callable(idata.groups) else None
    has_stats = "sample_stats" in (groups if groups is not None else list(idata.children))
    if has_stats and "diverging" in idata["sample_stats"]:
        divergences = int(np.asarray(idata["sample_stats"]["diverging"]).sum())
    return {
        "divergences": divergences,
        "max_rhat": max_rhat,
        "min_ess_bulk": float(np.nan_to_num(_values(ess_bulk), nan=0.0).min()),
        "min_ess_tail": float(np.nan_to_num(_values(ess_tail), nan=0.0).min()),
    }


# --------------------------------------------------------------------------- entry point
def infer(
    problem: Any,
    prior: Any,
    observations: Any,
    method: str = "nuts",
    *,
    num_samples: int = 1000,
    num_warmup: int | None = None,
    num_chains: int = 2,
    guide: str = "lowrank",
    rank: int | None = None,
    init_scale: float = 0.1,
    svi_init: str = "map",
    num_starts: int = 8,
    steps: int = 2000,
    lr: float | None = None,
    lr_decay: float = 0.1,
    lbfgs_steps: int = 200,
    num_particles: int = 1,
    target_accept_prob: float = 0.8,
    max_tree_depth: int = 10,
    dense_mass: bool = False,
    jit_compile: bool | None = None,
    mp_context: str | None = None,
    field_draws: bool = False,
    chunk_size: int = 256,
    seed: int | None = 0,
    progress: bool = True,
    warn: bool = True,
) -> InferenceResult:
    """Invert sensor data for the field under a field prior, by MAP, SVI or NUTS.

    Parameters
    ----------
    problem : object
        Forward problem with ``forward(field (batch, H, W)) -> (batch, m)``, ``noise_sd``,
        ``num_sensors`` (and ``sensors (m, 2)``, ``node_xy (H, W, 2)`` for the export).
    prior : DeepPrior or GRFFieldPrior
        The field prior.
    observations : array-like, shape ``(m,)``
        Sensor data.
    method : {"map", "svi", "nuts"}
        Point estimate, variational approximation or Hamiltonian Monte Carlo.
    num_samples : int
        Draws per chain (NUTS) or from the fitted guide (SVI); ignored for MAP.
    num_warmup : int, optional
        NUTS warmup (adaptation) steps per chain; default ``num_samples``.
    num_chains : int
        NUTS chains, each started from its own prior draw. Pyro runs them in parallel
        processes when there are more than ``num_chains`` CPUs, one after another otherwise.
    guide : {"normal", "lowrank", "fullrank"}
        SVI family: diagonal normal, low-rank plus diagonal, or full-rank multivariate normal
        over the unconstrained latents.
    rank : int, optional
        Rank of the ``"lowrank"`` guide (Pyro's default ``sqrt(dim)`` when ``None``).
    init_scale : float
        Initial standard deviation of the ``"normal"`` and ``"lowrank"`` guides (unconstrained
        space).
    svi_init : {"map", "median"}
        Where SVI starts. ``"map"`` (default): at the multi-start MAP (``num_starts`` starts,
        at most 500 Adam steps, then L-BFGS), and the full-rank guide at the Laplace
        approximation there (mode and inverse Hessian of the unconstrained potential), which
        plain ELBO gradients are slow to reach for a correlated posterior. ``"median"``: the
        guide's mean at the prior median.
    num_starts : int
        MAP starts, drawn from the prior and optimized together.
    steps : int
        Adam steps (MAP, SVI).
    lr : float, optional
        Initial Adam learning rate; default 0.02 for MAP and 0.005 for SVI, whose guide starts
        at the MAP (see ``svi_init``) and only refines it: Adam moves every parameter by about
        ``lr`` per step whatever its posterior scale, so a large rate would shake a well-placed
        guide off its optimum.
    lr_decay : float
        Factor by which the learning rate decays (geometrically) over the steps.
    lbfgs_steps : int
        L-BFGS iterations polishing the MAP after Adam (0 skips it).
    num_particles : int
        ELBO particles per SVI step (vectorized).
    target_accept_prob, max_tree_depth, dense_mass
        NUTS settings (``dense_mass`` adapts a full mass matrix).
    jit_compile : bool, optional
        Trace the NUTS potential with ``torch.jit.trace`` (see :class:`LatentPotential`),
        which removes most of the Python overhead per gradient of cheap models (e.g. the
        source problem's dense sensor operator: about 1.5x fewer milliseconds per gradient).
        ``True`` raises when the trace disagrees with the eager potential; ``None`` (default)
        traces when chains run in this process or forked ones and silently stays eager when
        tracing fails or the trace disagrees (a model computing a value outside torch's
        autograd then runs eagerly); ``False`` never traces.
    mp_context : str, optional
        Multiprocessing start method for parallel chains (e.g. ``"spawn"`` with CUDA).
    field_draws : bool
        Also store every posterior field draw in ``posterior`` (``(chain, draw, y, x)``);
        large for fine meshes, so off by default (the mean and sd are always stored).
    chunk_size : int
        Draws pushed through the model at once for the predictive quantities.
    seed : int, optional
        Seed of torch's RNG for the whole run; the caller's RNG state is restored afterwards.
        ``None`` uses (and advances) the current global state.
    progress : bool
        Show progress bars.
    warn : bool
        Emit an :class:`InferenceWarning` when a health check fails.

    Returns
    -------
    InferenceResult
        ``result.idata`` holds the ArviZ groups (see :func:`pyro_dlatent.export.to_arviz`).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if guide not in GUIDES:
        raise ValueError(f"guide must be one of {GUIDES}, got {guide!r}")
    if svi_init not in ("map", "median"):
        raise ValueError(f"svi_init must be 'map' or 'median', got {svi_init!r}")
    num_samples = check_int(num_samples, "num_samples", 1)
    num_chains = check_int(num_chains, "num_chains", 1)
    num_warmup = num_samples if num_warmup is None else check_int(num_warmup, "num_warmup", 0)
    num_starts = check_int(num_starts, "num_starts", 1)
    steps = check_int(steps, "steps", 0 if method == "map" else 1)
    lbfgs_steps = check_int(lbfgs_steps, "lbfgs_steps", 0)
    num_particles = check_int(num_particles, "num_particles", 1)
    max_tree_depth = check_int(max_tree_depth, "max_tree_depth", 1)
    chunk_size = check_int(chunk_size, "chunk_size", 1)
    if rank is not None:
        rank = check_int(rank, "rank", 1)
    if lr is None:
        lr = 0.005 if method == "svi" and svi_init == "map" else 0.02
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"expected lr > 0, got {lr!r}")
    if not (isinstance(lr_decay, int | float) and 0 < lr_decay <= 1):
        raise ValueError(f"expected 0 < lr_decay <= 1, got {lr_decay!r}")
    if not (isinstance(init_scale, int | float) and math.isfinite(init_scale) and init_scale > 0):
        raise ValueError(f"expected init_scale > 0, got {init_scale!r}")
    if not (isinstance(target_accept_prob, float) and 0 < target_accept_prob < 1):
        raise ValueError(f"expected 0 < target_accept_prob < 1, got {target_accept_prob!r}")
    if seed is not None:
        seed = check_int(seed, "seed", 0)
    if method == "map" and steps == 0 and lbfgs_steps == 0:
        raise ValueError("expected steps > 0 or lbfgs_steps > 0 for method='map'")
    if observations is None:
        raise ValueError("observations must be given (shape (num_sensors,)), got None")
    model = InverseProblemModel(problem, prior, observations)

    health: dict[str, Any] = {}
    losses = None
    fitted_guide = None
    stats = None
    with _seeded(seed), pyro.get_param_store().scope(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was not registered in the param store.*")
        if method == "map":
            latent, fitted_guide, losses, start_losses = _run_map(
                model,
                num_starts=num_starts,
                steps=steps,
                lr=lr,
                lr_decay=lr_decay,
                lbfgs_steps=lbfgs_steps,
                progress=progress,
            )
            health["start_losses"] = start_losses
        elif method == "svi":
            latent, fitted_guide, losses = _run_svi(
                model,
                guide=guide,
                rank=rank,
                init_scale=init_scale,
                init=svi_init,
                num_starts=num_starts,
                lbfgs_steps=lbfgs_steps,
                steps=steps,
                lr=lr,
                lr_decay=lr_decay,
                num_particles=num_particles,
                num_samples=num_samples,
                chunk_size=chunk_size,
                progress=progress,
            )
        else:
            latent, stats = _run_nuts(
                model,
                num_samples=num_samples,
                num_warmup=num_warmup,
                num_chains=num_chains,
                target_accept_prob=target_accept_prob,
                max_tree_depth=max_tree_depth,
                dense_mass=dense_mass,
                jit_compile=jit_compile,
                progress=progress,
                mp_context=mp_context,
            )
        outputs = _posterior_outputs(model, latent, chunk_size, keep_fields=field_draws)
        fields = outputs["fields"]

    constant, constant_dims, coords = _problem_metadata(
        problem, model.noise_sd, model.num_sensors, model.prior.field_shape
    )
    meta = prior.arviz_metadata()
    dims = {**meta["dims"], **constant_dims, OBS_SITE: ["sensor"]}
    posterior = {k: v.detach().cpu().numpy() for k, v in latent.items()}
    if fields is not None and FIELD_SITE not in posterior:
        posterior[FIELD_SITE] = fields.cpu().numpy()
        dims[FIELD_SITE] = ["y", "x"]
    count = outputs["field_count"]
    summary = {"field_mean": outputs["field_mean"]}
    if count > 1:
        summary["field_sd"] = np.sqrt(outputs["field_m2"] / (count - 1))
    idata = to_arviz(
        posterior,
        posterior_predictive={OBS_SITE: outputs["posterior_predictive"]},
        log_likelihood={OBS_SITE: outputs["log_likelihood"]},
        observed_data={OBS_SITE: model.observations},
        sample_stats=stats,
        constant_data=constant,
        coords={**coords, **meta["coords"]},
        dims=dims,
        var_attrs=meta["attrs"],
        attrs={"inference_method": method},
        field_summary=field_summary_from_moments(summary, x=coords["x"], y=coords["y"]),
    )

    messages = []
    if method == "nuts":
        health.update(run_health(idata, var_names=list(latent)))
    elif method == "svi":
        health.update(loss_settled(losses))
        if not health["settled"]:
            messages.append(
                f"the SVI loss has not settled (mean moved by {health['change']:.3g} over the "
                f"last 10% of the steps; noise {health['noise']:.3g}); increase steps"
            )
    health.update(data_misfit(model, outputs["posterior_predictive"]))
    report_health(health, messages, method, warn=warn)
    return InferenceResult(
        idata=idata,
        method=method,
        model=model,
        samples={k: v.detach() for k, v in latent.items()},
        health=health,
        losses=losses,
        guide=fitted_guide,
    )
