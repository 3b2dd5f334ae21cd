"""Run folders: the CLI trains the API's model, reports on held-out images, and owns its folder."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest

from pyro_dlatent import cli, data
from pyro_dlatent.cli import main
from pyro_dlatent.models.auxvae import AuxVAEConfig
from pyro_dlatent.models.base import GuidedLatentModel
from pyro_dlatent.runs import RunFolderBusy, owned_folder, run_lock
from pyro_dlatent.utils import write_json

SMALL = ["--num", "64", "--size", "16", "--epochs", "1", "--batch-size", "32", "--no-progress"]


def test_train_options_default_to_the_models_own_defaults():
    # `pyro-dlatent train` used to pass tau=0.1 and lr=1e-3 over the model's 0.05 and 3e-3.
    options = inspect.signature(cli.train).parameters
    for name in ("epochs", "batch_size", "lr", "ema_decay", "residual_dim", "tau"):
        assert options[name].default is None, name


@pytest.mark.parametrize("command", ["train", "invert", "sample", "encode"])
def test_cli_options_that_the_api_has_leave_its_default(command):
    # an option the API also takes defaults to None ("the API's default") or to the API's value
    from pyro_dlatent.inverse.collapsed import infer_collapsed
    from pyro_dlatent.inverse.infer import infer

    api = {
        **inspect.signature(infer).parameters,
        **inspect.signature(infer_collapsed).parameters,
        **inspect.signature(GuidedLatentModel.fit).parameters,
    }
    options = {f.name: f.default for f in dataclasses.fields(AuxVAEConfig)}
    aliases = {"target_accept": "target_accept_prob"}
    for name, option in inspect.signature(getattr(cli, command)).parameters.items():
        key = aliases.get(name, name)
        if key not in api and key not in options:
            continue
        if name in ("seed", "progress", "device", "method", "resume"):
            continue  # the CLI's own: a fixed seed, bars on a terminal, a flag for resume=None
        theirs = api[key].default if key in api else options[key]
        assert option.default is None or option.default == theirs, (command, name)


def test_train_builds_the_api_model_and_reports_on_the_validation_part(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "sources", "--out", str(run), *SMALL]) == 0
    net = GuidedLatentModel.load(run / "model.pt")
    defaults = AuxVAEConfig()
    assert net.config["tau"] == defaults.tau
    assert net.residual_dim == defaults.residual_dim
    report = json.loads((run / "report.json").read_text())
    ds = data.simulate("sources", 64, size=16, seed=0)
    assert report["n"] == data.split(ds, 0.1, seed=0)[1].sizes["sample"]
    assert not (run / ".lock").exists()


def test_an_interrupted_run_is_never_restarted_without_resume_or_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"an interrupted run's epochs")
    assert main(["train", "sources", "--out", str(run), *SMALL]) == 1
    assert "--resume" in capsys.readouterr().err
    assert (run / "checkpoints" / "last.pt").read_bytes() == b"an interrupted run's epochs"


def test_a_second_writer_fails_at_once_naming_the_holder(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    with run_lock(run):
        assert main(["train", "sources", "--out", str(run), *SMALL]) == 1
        err = capsys.readouterr().err
        assert "RunFolderBusy" in err and "in use by process" in err
        with pytest.raises(RunFolderBusy):
            with run_lock(run):
                pass
    assert not (run / "model.pt").exists()


def test_a_lock_left_by_a_crash_is_reported_and_taken_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("999999")  # a holder that died without releasing it
    with pytest.warns(UserWarning, match="999999 ended without releasing"):
        with run_lock(run):
            assert (run / ".lock").read_text().strip().isdigit()


def test_a_failed_command_removes_the_folder_it_created(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "sources", "--out", str(run), "--model", "bogus", *SMALL]) == 1
    assert not run.exists()


def test_demo_keeps_an_earlier_demo_unless_told(tmp_path, capsys):
    (tmp_path / "summary.json").write_text("{}")
    assert main(["demo", "--out", str(tmp_path), "--fast", "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "summary.json").read_text() == "{}"


def test_resume_removes_what_a_kill_during_a_write_left(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "sources", "--out", str(run), *SMALL]) == 0
    strays = [run / "checkpoints" / ".last.pt.k1ll3d.tmp", run / ".history.json.k1ll3d.tmp"]
    for stray in strays:
        stray.write_bytes(b"\0" * 4096)  # half-written files of a killed write
    two_epochs = [a if a != "1" else "2" for a in SMALL]
    assert main(["train", "sources", "--out", str(run), "--resume", *two_epochs]) == 0
    assert not any(stray.exists() for stray in strays)
    assert len(json.loads((run / "history.json").read_text())) == 2


def test_two_processes_on_one_run_folder(tmp_path):
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys, time; from pyro_dlatent.runs import run_lock\n"
            f"with run_lock({str(run)!r}):\n    print('held', flush=True); time.sleep(60)"
        )],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.perf_counter()
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "pyro_dlatent.cli",
                "train",
                "sources",
                "--out",
                str(run),
                *SMALL,
            ],
            capture_output=True,
            text=True,
        )
        assert second.returncode == 1
        assert f"in use by process {holder.pid}" in second.stderr
        assert time.perf_counter() - start < 30  # at once, not after the holder's minute
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: the OS released its lock, and the next run reports and takes it
    assert main(["train", "sources", "--out", str(run), *SMALL]) == 0


def test_a_refused_resume_keeps_the_runs_settings(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "sources", "--out", str(run), *SMALL]) == 0
    settings = (run / "run.json").read_text()
    changed = ["--batch-size" if a == "--batch-size" else a for a in SMALL]
    changed[changed.index("--batch-size") + 1] = "16"  # another fit: resume is refused
    assert main(["train", "sources", "--out", str(run), "--resume", *changed]) == 1
    assert (run / "run.json").read_text() == settings


def test_a_failed_command_puts_an_existing_folder_back_as_it_was(tmp_path):
    out = tmp_path / "inv"
    (out / "figures").mkdir(parents=True)
    (out / "summary.json").write_text('{"old": true}')
    (out / "figures" / "fields.png").write_bytes(b"old figure")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(RuntimeError, match="midway"), owned_folder(out):
        write_json({"new": True}, out / "summary.json")  # replaced (atomically)
        (out / "posterior.nc").write_bytes(b"half")  # added
        (out / "new").mkdir()
        (out / "new" / "x.png").write_bytes(b"added")
        raise RuntimeError("failed midway")
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert not (out / "new").exists()
    assert not list(out.glob(".before-*"))  # no snapshot left behind


def test_a_command_that_succeeds_keeps_its_files_and_no_snapshot(tmp_path):
    out = tmp_path / "inv"
    out.mkdir()
    (out / "summary.json").write_text('{"old": true}')
    with owned_folder(out):
        write_json({"new": True}, out / "summary.json")
    assert json.loads((out / "summary.json").read_text()) == {"new": True}
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]


def test_a_failed_resume_keeps_what_keep_says_is_worth_keeping(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text("{}")
    with pytest.raises(RuntimeError), owned_folder(out, keep=lambda: True):
        (out / "last.pt").write_bytes(b"checkpoint")
        raise RuntimeError("killed")
    assert (out / "last.pt").read_bytes() == b"checkpoint"
