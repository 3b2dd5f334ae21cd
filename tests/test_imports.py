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


APP_LAYER = {
    "pyro_dlatent.cli",
    "pyro_dlatent.runs",
    "pyro_dlatent.report",
    "pyro_dlatent.plots",
    "pyro_dlatent.demo",
    "pyro_dlatent.inverse.run",
}
"""The application layer: command line, run folders, reports, figures, the demo."""
SHIMS = {("pyro_dlatent.anomaly", "pyro_dlatent.plots")}
"""Old names kept for a release that forward to the app layer when (and only when) used."""


def _imported(path: Path, module: str) -> set[str]:
    """Every pyro_dlatent module a file imports, at any depth in it (lazy imports included)."""
    names = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in names if name.startswith("pyro_dlatent")}


def test_the_core_never_imports_the_application_layer():
    root = Path(pyro_dlatent.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if module in APP_LAYER:
            continue
        for name in sorted(_imported(path, module) & APP_LAYER):
            if (module, name) not in SHIMS:
                offenders.append(f"{module} imports {name}")
    assert not offenders, offenders
