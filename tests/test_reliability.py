"""Determinism and interrupted runs: same seed, same result; Ctrl-C leaves a resumable run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pyro_dlatent import AuxVAE, data
from pyro_dlatent.inverse import DeepPrior, SourceProblem, default_sensors, infer


def _fit(ds, seed):
    vae = AuxVAE.from_dataset(ds, residual_dim=2, width=8, hidden=32, seed=seed)
    vae.fit(ds, epochs=2, batch_size=32, seed=seed, progress=False)
    return vae


def test_same_seed_same_weights_and_posterior_samples():
    ds = data.simulate("sources", 96, size=16, seed=0)
    first, second, other = _fit(ds, 0), _fit(ds, 0), _fit(ds, 1)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not all(
        torch.equal(a, b)
        for a, b in zip(first.state_dict().values(), other.state_dict().values(), strict=True)
    )
    problem = SourceProblem(16, default_sensors(3), 0.05)
    observations = problem.forward(torch.as_tensor(ds["image"].values[0], dtype=torch.float64))
    prior = DeepPrior(first.generator())
    kwargs = {
        "num_samples": 20,
        "num_warmup": 20,
        "num_chains": 1,
        "max_tree_depth": 3,
        "progress": False,
        "warn": False,
    }
    draws = [infer(problem, prior, observations, seed=7, **kwargs).samples for _ in range(2)]
    for site in ("u", "z_aux", "z_rec"):
        assert torch.equal(draws[0][site], draws[1][site]), site


@pytest.mark.slow
def test_ctrl_c_during_training_leaves_a_resumable_run(tmp_path):
    run = tmp_path / "run"
    command = [
        sys.executable, "-m", "pyro_dlatent.cli", "train", "sources", "--out", str(run),
        "--num", "2048", "--size", "16", "--epochs", "6", "--batch-size", "64", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A shell that starts jobs in the background (as CI runners may) hands them SIGINT ignored,
    # and Python then installs no KeyboardInterrupt handler: give the child the default back.
    proc = subprocess.Popen(
        command,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    checkpoint = run / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert checkpoint.exists(), "no epoch checkpoint appeared"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    assert not (run / "model.pt").exists()
    saved = checkpoint.read_bytes()
    again = subprocess.run(command, capture_output=True, text=True, env=env)  # no --resume
    assert again.returncode == 1 and "--resume" in again.stderr
    assert checkpoint.read_bytes() == saved  # the completed epochs are kept

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(6))
