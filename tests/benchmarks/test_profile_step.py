"""``benchmarks/timing/profile_step.py`` profiles a fit epoch of each model (here on the CPU)."""

from __future__ import annotations

import json

from tests.conftest import run_script

__all__: list[str] = []


def test_a_small_cpu_profile_times_the_steps_and_names_the_operators(tmp_path, capsys):
    out, traces = tmp_path / "step.json", tmp_path / "traces"
    argv = ["--device", "cpu", "--num", "64", "--batch-size", "32", "--top", "4"]
    run_script("timing/profile_step.py", *argv, "--trace-dir", str(traces), "--output", str(out))
    result = json.loads(out.read_text())
    for name in ("auxvae", "dlcfm"):
        assert result[name]["steps"] == 2 and result[name]["step_ms"] > 0
        ops = result[name]["top_ops_ms_per_step"]
        assert len(ops) == 4 and any("conv" in op for op in ops)
        assert "linalg" not in " ".join(ops)  # post-fit work (the residual field) is left out
        assert json.loads((traces / f"{name}.json").read_text())["traceEvents"]
    assert "step " in capsys.readouterr().out
