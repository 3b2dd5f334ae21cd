"""Importing the package, and drawing its figures, leave the user's matplotlib alone."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pyro_dlatent

SCRIPT = textwrap.dedent(
    """
    import importlib, pkgutil, sys
    import matplotlib

    def refuse(*args, **kwargs):
        raise AssertionError(f"matplotlib.use{args} called")

    matplotlib.use = refuse
    before = dict.__getitem__(matplotlib.rcParams, "backend")
    import pyro_dlatent
    for info in pkgutil.walk_packages(pyro_dlatent.__path__, "pyro_dlatent."):
        importlib.import_module(info.name)
    import numpy as np
    from pyro_dlatent import plots

    fig = plots.image_grid(np.zeros((2, 4, 4)), nrows=1, ncols=2)
    plots.save_figure(fig, sys.argv[1])
    after = dict.__getitem__(matplotlib.rcParams, "backend")
    assert after is before or after == before, (before, after)
    print("ok")
    """
)


def test_import_and_figures_leave_the_backend_alone(tmp_path, monkeypatch):
    monkeypatch.delenv("MPLBACKEND", raising=False)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "grid.png")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_no_module_imports_pyplot():
    """Figures are ``matplotlib.figure.Figure`` objects made directly (``plots.subplots``)."""
    offenders = []
    for path in Path(pyro_dlatent.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{alias.name}" for alias in node.names]
            if any(name.startswith(("matplotlib.pyplot", "matplotlib.use")) for name in names):
                offenders.append(path.name)
            if isinstance(node, ast.Attribute) and node.attr == "use":
                if isinstance(node.value, ast.Name) and node.value.id == "matplotlib":
                    offenders.append(path.name)
    assert offenders == []
