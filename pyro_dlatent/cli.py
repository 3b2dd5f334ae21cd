"""The ``pyro-dlatent`` command line."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["app", "main"]

app = typer.Typer(
    help="Interpretable generative models with guided and residual latent blocks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

_STATE = {"debug": False}


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    _STATE["debug"] = debug


def _out_path(path: Path, overwrite: bool) -> Path:
    if path.exists() and not overwrite:
        raise typer.BadParameter(
            f"{str(path)!r} exists; pass --overwrite to replace it", param_hint="--out"
        )
    if not path.parent.exists():
        raise typer.BadParameter(
            f"directory {str(path.parent)!r} does not exist", param_hint="--out"
        )
    return path


@app.command()
def simulate(
    name: Annotated[str, typer.Argument(help="Simulator: sources, halos or galaxies.")],
    out: Annotated[Path, typer.Option(help="Output file (.nc or .zarr).")],
    num: Annotated[int, typer.Option(help="Number of images.")] = 1024,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 32,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    preview: Annotated[
        Path | None, typer.Option(help="Preview figure path (default: next to --out, .png).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
) -> None:
    """Simulate a built-in dataset, write it to netCDF/zarr and save a preview figure."""
    from pyro_dlatent import data, plots

    _out_path(out, overwrite)
    ds = data.simulate(name, num, size=size, seed=seed)
    data.save(ds, out, overwrite=overwrite)
    preview_path = preview or out.with_suffix(".png")
    plots.save_figure(plots.preview(ds, title=f"{name}: first images"), preview_path)
    typer.echo(f"wrote {out} ({ds.sizes['sample']} images) and {preview_path}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for data, figures, models and summary.json.")],
    fast: Annotated[bool, typer.Option(help="A small, quick version.")] = False,
    seed: Annotated[int, typer.Option(help="Random seed of every stage.")] = 0,
) -> None:
    """The main job on built-in data: simulate, train, explain, invert; results in --out."""
    from pyro_dlatent.demo import run_demo

    run_demo(out, fast=fast, seed=seed)
    typer.echo(f"wrote results to {out} (see {out / 'summary.json'})")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turning errors into a one-line message and a non-zero exit code.

    ``--debug`` (before the subcommand) shows the full traceback instead.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        app(args=argv, prog_name="pyro-dlatent", standalone_mode=False)
    except typer.Exit as exc:
        return exc.exit_code
    except typer.TyperException as exc:
        if debug:
            traceback.print_exc()
        exc.show()
        return getattr(exc, "exit_code", 2)
    except (KeyboardInterrupt, typer.Abort):
        typer.echo("pyro-dlatent: interrupted", err=True)
        return 130
    except Exception as exc:
        if debug:
            traceback.print_exc()
        else:
            typer.echo(f"pyro-dlatent: error: {type(exc).__name__}: {exc}", err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
