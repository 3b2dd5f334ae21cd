"""Inference methods for :func:`~pyro_dlatent.inverse.infer.infer`: one object per method.

Each method is a frozen dataclass holding, and validating, only its own settings, the way
NumPyro separates a kernel from the runner that drives it; :func:`infer` runs any of them on
the :class:`~pyro_dlatent.inverse.prior.InverseProblemModel` and exports the result.

- :class:`MAP`: :class:`~pyro.infer.autoguide.AutoDelta` from several prior draws at once (a
  ``pyro.plate`` over the starts), Adam and then L-BFGS; the start with the highest log joint
  is kept.
- :class:`SVI`: :class:`~pyro.infer.autoguide.AutoNormal`,
  :class:`~pyro.infer.autoguide.AutoLowRankMultivariateNormal` or
  :class:`~pyro.infer.autoguide.AutoMultivariateNormal` fitted with ``Trace_ELBO``, started by
  default at a multi-start MAP (the full-rank guide at the Laplace approximation there).
- :class:`NUTS`: Pyro's NUTS in :class:`~pyro.infer.MCMC` with several chains, on a
  :class:`~pyro_dlatent.inverse.potential.LatentPotential`, recording per-draw statistics.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import MCMC, Predictive, Trace_ELBO
from pyro.infer import SVI as PyroSVI
from pyro.infer.autoguide import (
    AutoDelta,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from pyro.infer.autoguide.initialization import init_to_median, init_to_sample, init_to_value
from pyro.nn import PyroParam
from tqdm.auto import tqdm

from pyro_dlatent.inverse._pyro_nuts import SAMPLE_STATS, _RecordingNUTS
from pyro_dlatent.inverse.chains import nuts_chain, run_chains
from pyro_dlatent.inverse.health import InferenceWarning, loss_settled, run_health
from pyro_dlatent.inverse.potential import LatentPotential
from pyro_dlatent.inverse.prior import InverseProblemModel
from pyro_dlatent.validation import check_float, check_int

__all__ = ["GUIDES", "MAP", "NUTS", "SVI", "Method", "MethodRun"]

GUIDES = ("normal", "lowrank", "fullrank")
"""Variational families of :class:`SVI`."""


class MethodRun(NamedTuple):
    """What a method's ``run`` returns to :func:`infer`."""

    latent: dict[str, torch.Tensor]  # posterior draws, (chain, draw, *event)
    guide: Any = None
    losses: np.ndarray | None = None
    stats: dict[str, np.ndarray] | None = None
    health: dict[str, Any] | None = None


def _check_rate(value: Any, name: str) -> float:
    return check_float(value, name, minimum=0.0, strict=True)


def _check_decay(value: Any) -> float:
    value = check_float(value, "lr_decay", minimum=0.0, strict=True)
    if value > 1.0:
        raise ValueError(f"expected 0 < lr_decay <= 1, got {value!r}")
    return value


def _settings(method: Any) -> dict[str, Any]:
    """A method's settings by name (its runner takes the same keywords)."""
    return {f.name: getattr(method, f.name) for f in dataclasses.fields(method)}


def _settle(obj: Any, **values: Any) -> None:
    """Store checked values on a frozen dataclass."""
    for name, value in values.items():
        object.__setattr__(obj, name, value)


