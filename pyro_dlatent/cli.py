"""The ``pyro-dlatent`` command line."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from pyro_dlatent.utils import write_netcdf

__all__ = ["app", "main"]

app = typer.Typer(
    help="Interpretable generative models with guided and residual latent blocks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

_STATE = {"debug": False}

_Overwrite = Annotated[bool, typer.Option(help="Replace existing results at --out.")]

_Weights = Annotated[
    str | None,
    typer.Option(
        help="Of a run trained with --ema-decay: averaged or live weights (default: averaged)."
    ),
]


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    _STATE["debug"] = debug


def _refuse_replacing(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise typer.BadParameter(
            f"{str(path)!r} exists; pass --overwrite to replace it", param_hint="--out"
        )


def _out_path(path: Path, overwrite: bool) -> Path:
    _refuse_replacing(path, overwrite)
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


@contextlib.contextmanager
def _torchrun_group(device: str | None) -> Iterator[str | None]:
    """Join the process group that ``torchrun`` describes (its ``WORLD_SIZE`` is set) for a block.

    gloo on the CPU; NCCL on CUDA, where each process takes the GPU of its ``LOCAL_RANK`` when
    ``device`` names none. Yields the device to train on; outside torchrun, ``device`` unchanged.
    """
    import torch
    import torch.distributed as dist

    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        yield device
        return
    backend = "gloo"
    if device is not None and torch.device(device).type == "cuda":
        backend = "nccl"
        if torch.device(device).index is None:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend)
    try:
        yield device
        # leave together: a process that tears its group down while process 0 still writes the
        # run's files can abort in gloo's teardown ("terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@app.command()
def train(
    data: Annotated[str, typer.Argument(help="Built-in dataset name or a .nc/.zarr file.")],
    out: Annotated[Path, typer.Option(help="Run folder (created).")],
    model: Annotated[str, typer.Option(help="Model: auxvae or dlcfm.")] = "auxvae",
    num: Annotated[int, typer.Option(help="Images to simulate (built-in data).")] = 2048,
    size: Annotated[int, typer.Option(help="Image side (built-in data).")] = 32,
    seed: Annotated[int, typer.Option(help="Seed of the data, the split and training.")] = 0,
    epochs: Annotated[int | None, typer.Option(help="Training epochs [model's default].")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Minibatch size [default].")] = None,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate [model's default].")] = None,
    ema_decay: Annotated[
        float | None,
        typer.Option(help="Decay of a moving average of the weights kept after training."),
    ] = None,
    residual_dim: Annotated[
        int | None, typer.Option(help="Residual latent dimension [model's default].")
    ] = None,
    tau: Annotated[
        float | None, typer.Option(help="Tether sd of the guided block [model's default].")
    ] = None,
    data_workers: Annotated[
        int | None,
        typer.Option(help="Processes reading a .nc/.zarr file chunk by chunk [fit's default]."),
    ] = None,
    device: Annotated[str | None, typer.Option(help="Device, e.g. cpu or cuda.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run in --out.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a run in --out.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Train a model; the run folder gets weights, history, report and figures.

    Options left out take the model's own defaults (the same as the Python API's), and the report
    is computed on the validation part the fit held out. A .nc/.zarr file is read chunk by chunk,
    never whole. Under ``torchrun`` the processes train data parallel (``--batch-size`` is the
    global batch) and process 0 writes the run folder.
    """
    from pyro_dlatent.runs import CHECKPOINT_DIR, open_dataset, process_rank, train_run

    if not out.parent.exists():
        raise typer.BadParameter(
            f"directory {str(out.parent)!r} does not exist", param_hint="--out"
        )
    ds = open_dataset(data, num=num, size=size, seed=seed, lazy=True)
    model_kwargs = {"residual_dim": residual_dim, "tau": tau}
    fit_kwargs = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "ema_decay": ema_decay}
    fit_kwargs["data_workers"] = data_workers
    with _torchrun_group(device) as device:
        try:
            train_run(
                ds,
                out,
                model=model,
                model_kwargs={
                    "seed": seed,
                    **{k: v for k, v in model_kwargs.items() if v is not None},
                },
                fit_kwargs={
                    "seed": seed,
                    "device": device,
                    "progress": progress,
                    **{k: v for k, v in fit_kwargs.items() if v is not None},
                },
                resume=resume,
                overwrite=overwrite,
            )
        except KeyboardInterrupt:
            typer.echo(
                f"pyro-dlatent: interrupted; completed epochs are in {out / CHECKPOINT_DIR}; "
                "rerun the same command with --resume to continue",
                err=True,
            )
            raise typer.Exit(130) from None
        if process_rank() == 0:
            typer.echo(f"trained {model} into {out}")


