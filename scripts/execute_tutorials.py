"""Execute the tutorials (jupytext percent scripts) into notebooks for the documentation site.

The scripts in ``tutorials/`` stay the source of truth; this writes ``docs/tutorials/NAME.ipynb``
(a build artefact, git-ignored) with every cell's outputs, figures included. Each tutorial runs in
its fast mode (``PYRO_DLATENT_FAST=1``) in a fresh kernel whose working directory and
``PYRO_DLATENT_OUT`` are a temporary folder, so nothing is written into the repository but the
notebook. A cell that raises stops the build with the cell's traceback, and so does a cell that
writes to stderr (a warning would be printed on the page): ``--allow-stderr`` keeps such output.

Usage: ``python scripts/execute_tutorials.py [NAME ...]`` (default: every ``tutorials/NN_*.py``).
``--full`` runs the full versions instead (tens of minutes each on a CPU).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from traitlets.config import Config

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ROOT / "tutorials"
TARGET = ROOT / "docs" / "tutorials"


def tutorials(names: list[str]) -> list[Path]:
    """The tutorial scripts to execute: all of them, or those whose stem starts with a name."""
    found = sorted(SOURCES.glob("[0-9][0-9]_*.py"))
    if not names:
        return found
    chosen = [p for p in found if any(p.stem.startswith(n) for n in names)]
    missing = [n for n in names if not any(p.stem.startswith(n) for p in found)]
    if missing:
        raise SystemExit(f"no tutorial named {', '.join(missing)} in tutorials/")
    return chosen


def execute(source: Path, *, fast: bool, timeout: int) -> nbformat.NotebookNode:
    """Read ``source`` as a notebook and run it in a fresh kernel in a temporary folder."""
    notebook = jupytext.read(source)
    with tempfile.TemporaryDirectory(prefix=f"{source.stem}_") as work:
        os.environ["PYRO_DLATENT_FAST"] = "1" if fast else "0"
        os.environ["PYRO_DLATENT_OUT"] = str(Path(work) / "out")
        # the kernel talks over local sockets in the temporary folder, not TCP on localhost;
        # the client starts it and shuts it down when the notebook is done or has failed
        sockets = {"KernelManager": {"transport": "ipc", "ip": str(Path(work) / "kernel")}}
        client = NotebookClient(
            notebook,
            kernel_name="python3",
            config=Config(sockets),
            timeout=timeout,
            resources={"metadata": {"path": work}},
        )
        client.execute()
    # outputs only: drop the kernel's timing metadata so a rebuild differs only where outputs do
    for cell in notebook.cells:
        seconds = cell_seconds(cell.metadata.pop("execution", {}))
        if seconds >= 10:  # where the build's time goes
            print(f"  {seconds:5.0f} s  {cell.source.strip().splitlines()[0][:70]}")
    notebook.metadata["kernelspec"] = {
        "display_name": "Python 3",
        "language": "python",
        "name": "python3",
    }
    return notebook


def cell_seconds(timing: dict) -> float:
    """A cell's run time from the timestamps nbclient records, 0 without them."""
    try:
        start = datetime.fromisoformat(timing["iopub.execute_input"])
        return (datetime.fromisoformat(timing["shell.execute_reply"]) - start).total_seconds()
    except (KeyError, TypeError, ValueError):
        return 0.0


def stderr_outputs(notebook: nbformat.NotebookNode) -> list[str]:
    """``cell N: first line`` of each stderr stream in the notebook's outputs."""
    found = []
    for number, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stderr":
                text = output.get("text", "").strip()
                found.append(f"cell {number}: {text.splitlines()[0] if text else ''}")
    return found


def main(argv: list[str] | None = None) -> int:
    sys.stdout.reconfigure(line_buffering=True)  # progress lines in order with the kernel's log
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="tutorial name prefixes, e.g. 01 02_dl_cfm")
    parser.add_argument("--full", action="store_true", help="run the full, not the fast version")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell (1800)")
    parser.add_argument(
        "--allow-stderr", action="store_true", help="keep cells that wrote to stderr"
    )
    args = parser.parse_args(argv)
    TARGET.mkdir(parents=True, exist_ok=True)
    for source in tutorials(args.names):
        start = time.perf_counter()
        print(f"executing tutorials/{source.name} ...")
        try:
            notebook = execute(source, fast=not args.full, timeout=args.timeout)
        except CellExecutionError as error:
            print(f"tutorials/{source.name} failed:\n{error}", file=sys.stderr)
            return 1
        target = TARGET / f"{source.stem}.ipynb"
        nbformat.write(notebook, target)
        if (stderr := stderr_outputs(notebook)) and not args.allow_stderr:
            lines = "\n  ".join(stderr)
            print(f"tutorials/{source.name} wrote to stderr:\n  {lines}", file=sys.stderr)
            return 1
        figures = sum(
            "image/png" in output.get("data", {})
            for cell in notebook.cells
            if cell.cell_type == "code"
            for output in cell.outputs
        )
        elapsed = time.perf_counter() - start
        print(f"  wrote docs/tutorials/{target.name}: {figures} figures, {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