@dataclasses.dataclass(frozen=True)
class MAP:
    """Maximum a posteriori: ``num_starts`` prior draws optimized together, the best kept.

    Attributes
    ----------
    num_starts : int
        Starts, drawn from the prior (a ``pyro.plate`` over them).
    steps : int
        Adam steps (0 goes straight to L-BFGS).
    lr : float
        Initial Adam learning rate.
    lr_decay : float
        Factor in ``(0, 1]`` by which the rate decays geometrically over the steps.
    lbfgs_steps : int
        L-BFGS iterations polishing every start after Adam (0 skips it).
    """

    num_starts: int = 8
    steps: int = 2000
    lr: float = 0.02
    lr_decay: float = 0.1
    lbfgs_steps: int = 200
    name: ClassVar[str] = "map"

    def __post_init__(self) -> None:
        _settle(
            self,
            num_starts=check_int(self.num_starts, "num_starts", 1),
            steps=check_int(self.steps, "steps", 0),
            lr=_check_rate(self.lr, "lr"),
            lr_decay=_check_decay(self.lr_decay),
            lbfgs_steps=check_int(self.lbfgs_steps, "lbfgs_steps", 0),
        )
        if self.steps == 0 and self.lbfgs_steps == 0:
            raise ValueError("expected steps > 0 or lbfgs_steps > 0 for MAP")

    def run(self, model: InverseProblemModel, *, progress: bool, chunk_size: int) -> MethodRun:
        latent, guide, losses, start_losses = _run_map(model, progress=progress, **_settings(self))
        return MethodRun(latent, guide, losses, health={"start_losses": start_losses})

    def check(self, idata: Any, run: MethodRun) -> tuple[dict[str, Any], list[str]]:
        """Method-specific health and warning messages (none for MAP)."""
        return {}, []


SVI_START = MAP(steps=500)
"""Where :class:`SVI` starts by default: a multi-start MAP of at most 500 Adam steps."""


@dataclasses.dataclass(frozen=True)
class SVI:
    """Stochastic variational inference with a Gaussian autoguide in the unconstrained space.

    Attributes
    ----------
    guide : {"normal", "lowrank", "fullrank"}
        Diagonal normal, low-rank plus diagonal, or full-rank multivariate normal.
    rank : int, optional
        Rank of the ``"lowrank"`` guide (Pyro's default ``sqrt(dim)`` when ``None``).
    init_scale : float
        Initial sd of the ``"normal"`` and ``"lowrank"`` guides.
    init : MAP or "median"
        Where the guide starts: at a :class:`MAP` point (default :data:`SVI_START`), the
        full-rank guide at the Laplace approximation there (mode and inverse Hessian of the
        unconstrained potential, which plain ELBO gradients are slow to reach for a correlated
        posterior); or ``"median"``, the guide's mean at the prior median.
    steps : int
        Adam steps.
    lr : float, optional
        Initial Adam rate; default 0.005 from a MAP start, 0.02 from the median: Adam moves every
        parameter by about ``lr`` per step whatever its posterior scale, so a large rate would
        shake a well-placed guide off its optimum.
    lr_decay : float
        Factor in ``(0, 1]`` by which the rate decays geometrically over the steps.
    num_particles : int
        ELBO particles per step (vectorized).
    num_samples : int
        Draws from the fitted guide.
    """

    guide: str = "lowrank"
    rank: int | None = None
    init_scale: float = 0.1
    init: MAP | str = SVI_START
    steps: int = 2000
    lr: float | None = None
    lr_decay: float = 0.1
    num_particles: int = 1
    num_samples: int = 1000
    name: ClassVar[str] = "svi"

    def __post_init__(self) -> None:
        if self.guide not in GUIDES:
            raise ValueError(f"guide must be one of {GUIDES}, got {self.guide!r}")
        if not (isinstance(self.init, MAP) or self.init == "median"):
            raise ValueError(f"init must be a MAP or 'median', got {self.init!r}")
        lr = self.lr
        if lr is None:
            lr = 0.005 if isinstance(self.init, MAP) else 0.02
        _settle(
            self,
            rank=None if self.rank is None else check_int(self.rank, "rank", 1),
            init_scale=_check_rate(self.init_scale, "init_scale"),
            steps=check_int(self.steps, "steps", 1),
            lr=_check_rate(lr, "lr"),
            lr_decay=_check_decay(self.lr_decay),
            num_particles=check_int(self.num_particles, "num_particles", 1),
            num_samples=check_int(self.num_samples, "num_samples", 1),
        )

    def run(self, model: InverseProblemModel, *, progress: bool, chunk_size: int) -> MethodRun:
        latent, guide, losses = _run_svi(
            model, chunk_size=chunk_size, progress=progress, **_settings(self)
        )
        return MethodRun(latent, guide, losses)

    def check(self, idata: Any, run: MethodRun) -> tuple[dict[str, Any], list[str]]:
        """Whether the loss settled (:func:`~pyro_dlatent.inverse.health.loss_settled`)."""
        health = loss_settled(run.losses)
        messages = []
        if not health["settled"]:
            messages.append(
                f"the SVI loss has not settled (mean moved by {health['change']:.3g} over the "
                f"last 10% of the steps; noise {health['noise']:.3g}); increase steps"
            )
        return health, messages


