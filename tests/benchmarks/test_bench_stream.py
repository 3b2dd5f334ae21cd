"""``benchmarks/timing/bench_stream.py`` runs end to end and reports what it measures."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_script

__all__: list[str] = []


@pytest.mark.slow  # three fresh interpreters, each importing torch
def test_small_run_writes_streams_and_compares(tmp_path, capsys):
    out = tmp_path / "stream.json"
    argv = ["--num", "600", "--chunk-size", "64", "--batch-size", "32", "--repeat", "1"]
    run_script("timing/bench_stream.py", *argv, "--conv-batches", "2", "--output", str(out))
    result = json.loads(out.read_text())
    assert result["write"]["seconds"] > 0 and result["write"]["store_mib"] > 0
    assert result["write"]["peak_rss_mib"] >= result["write"]["rss_after_imports_mib"]
    for name in ("memory", "stream"):
        assert result[name]["none"]["images_per_second"] > 0
        assert result[name]["conv"]["images_per_second"] > 0
        assert result[name]["peak_pss_mib"] > 0
    printed = capsys.readouterr().out
    for kind in ("none", "conv"):
        assert f"speedup = median of 'memory[{kind}]' / median of the row" in printed
