"""``benchmarks/bench_generation_draw.py`` runs end to end and reports what it times."""

from __future__ import annotations

import json

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
    assert "share of a generated map" in capsys.readouterr().out