@dataclasses.dataclass(frozen=True)
class NUTS:
    """The No-U-Turn sampler on the packed unconstrained latents, several chains.

    Attributes
    ----------
    num_samples : int
        Draws per chain.
    num_warmup : int, optional
        Warm-up (adaptation) steps per chain; default ``num_samples``.
    num_chains : int
        Chains, each started from its own prior draw and seeded from the run's seed.
    target_accept_prob, max_tree_depth : float, int
        Step-size adaptation target and the trajectory's doubling limit.
    dense_mass : bool
        Adapt a full mass matrix (default diagonal).
    jit_compile : bool, optional
        Trace the potential with ``torch.jit.trace`` (see
        :class:`~pyro_dlatent.inverse.potential.LatentPotential`), which removes most of the
        Python overhead per gradient of cheap models. ``True`` raises when the trace disagrees
        with the eager potential; ``None`` (default) traces when chains run in this process or
        forked ones and silently stays eager when tracing fails or disagrees; ``False`` never
        traces.
    mp_context : str, optional
        Run the chains in one ``pyro.infer.MCMC`` with this multiprocessing start method (e.g.
        ``"spawn"`` with CUDA) instead of as independent seeded runs.
    num_processes : int, optional
        Processes for the independent chains (default ``min(num_chains, cores)``; see
        :func:`~pyro_dlatent.inverse.chains.run_chains`): the draws are the same for any value.
    """

    num_samples: int = 1000
    num_warmup: int | None = None
    num_chains: int = 2
    target_accept_prob: float = 0.8
    max_tree_depth: int = 10
    dense_mass: bool = False
    jit_compile: bool | None = None
    mp_context: str | None = None
    num_processes: int | None = None
    name: ClassVar[str] = "nuts"

    def __post_init__(self) -> None:
        num_samples = check_int(self.num_samples, "num_samples", 1)
        accept = self.target_accept_prob
        if not (isinstance(accept, float) and 0 < accept < 1):
            raise ValueError(f"expected 0 < target_accept_prob < 1, got {accept!r}")
        _settle(
            self,
            num_samples=num_samples,
            num_warmup=num_samples
            if self.num_warmup is None
            else check_int(self.num_warmup, "num_warmup", 0),
            num_chains=check_int(self.num_chains, "num_chains", 1),
            max_tree_depth=check_int(self.max_tree_depth, "max_tree_depth", 1),
        )

    def run(self, model: InverseProblemModel, *, progress: bool, chunk_size: int) -> MethodRun:
        latent, stats = _run_nuts(model, progress=progress, **_settings(self))
        return MethodRun(latent, stats=stats)

    def check(self, idata: Any, run: MethodRun) -> tuple[dict[str, Any], list[str]]:
        """Divergences, R-hat and ESS (:func:`~pyro_dlatent.inverse.health.run_health`)."""
        return run_health(idata, var_names=list(run.latent)), []


Method = MAP | SVI | NUTS
"""Any inference method object."""


def _progress(total: int, desc: str, enabled: bool) -> Any:
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def _optimize(svi: PyroSVI, steps: int, desc: str, progress: bool) -> np.ndarray:
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
    svi = PyroSVI(starts_model, guide, optim, Trace_ELBO())
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
    init: Any,
    steps: int,
    lr: float,
    lr_decay: float,
    num_particles: int,
    num_samples: int,
    chunk_size: int,
    progress: bool,
) -> tuple[dict[str, torch.Tensor], Any, np.ndarray]:
    autoguide = None
    start = init if isinstance(init, MAP) else None
    if start is not None:
        point, _, _, _ = _run_map(
            model,
            num_starts=start.num_starts,
            steps=start.steps,
            lr=start.lr,
            lr_decay=start.lr_decay,
            lbfgs_steps=start.lbfgs_steps,
            progress=progress,
        )
        point = {k: v[0, 0] for k, v in point.items()}
        if guide == "fullrank":
            potential, mode, covariance = _laplace(model, point, start.lbfgs_steps)
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
    svi = PyroSVI(model, autoguide, optim, elbo)
    # Restarts after a non-finite loss: the Laplace start can be too wide where the Hessian is
    # nearly singular (a weakly identified direction), so first a narrow guide at the MAP point;
    # a MAP point itself can sit where the gradient overflows, so then the prior median.
    restarts = []
    if start is not None and guide == "fullrank":
        restarts.append((f"the MAP with init_scale={init_scale}", init_fn))
    if start is not None:
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
            svi = PyroSVI(model, autoguide, optim, elbo)
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


