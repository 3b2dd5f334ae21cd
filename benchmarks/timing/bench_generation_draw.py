"""Time the costs of a generated map: the guided block's draw and the flow's integration.

``DLCFM.sample`` draws latent codes (``sample_latent``) and integrates the flow from them.
After ``calibrate_generation`` the guided block is drawn from the encoded calibration images
nearest to each request (``neighbours > 0``, the default) or from the fitted Gaussian map
(``neighbours=0``). This times, in one process and on the same model, the draw of ``--rows``
codes both ways against a table of ``--table`` calibration images, and the integration of the
flow (4 rk4 steps, the default solver) for ``--decode-rows`` of them, and prints the speedups
against the Gaussian draw (the baseline) and the neighbour draw's share of a generated map's
cost. It also times the mean-head field's integration with the level apart (what
:func:`~pyro_dlatent.flow.sample_ode` does for fixed-step solvers) against RK4 on the coupled
state (the baseline, same 16 U-Net evaluations, checked equal to ``sample_ode`` on a field
without a mean head before timing), for ``--decode-rows`` maps without gradients and for one map
with the gradient in its code, as the deep prior's HMC needs it. The networks are untrained
(timing does not depend on the weights); the table holds the encoded simulated maps. Medians
over ``--repeats`` rounds after one warm-up call (``_timing.measure``).
Run ``python benchmarks/timing/bench_generation_draw.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchdiffeq
from _timing import Timing, measure, print_ratios

from pyro_dlatent.data import aux_array, simulate
from pyro_dlatent.flow import ConditionalVectorField, sample_ode
from pyro_dlatent.models.dlcfm import DEFAULT_STEPS, DLCFM

__all__ = ["coupled_rk4", "main"]


def coupled_rk4(field: Any, z: torch.Tensor, x0: torch.Tensor, steps: int) -> torch.Tensor:
    """The baseline: RK4 with ``steps`` steps on the whole state, the level included."""
    grid = torch.linspace(0.0, 1.0, steps + 1)
    return torchdiffeq.odeint(
        lambda t, x: field(t, x, z),
        x0,
        grid[[0, -1]],
        method="rk4",
        options={"grid_constructor": lambda f, y, t: grid},
    )[-1]


def _check_baseline() -> None:
    """The baseline is RK4 on the coupled state: on a field without a mean head, ``sample_ode``."""
    field = ConditionalVectorField(8, latent_dim=2, channels=4, embed_dim=8)
    generator = torch.Generator().manual_seed(0)
    z, x0 = torch.randn(3, 2, generator=generator), torch.randn(3, 8, 8, generator=generator)
    with torch.no_grad():
        if not torch.equal(coupled_rk4(field, z, x0, 4), sample_ode(field, z, x0, "rk4", 4).x):
            raise RuntimeError("coupled_rk4 is not sample_ode's RK4 on a field without a mean head")


def _integration_timings(
    field: Any, z: torch.Tensor, x0: torch.Tensor, repeats: int, gradient: bool
) -> list[tuple[str, Timing]]:
    """Both integrations, timed (with ``gradient``, forward and backward in ``z``)."""
    ways = {
        "level_apart": lambda code: sample_ode(field, code, x0, "rk4", DEFAULT_STEPS).x,
        "coupled": lambda code: coupled_rk4(field, code, x0, DEFAULT_STEPS),
    }

    def run(way: Callable[[torch.Tensor], torch.Tensor]) -> None:
        code = z.clone().requires_grad_(gradient)
        with torch.set_grad_enabled(gradient):
            images = way(code)
            if gradient:
                images.sum().backward()

    return [(name, measure(lambda way=way: run(way), repeat=repeats)) for name, way in ways.items()]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns (and optionally writes) the timings."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", type=int, default=8192, help="calibration images")
    parser.add_argument("--rows", type=int, default=2048, help="latent codes drawn per round")
    parser.add_argument("--decode-rows", type=int, default=64, help="maps integrated per round")
    parser.add_argument("--size", type=int, default=32, help="pixels per side")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--output", type=Path, default=None, help="JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    _check_baseline()

    data = simulate("halos", args.table, size=args.size, seed=0)
    model = DLCFM.from_dataset(data, field_channels=16, seed=0)
    names = list(model.scaler.names)
    values = aux_array(data)
    rng = np.random.default_rng(1)
    rows = values[rng.integers(0, len(values), args.rows)]
    request = {name: rows[:, j] for j, name in enumerate(names)}
    few = {name: column[: args.decode_rows] for name, column in request.items()}

    draws = []
    for label, neighbours in (("gaussian_draw", 0), ("neighbour_draw", 16)):
        model.calibrate_generation(data, neighbours=neighbours)
        timing = measure(lambda: model.sample_latent(request, seed=0), repeat=args.repeats)
        draws.append((label, timing))
    print(f"draw of {args.rows} latent codes from a table of {args.table}:")
    print_ratios(draws, baseline="gaussian_draw")
    z_aux, z_rec = model.sample_latent(few, seed=0)
    with torch.no_grad():
        decode = measure(
            lambda: model.decode(z_aux, z_rec, seed=0), repeat=max(1, args.repeats // 2)
        )
    seconds = {**{label: timing.median for label, timing in draws}, "decode": decode.median}
    per_row = {
        "gaussian_draw": seconds["gaussian_draw"] / args.rows,
        "neighbour_draw": seconds["neighbour_draw"] / args.rows,
        "decode": seconds["decode"] / args.decode_rows,
    }
    z = torch.cat([z_aux, z_rec], dim=-1)
    x0 = torch.randn(
        (args.decode_rows, args.size, args.size), generator=torch.Generator().manual_seed(0)
    )
    integrations = {
        f"{args.decode_rows} maps": (
            "batch",
            _integration_timings(model.field, z, x0, max(1, args.repeats // 2), False),
        ),
        "one map, with the gradient in its code": (
            "one_with_gradient",
            _integration_timings(model.field, z[:1], x0[:1], args.repeats, True),
        ),
    }
    level = {}
    for title, (key, rows_) in integrations.items():
        print(f"integration of {title}:")
        print_ratios(rows_, baseline="coupled")
        level[key] = {name: timing.median for name, timing in rows_}
    result = {
        "settings": vars(args) | {"output": str(args.output) if args.output else None},
        "platform": platform.platform(),
        "seconds_per_row": per_row,
        "neighbour_over_gaussian": per_row["neighbour_draw"] / per_row["gaussian_draw"],
        "neighbour_share_of_a_map": per_row["neighbour_draw"]
        / (per_row["neighbour_draw"] + per_row["decode"]),
        "integration_seconds": level,
        "level_apart_over_coupled": {
            name: times["level_apart"] / times["coupled"] for name, times in level.items()
        },
    }
    for key, value in per_row.items():
        print(f"{key:>15}: {value * 1e3:9.4f} ms per row")
    print(f"neighbour draw's share of a generated map: {result['neighbour_share_of_a_map']:.2%}")
    if args.output is not None:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
