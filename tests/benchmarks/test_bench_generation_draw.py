"""``benchmarks/timing/bench_generation_draw.py`` runs end to end and reports what it times."""

from __future__ import annotations

import json

from tests.conftest import run_script

__all__: list[str] = []


def test_small_run_times_both_draws_and_the_flow(tmp_path, capsys):
    out = tmp_path / "draw.json"
    argv = ["--table", "64", "--rows", "32", "--decode-rows", "2", "--size", "16"]
    run_script("timing/bench_generation_draw.py", *argv, "--repeats", "1", "--output", str(out))
    result = json.loads(out.read_text())
    assert all(seconds > 0 for seconds in result["seconds_per_row"].values())
    assert 0 < result["neighbour_share_of_a_map"] < 1
    for times in result["integration_seconds"].values():
        assert times["level_apart"] > 0 and times["coupled"] > 0
    assert set(result["level_apart_over_coupled"]) == {"batch", "one_with_gradient"}
    printed = capsys.readouterr().out
    assert "share of a generated map" in printed
    for baseline in ("gaussian_draw", "coupled"):  # the speedups against each baseline
        assert f"speedup = median of {baseline!r} / median of the row" in printed