@app.command()
def traverse(
    model: Annotated[Path, typer.Argument(help="Run folder or model checkpoint.")],
    out: Annotated[Path, typer.Option(help="Figure path (.png, .pdf).")],
    data: Annotated[
        str | None, typer.Option(help="Dataset whose image --index is the base.")
    ] = None,
    index: Annotated[int, typer.Option(help="Image of --data encoded as the base code.")] = 0,
    span: Annotated[float, typer.Option(help="Each coordinate spans [-span, span].")] = 2.5,
    steps: Annotated[int, typer.Option(help="Panels per row.")] = 7,
    overwrite: _Overwrite = False,
    weights: _Weights = None,
) -> None:
    """Latent traversal figure: one row per coordinate, guided rows in physical units."""
    _out_path(out, overwrite)
    from pyro_dlatent import plots
    from pyro_dlatent.runs import load_model, open_dataset, traversal_figure

    net = load_model(model, weights=weights)
    base = None
    if data is not None:
        ds = open_dataset(data, size=net.image_size)
        if not 0 <= index < ds.sizes["sample"]:
            raise typer.BadParameter(f"must be in [0, {ds.sizes['sample']})", param_hint="--index")
        encoding = net.encode(ds["image"].values[index : index + 1])
        base = (encoding.z_aux_loc[0].cpu().numpy(), encoding.z_rec_loc[0].cpu().numpy())
    plots.save_figure(traversal_figure(net, span=span, steps=steps, base=base), out)
    typer.echo(f"wrote {out}")


@app.command()
def encode(
    model: Annotated[Path, typer.Argument(help="Run folder or model checkpoint.")],
    data: Annotated[str, typer.Argument(help="Built-in dataset name or a .nc/.zarr file.")],
    out: Annotated[Path, typer.Option(help="Output netCDF file.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
    weights: _Weights = None,
) -> None:
    """Encode images: predicted auxiliaries (physical units: mean, sd, 5/25/75/95% quantiles)."""
    from pyro_dlatent.runs import load_model, open_dataset

    _out_path(out, overwrite)
    net = load_model(model, weights=weights)
    ds = open_dataset(data, size=net.image_size)
    result = net.predict_aux(ds)
    encoding = net.encode(ds)
    result["z_aux"] = (("sample", "aux"), encoding.z_aux_loc.cpu().numpy())
    result["z_rec"] = (("sample", "residual"), encoding.z_rec_loc.cpu().numpy())
    result = result.assign_coords(aux=net.aux_names)
    calibrated = result.attrs.pop("calibrated")
    result.attrs["calibrated"] = " ".join(calibrated)  # netCDF keeps no list of one or none
    result.attrs["uncertainty"] = (
        "NAME_sd and the quantiles NAME_qPP of each auxiliary named in 'calibrated' are those "
        "of its predictive distribution calibrated on held-out images (NAME_q05 to NAME_q95 "
        "is a 90% interval); for any other auxiliary they are the guide's latent sd, not an "
        "error bar"
    )
    write_netcdf(result, out)
    typer.echo(f"wrote {out} ({ds.sizes['sample']} images)")


@app.command()
def invert(
    model: Annotated[Path, typer.Argument(help="Run folder or model checkpoint (the generator).")],
    out: Annotated[Path, typer.Option(help="Folder for posterior.nc, summary.json and figures.")],
    observations: Annotated[
        Path | None,
        typer.Option(help="Observations netCDF (default: a built-in synthetic problem)."),
    ] = None,
    method: Annotated[
        str,
        typer.Option(
            help="collapsed (the residual integrated out; calibrated against the exact posterior), "
            "map, svi or nuts (the full deep prior)."
        ),
    ] = "collapsed",
    num_samples: Annotated[
        int | None, typer.Option(help="Posterior draws (per chain for NUTS) [method's default].")
    ] = None,
    sampler: Annotated[
        str, typer.Option(help="Of --method collapsed: importance (default) or nuts.")
    ] = "importance",
    num_chains: Annotated[int | None, typer.Option(help="NUTS chains [default].")] = None,
    num_warmup: Annotated[
        int | None, typer.Option(help="NUTS warm-up steps per chain [default].")
    ] = None,
    target_accept: Annotated[
        float | None, typer.Option(help="NUTS target acceptance probability [default].")
    ] = None,
    max_tree_depth: Annotated[
        int | None, typer.Option(help="NUTS maximum tree depth [default].")
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="Optimization steps (MAP, SVI) [default].")
    ] = None,
    problem_seed: Annotated[int, typer.Option(help="Seed of the synthetic problem.")] = 12345,
    seed: Annotated[int, typer.Option(help="Seed of the inference.")] = 0,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    overwrite: _Overwrite = False,
    weights: _Weights = None,
) -> None:
    """Invert sensor data for a source field under the model's disentangled deep prior."""
    _refuse_replacing(out / "posterior.nc", overwrite)
    from pyro_dlatent.inverse.run import (
        invert_run,
        load_observations,
        save_observations,
        synthetic_observations,
    )
    from pyro_dlatent.runs import load_model, owned_folder

    if method not in ("collapsed", "map", "svi", "nuts"):
        raise typer.BadParameter(
            f"must be collapsed, map, svi or nuts, got {method!r}", param_hint="--method"
        )
    generator = load_model(model, weights=weights).generator()
    if observations is None:
        obs = synthetic_observations(size=generator.image_size, seed=problem_seed)
    else:
        obs = load_observations(observations)
    if sampler not in ("importance", "nuts"):
        raise typer.BadParameter(
            f"must be importance or nuts, got {sampler!r}", param_hint="--sampler"
        )
    kwargs: dict[str, Any] = {"num_samples": num_samples, "seed": seed, "progress": progress}
    nuts = {
        "num_chains": num_chains,
        "num_warmup": num_warmup,
        "target_accept_prob": target_accept,
        "max_tree_depth": max_tree_depth,
    }
    if method == "collapsed":
        kwargs["sampler"] = sampler
        if sampler == "nuts":
            kwargs.update(nuts)
    elif method == "nuts":
        kwargs.update(nuts)
    else:
        kwargs["steps"] = steps
    kwargs = {k: v for k, v in kwargs.items() if v is not None}  # left out: the API's default
    with owned_folder(out):
        save_observations(obs, out / "observations.nc")  # this posterior's data, not an older's
        invert_run(generator, obs, out, method=method, **kwargs)
    typer.echo(f"wrote the posterior and figures to {out}")


def _parse_aux(values: list[str] | None) -> dict[str, list[float]]:
    aux: dict[str, list[float]] = {}
    for item in values or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"expected name=value, got {item!r}", param_hint="--aux")
        try:
            aux.setdefault(name.strip(), []).append(float(value))
        except ValueError:
            raise typer.BadParameter(f"{value!r} is not a number", param_hint="--aux") from None
    return aux