def _recording_kernel(
    potential: LatentPotential, *, target_accept_prob: float, max_tree_depth: int, dense_mass: bool
) -> _RecordingNUTS:
    return _RecordingNUTS(
        potential_fn=potential,
        target_accept_prob=target_accept_prob,
        max_tree_depth=max_tree_depth,
        adapt_mass_matrix=True,
        full_mass=dense_mass,
    )


def _nuts_chain(
    potential: LatentPotential,
    start: torch.Tensor,
    seed: int,
    *,
    num_samples: int,
    num_warmup: int,
    progress: bool,
    **kernel: Any,
) -> tuple[torch.Tensor, dict[str, list]]:
    """One chain of the recording NUTS kernel: its draws ``(num_samples, dim)`` and statistics."""
    draws, diagnostics = nuts_chain(
        _recording_kernel(potential, **kernel),
        potential.site,
        start,
        seed,
        num_samples=num_samples,
        num_warmup=num_warmup,
        progress=progress,
    )
    return draws, {name: list(diagnostics[name]) for name in SAMPLE_STATS}


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
    num_processes: int | None,
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
    settings = {
        "num_samples": num_samples,
        "num_warmup": num_warmup,
        "target_accept_prob": target_accept_prob,
        "max_tree_depth": max_tree_depth,
        "dense_mass": dense_mass,
    }
    if mp_context is not None:  # Pyro's own multi-chain runner, as before chains.run_chains
        theta, stats = _run_nuts_pyro(potential, initial, mp_context, progress, settings)
    else:
        seeds = torch.randint(2**31, (num_chains,)).tolist()  # from the run's seed: same draws
        if model.observations.device.type != "cpu":  # chains run one after another on a GPU
            num_processes = 1
        chains = run_chains(
            lambda c: _nuts_chain(potential, initial[c], seeds[c], progress=progress, **settings),
            num_chains,
            num_processes=num_processes,
        )
        theta = torch.stack([draws for draws, _ in chains])
        stats = {name: np.asarray([chain[name] for _, chain in chains]) for name in SAMPLE_STATS}
    with torch.no_grad():
        constrained = potential.constrain(theta)
    return {k: constrained[k] for k in model.prior.latent_sites}, stats


def _run_nuts_pyro(
    potential: LatentPotential,
    initial: torch.Tensor,
    mp_context: str,
    progress: bool,
    settings: dict[str, Any],
) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """All chains in one ``pyro.infer.MCMC`` with a multiprocessing context (e.g. CUDA)."""
    num_chains = initial.shape[0]
    run = {k: settings[k] for k in ("num_samples", "num_warmup")}
    kernel = _recording_kernel(potential, **{k: v for k, v in settings.items() if k not in run})
    init = {potential.site: initial if num_chains > 1 else initial[0]}
    with warnings.catch_warnings():
        # On few cores Pyro runs the chains one after another and says so; that is expected.
        warnings.filterwarnings("ignore", message=".*Chains will be drawn sequentially.*")
        mcmc = MCMC(
            kernel,
            num_samples=run["num_samples"],
            warmup_steps=run["num_warmup"],
            num_chains=num_chains,
            initial_params=init,
            transforms={},
            disable_progbar=not progress,
            mp_context=mp_context,
        )
        mcmc.run()
    diagnostics = mcmc.diagnostics()
    stats = {
        name: np.asarray([diagnostics[name][f"chain {c}"] for c in range(num_chains)])
        for name in SAMPLE_STATS
    }
    return mcmc.get_samples(group_by_chain=True)[potential.site], stats
