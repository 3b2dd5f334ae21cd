"""Independent MCMC chains on as many processes as the machine allows, same draws either way.

Each chain is its own run, seeded by ``(seed, chain)``, so the draws do not depend on how the
chains are spread: :func:`run_chains` runs ``chain(c)`` for ``c = 0 .. num_chains - 1`` in this
process, or on ``min(num_chains, cores)`` forked worker processes, and returns the results in
chain order. Pyro's own ``MCMC(num_chains=...)`` keeps one core free and so runs every chain in
turn on a 2-core machine; chains here use both.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch

from pyro_dlatent.validation import check_int

__all__ = ["available_cores", "nuts_chain", "run_chains"]

_JOB: dict[str, Any] = {}  # the chain function, inherited by forked workers (never pickled)


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _run_one(chain: int) -> Any:
    torch.set_num_threads(1)  # one core per chain process: no oversubscription
    return _JOB["chain"](chain)


def nuts_chain(
    kernel: Any,
    site: str,
    start: torch.Tensor,
    seed: int,
    *,
    num_samples: int,
    num_warmup: int,
    progress: bool = False,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """One chain of a Pyro NUTS ``kernel`` on a potential over ``site`` started at ``start``.

    Returns the draws ``(num_samples, *start.shape)`` and the chain's ``MCMC.diagnostics()``
    entries (``"divergences"``, and a recording kernel's per-draw statistics) for chain 0.
    """
    from pyro import set_rng_seed
    from pyro.infer import MCMC

    mcmc = MCMC(
        kernel,
        num_samples=num_samples,
        warmup_steps=num_warmup,
        initial_params={site: start},
        transforms={},
        disable_progbar=not progress,
    )
    set_rng_seed(seed)
    mcmc.run()
    diagnostics = {
        name: value["chain 0"]
        for name, value in mcmc.diagnostics().items()
        if isinstance(value, dict) and "chain 0" in value
    }
    return mcmc.get_samples()[site], diagnostics


def run_chains(
    chain: Callable[[int], Any], num_chains: int, *, num_processes: int | None = None
) -> list[Any]:
    """``[chain(0), ..., chain(num_chains - 1)]``, computed on up to ``num_processes`` processes.

    ``num_processes=None`` takes ``min(num_chains, available_cores())``; 1 runs every chain
    here, one after another. Worker processes are forked (they inherit ``chain`` and its
    model without pickling them); where ``fork`` is not available the chains run here.
    """
    num_chains = check_int(num_chains, "num_chains", 1)
    if num_processes is None:
        num_processes = min(num_chains, available_cores())
    num_processes = min(check_int(num_processes, "num_processes", 1), num_chains)
    if num_processes == 1 or "fork" not in multiprocessing.get_all_start_methods():
        return [chain(c) for c in range(num_chains)]
    if _JOB:
        raise RuntimeError("run_chains is already running in this process")
    _JOB["chain"] = chain
    try:
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(num_processes, mp_context=context) as pool:
            return list(pool.map(_run_one, range(num_chains)))
    finally:
        _JOB.clear()