def _save_images(images, path: Path, aux: dict[str, list[float]]) -> None:
    from pyro_dlatent import plots

    images = images.cpu().numpy()
    if path.suffix.lower() in (".nc", ".zarr"):
        import xarray as xr

        ds = xr.Dataset({"image": (("sample", "y", "x"), images)})
        ds.attrs["requested_aux"] = repr(aux)
        write_netcdf(ds, path)
    else:
        ncols = min(8, len(images))
        nrows = -(-len(images) // ncols)
        pad = nrows * ncols - len(images)
        if pad:
            import numpy as np

            images = np.concatenate([images, np.full((pad, *images.shape[1:]), np.nan)])
        plots.save_figure(plots.image_grid(images, nrows=nrows, ncols=ncols), path)


AuxOption = Annotated[
    list[str] | None,
    typer.Option(
        "--aux", help="Auxiliary in physical units, name=value (repeat; a name twice = 2 rows)."
    ),
]


@app.command()
def sample(
    model: Annotated[Path, typer.Argument(help="Run folder or model checkpoint.")],
    out: Annotated[Path, typer.Option(help="Images: .nc file or a figure (.png, .pdf).")],
    aux: AuxOption = None,
    num: Annotated[int, typer.Option(help="Images per auxiliary row.")] = 8,
    method: Annotated[
        str | None, typer.Option(help="ODE solver (DL-CFM): euler, midpoint, rk4, dopri5.")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Fixed solver steps (DL-CFM).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    overwrite: _Overwrite = False,
    weights: _Weights = None,
) -> None:
    """Generate images at auxiliaries given in physical units (others from their marginal)."""
    _out_path(out, overwrite)
    from pyro_dlatent.models import DLCFM
    from pyro_dlatent.runs import load_model

    net = load_model(model, weights=weights)
    requested = _parse_aux(aux)
    solver = {"method": method, "steps": steps} if isinstance(net, DLCFM) else {}
    images = net.generate(requested or None, num, seed=seed, **solver)
    _save_images(images, out, requested)
    typer.echo(f"wrote {len(images)} images to {out}")


@app.command()
def tails(
    model: Annotated[Path, typer.Argument(help="Run folder or DL-CFM checkpoint.")],
    out: Annotated[Path, typer.Option(help="Images: .nc file or a figure (.png, .pdf).")],
    aux: AuxOption = None,
    num: Annotated[int, typer.Option(help="Images.")] = 8,
    quantile: Annotated[
        float, typer.Option(help="Chi-square quantile of the residual radius.")
    ] = 0.99,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    overwrite: _Overwrite = False,
    weights: _Weights = None,
) -> None:
    """Images with the guided block fixed and the residual block in the tail of its prior."""
    _out_path(out, overwrite)
    from pyro_dlatent.runs import load_model

    net = load_model(model, weights=weights)
    if not hasattr(net, "sample_tails"):
        raise typer.BadParameter("residual tails need a DL-CFM model", param_hint="MODEL")
    requested = _parse_aux(aux)
    images, _ = net.sample_tails(requested, num, quantile=quantile, seed=seed)
    _save_images(images, out, requested)
    typer.echo(f"wrote {len(images)} residual-tail images to {out}")


@app.command()
def anomalies(
    model: Annotated[Path, typer.Argument(help="Run folder or model checkpoint.")],
    data: Annotated[str, typer.Argument(help="Dataset to rank: built-in name or .nc/.zarr file.")],
    out: Annotated[Path, typer.Option(help="Folder for anomalies.nc and anomalies.png.")],
    reference: Annotated[
        str | None, typer.Option(help="Reference dataset for calibration (default: DATA).")
    ] = None,
    top: Annotated[int, typer.Option(help="Images in the gallery.")] = 16,
    by: Annotated[
        str | None,
        typer.Option(
            help="Score against images of similar encoded AUX (a guided coordinate), in 8 bins."
        ),
    ] = None,
    views: Annotated[
        str,
        typer.Option(
            help="identity, or dihedral: average the score over each image's 8 rotations and "
            "reflections (for data without a preferred orientation)."
        ),
    ] = "identity",
    overwrite: _Overwrite = False,
    weights: _Weights = None,
) -> None:
    """Rank images by the Mahalanobis radius of their encoded residual block, with p-values."""
    _refuse_replacing(out / "anomalies.nc", overwrite)
    from pyro_dlatent import anomaly, plots
    from pyro_dlatent.runs import load_model, open_dataset, owned_folder

    if views not in anomaly.VIEWS:
        raise typer.BadParameter(
            f"expected one of {anomaly.VIEWS}, got {views!r}", param_hint="--views"
        )
    net = load_model(model, weights=weights)
    if by is not None and by not in net.scaler.names:
        raise typer.BadParameter(
            f"expected one of {net.scaler.names}, got {by!r}", param_hint="--by"
        )
    ds = open_dataset(data, size=net.image_size, seed=1)
    ref = ds if reference is None else open_dataset(reference, size=net.image_size)
    encoded = anomaly.encode_views(net, ds, views)
    encoded_ref = encoded if reference is None else anomaly.encode_views(net, ref, views)
    column = None if by is None else net.scaler.names.index(by)

    def condition(encoding: Any) -> Any:
        if column is None:
            return None
        return encoding.z_aux_loc[:, :, column].mean(dim=1).cpu().numpy()

    detector = anomaly.fit_anomaly_detector(
        encoded_ref.z_rec_loc.cpu().numpy(), condition=condition(encoded_ref)
    )
    extra = {name: ds[name].values for name in ds.data_vars if ds[name].dims == ("sample",)}
    table = anomaly.rank_anomalies(
        detector, encoded.z_rec_loc.cpu().numpy(), condition=condition(encoded), extra=extra
    )
    table.attrs.update(views=views, by=by or "")
    with owned_folder(out):
        write_netcdf(table, out / "anomalies.nc")
        fig = plots.anomaly_gallery(ds["image"].values, table, top_k=min(top, ds.sizes["sample"]))
        plots.save_figure(fig, out / "anomalies.png")
    typer.echo(f"ranked {ds.sizes['sample']} images into {out}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for data, figures, models and summary.json.")],
    fast: Annotated[bool, typer.Option(help="A small, quick version.")] = False,
    seed: Annotated[int, typer.Option(help="Random seed of every stage.")] = 0,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    overwrite: _Overwrite = False,
) -> None:
    """The main job on built-in data: simulate, train, explain, invert; results in --out."""
    from pyro_dlatent.demo import run_demo
    from pyro_dlatent.runs import owned_folder

    _refuse_replacing(out / "summary.json", overwrite)
    with owned_folder(out):
        run_demo(out, fast=fast, seed=seed, progress=progress)
    typer.echo(f"wrote results to {out} (see {out / 'summary.json'})")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turning errors into a one-line message and a non-zero exit code.

    ``--debug`` (before the subcommand) shows the full traceback instead.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        code = app(args=argv, prog_name="pyro-dlatent", standalone_mode=False)
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
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
