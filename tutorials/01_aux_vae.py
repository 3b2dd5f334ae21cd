# %% [markdown]
# # Tutorial 1 — Aux-VAE: a latent space whose first coordinates mean something
#
# We simulate PDE source fields whose generating factors we know — the location `(x0, y0)`,
# log amplitude and width of a Gaussian bump — plus a Matérn random field that no auxiliary
# describes. An Aux-VAE learns a latent space split into
#
# * a **guided block** `z_aux` tethered to the four standardized auxiliaries,
#   `z_aux | u ~ N(u~, tau^2 I)`, and
# * a **residual block** `z_rec ~ N(0, I)` for the random-field residual.
#
# Then we traverse the latent space, look at aux-vs-latent scatter plots and read the alignment
# report. This file is a plain script in "percent" format: run it with `python`, or open it as a
# notebook with jupytext. Set `PYRO_DLATENT_FAST=1` for a quick version (the test suite does).
# The package draws matplotlib `Figure` objects without pyplot; in a notebook the
# `%matplotlib inline` line below (a comment when run as a script) shows a bare `fig` inline.

# %%
# %matplotlib inline
import json
import os
from pathlib import Path

import pyro
import torch

from pyro_dlatent import AuxVAE, data, plots
from pyro_dlatent.runs import explain, traversal_figure

FAST = os.environ.get("PYRO_DLATENT_FAST") == "1"
OUT = Path(os.environ.get("PYRO_DLATENT_OUT", "tutorial_01"))
OUT.mkdir(exist_ok=True)
pyro.set_rng_seed(0)

# %% [markdown]
# ## 1. Simulate
# Every dataset is an `xarray.Dataset`: an `image (sample, y, x)` variable and one variable per
# auxiliary, with units. Your own arrays go through `data.from_arrays` the same way.

# %%
num = 512 if FAST else 8192
ds = data.simulate("sources", num, size=32, seed=0)
held_out = data.simulate("sources", 256 if FAST else 2048, size=32, seed=1)
print(ds)
fig = plots.preview(ds, num=8)
plots.save_figure(fig, OUT / "preview.png")
fig

# %% [markdown]
# ## 2. Train
# `tau` is the knob between interpretable (small) and flexible (large). The alignment and
# decorrelation penalties are `pyro.factor` sites in the model, so `Trace_ELBO` optimizes
# ELBO + penalties while `history` still reports the ELBO alone.

# %%
vae = AuxVAE.from_dataset(ds, residual_dim=4, tau=0.1, seed=0)
history = vae.fit(ds, epochs=3 if FAST else 40, batch_size=128, seed=0, progress=not FAST)
last = history[-1]
print({k: round(v, 4) for k, v in last.items() if isinstance(v, float)})
fig = plots.training_history(history)  # explain() below saves it as history.png
fig

# %% [markdown]
# ## 3. Encode: the guided block estimates the auxiliaries, with uncertainty
# The encoder sees the image only, so `predict_aux` is an estimator of the physical variables.
# Its sd and quantiles were calibrated by `fit` on the images it held out for validation: the
# interval `[q05, q95]` should hold the truth of 90% of new images, and is wider for harder ones.

# %%
predicted = vae.predict_aux(held_out)
for name in vae.aux_names:
    truth = torch.as_tensor(held_out[name].values)
    r = torch.corrcoef(torch.stack([torch.as_tensor(predicted[name].values), truth]))[0, 1]
    lower = torch.as_tensor(predicted[f"{name}_q05"].values)
    upper = torch.as_tensor(predicted[f"{name}_q95"].values)
    covered = float(((lower <= truth) & (truth <= upper)).double().mean())
    sd = float(predicted[name + "_sd"].mean())
    print(f"{name:>14}: r = {r:.3f}, mean sd = {sd:.3g}, 90% interval covers {covered:.2f}")

# %% [markdown]
# ## 4. Generate at chosen physical values
# Auxiliaries go in physical units; the residual block is drawn from its prior.

# %%
images = vae.generate({"x0": 0.3, "y0": 0.7, "log_amplitude": 1.5, "width": 0.1}, num=4, seed=0)
fig = plots.image_grid(images.cpu().numpy(), nrows=1, ncols=4)
plots.save_figure(fig, OUT / "generated.png")
fig

# %% [markdown]
# ## 5. Explain: traversal, scatter, report
# `explain` writes the traversal (one row per latent coordinate, guided rows labelled in physical
# units), the aux-vs-latent scatter and `report.json` (per-auxiliary r and R², MCC, MIG, DCI, SAP,
# residual leakage, reconstruction error).

# %%
report = explain(vae, held_out, OUT)
print(
    json.dumps({k: report[k] for k in ("mcc", "leakage") if k in report}, indent=1, default=float)
)
vae.save(OUT / "model.pt", extra={"report": report})
reloaded = AuxVAE.load(OUT / "model.pt")
print("reloaded:", type(reloaded).__name__, reloaded.aux_names)
fig = traversal_figure(vae, steps=5)
plots.save_figure(fig, OUT / "traversal_small.png")
fig
