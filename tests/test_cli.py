"""Tests for the command line: help, one-line errors, exit codes."""

from __future__ import annotations

import subprocess
import sys

from pyro_dlatent.cli import main


def test_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "simulate" in out and "demo" in out


def test_bad_option_gives_one_line_error_and_nonzero_exit(capsys, tmp_path):
    assert main(["simulate", "nope", "--out", str(tmp_path / "x.nc")]) == 1
    err = capsys.readouterr().err
    assert "name must be one of" in err and "Traceback" not in err
    assert main(["simulate", "sources", "--out", str(tmp_path / "missing" / "x.nc")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["simulate", "sources", "--out", str(tmp_path / "x.nc"), "--num", "abc"]) == 2
    assert main(["no-such-command"]) == 2


def test_debug_shows_traceback(capsys, tmp_path):
    assert main(["--debug", "simulate", "nope", "--out", str(tmp_path / "x.nc")]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_console_script_is_installed():
    result = subprocess.run(
        [sys.executable, "-m", "pyro_dlatent.cli", "simulate", "bad", "--out", "x.nc"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
