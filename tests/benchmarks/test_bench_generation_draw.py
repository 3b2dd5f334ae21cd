"""``benchmarks/bench_generation_draw.py`` runs end to end and reports what it times."""

from __future__ import annotations

import json

import torch

from tests.conftest import load_benchmark

__all__: list[str] = []

bench = load_benchmark("bench_generation_draw")


def test_small_run_times_both_draws_and_the_flow(tmp_path, capsys):
    out = tmp_path / "draw.json"
    argv = ["--table", "64", "--rows", "32", "--decode-rows", "2", "--size", "16"]
    result = bench.main([*argv, "--repeats", "1", "--output", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert all(seconds > 0 for seconds in result["seconds_per_row"].values())
    assert 0 < result["neighbour_share_of_a_map"] < 1
    for times in result["integration_seconds"].values():
        assert times["level_apart"] > 0 and times["coupled"] > 0
    assert set(result["level_apart_over_coupled"]) == {"batch", "one_with_gradient"}
    printed = capsys.readouterr().out
    assert "share of a generated map" in printed and "level apart / coupled RK4" in printed


def test_the_baseline_is_rk4_on_the_coupled_state():
    # a field without a mean head: sample_ode integrates the coupled state as the baseline does
    from pyro_dlatent.flow import ConditionalVectorField, sample_ode

    field = ConditionalVectorField(8, latent_dim=2, channels=4, embed_dim=8)
    z, x0 = torch.randn(3, 2), torch.randn(3, 8, 8)
    with torch.no_grad():
        assert torch.equal(bench.coupled_rk4(field, z, x0, 4), sample_ode(field, z, x0, "rk4", 4).x)
