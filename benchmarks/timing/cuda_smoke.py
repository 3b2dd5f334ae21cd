"""Every model verb once on a GPU: training, encoding, generation, sampling, tails, save/load.

Small data and one or two epochs: this checks that nothing in the hot paths is CPU-only (every
tensor that meets the networks lives on ``--device``) and that the results come back finite and
in the right shapes. Exits non-zero at the first failure. Run::

    python benchmarks/timing/cuda_smoke.py --device cuda
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pyro_dlatent.anomaly import fit_anomaly_detector
from pyro_dlatent.data import simulate
from pyro_dlatent.models.auxvae import AuxVAE
from pyro_dlatent.models.base import GuidedLatentModel
from pyro_dlatent.models.dlcfm import DLCFM

__all__ = ["main"]


def _check(name: str, value: torch.Tensor, shape: tuple[int, ...], device: str) -> None:
    if tuple(value.shape) != shape:
        raise AssertionError(f"{name}: shape {tuple(value.shape)}, expected {shape}")
    if value.device.type != torch.device(device).type:
        raise AssertionError(f"{name}: on {value.device}, expected {device}")
    if not torch.isfinite(value).all():
        raise AssertionError(f"{name}: non-finite values")
    print(f"ok {name} {tuple(value.shape)} on {value.device}", flush=True)


def _exercise(model: GuidedLatentModel, ds, device: str, folder: Path) -> None:
    name = type(model).__name__
    start = time.perf_counter()
    history = model.fit(ds, epochs=2, batch_size=64, device=device, progress=False)
    print(f"ok {name}.fit: 2 epochs in {time.perf_counter() - start:.1f} s, {history[-1]}")
    n, size = ds.sizes["sample"], ds.sizes["x"]
    encoding = model.encode(ds)
    _check(f"{name}.encode z_aux_loc", encoding.z_aux_loc, (n, model.aux_dim), device)
    predicted = model.predict_aux(ds)
    for aux in model.scaler.names:
        if not np.isfinite(predicted[aux].values).all():
            raise AssertionError(f"{name}.predict_aux: non-finite {aux}")
    print(f"ok {name}.predict_aux {sorted(predicted.data_vars)}")
    row = {aux: float(np.median(ds[aux].values)) for aux in model.scaler.names}
    images = model.generate(row, num=3, seed=0)
    _check(f"{name}.generate", images, (3, size, size), device)
    path = model.save(folder / f"{name}.pt")
    loaded = GuidedLatentModel.load(path, device=device)
    again = loaded.generate(row, num=3, seed=0)
    torch.testing.assert_close(again, images)
    print(f"ok {name} save/load on {device}: same images")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--num", type=int, default=256)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("cuda was asked for but torch sees no GPU")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sources = simulate("sources", args.num, size=32, seed=0)
        vae = AuxVAE.from_dataset(sources, width=16, hidden=64, seed=0)
        _exercise(vae, sources, args.device, folder)
        recon = vae.reconstruct(sources)
        _check("AuxVAE.reconstruct", recon, (args.num, 32, 32), args.device)

        halos = simulate("halos", args.num, size=32, seed=0)
        flow = DLCFM.from_dataset(halos, width=16, hidden=64, field_channels=8, seed=0)
        _exercise(flow, halos, args.device, folder)
        row = {aux: float(np.median(halos[aux].values)) for aux in flow.scaler.names}
        for method, steps in (("dopri5", None), ("rk4", 4), ("midpoint", 8)):
            images = flow.sample(row, num=2, method=method, steps=steps, seed=1)
            _check(f"DLCFM.sample[{method}]", images, (2, 32, 32), args.device)
        tails, z_rec = flow.sample_tails(row, num=2, quantile=0.99, seed=2)
        _check("DLCFM.sample_tails", tails, (2, 32, 32), args.device)
        detector = fit_anomaly_detector(flow.encode(halos).z_rec_loc.cpu().numpy())
        scores = detector.score(flow.encode(halos).z_rec_loc.cpu().numpy())
        if not np.isfinite(scores).all():
            raise AssertionError("anomaly scores: non-finite")
        print(f"ok anomaly scores for {len(scores)} maps; tail radius {z_rec.norm(dim=-1)}")
    print("all ok")


if __name__ == "__main__":
    main()
