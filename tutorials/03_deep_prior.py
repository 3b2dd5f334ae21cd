# %% [markdown]
# # Tutorial 3 — A disentangled deep prior for source identification
#
# The forward model is the elliptic PDE `-div(kappa grad y) = f` on the unit square with
# `y = 0` on the boundary, solved with P1 finite elements (scikit-fem) on the same node grid
# as the `sources` images. We observe `y` at 25 sensors with Gaussian noise and want the
# source `f`.
#
# The prior on `f` is the decoder of an Aux-VAE trained on `sources`:
#
# ```
# u ~ p(u)  (x0, y0, log_amplitude, width: physical units)
# z_aux | u ~ N(u~, tau^2 I),   z_rec ~ N(0, I),   f = G(z_aux, z_rec)
# d ~ N(H solve(f), sigma^2 I)
# ```
#
# so the posterior reads in two layers: the named parameters `u`, and the residual block.
# First the collapsed deep prior (the package's default: the residual integrated out as a
# Gaussian field, checked here against the exact posterior), then MAP, SVI and NUTS on the full
# deep prior through one entry point, read with ArviZ.
# Set `PYRO_DLATENT_FAST=1` for a quick version (the test suite does). In a notebook, the
# `%matplotlib inline` line below (a comment when run as a script) shows a bare `fig` inline.

# %%
# %matplotlib inline
import os
from pathlib import Path

import arviz as az
import numpy as np
import pyro
import torch

from pyro_dlatent import AuxVAE, data, plots
from pyro_dlatent.export import load_netcdf, save_netcdf
from pyro_dlatent.inverse import (
    MAP,
    NUTS,
    SVI,
    DeepPrior,
    ExactBumpPosterior,
    GRFPrior,
    SourceProblem,
    default_sensors,
    infer,
    infer_collapsed,
    simulate_observations,
)

FAST = os.environ.get("PYRO_DLATENT_FAST") == "1"
OUT = Path(os.environ.get("PYRO_DLATENT_OUT", "tutorial_03"))
OUT.mkdir(exist_ok=True)
pyro.set_rng_seed(0)

# %% [markdown]
# ## 1. Train the generator
# The deep prior is the frozen decoder of an Aux-VAE (tutorial 1 explains the training).

# %%
train = data.simulate("sources", 256 if FAST else 8192, size=32, seed=0)
vae = AuxVAE.from_dataset(train, residual_dim=4, seed=0)
vae.fit(train, epochs=2 if FAST else 40, seed=0, progress=not FAST)
generator = vae.generator()

# %% [markdown]
# ## 2. A held-out truth and its sensor data

# %%
truth_ds = data.simulate("sources", 1, size=32, seed=2024)
truth = torch.as_tensor(truth_ds["image"].values[0], dtype=torch.float64)
truth_u = np.array([float(truth_ds[n].values[0]) for n in generator.scaler.names])
sensors = default_sensors(5)
noise_sd = 0.02 * float(SourceProblem(32, sensors, 1.0).forward(truth).abs().max())
problem = SourceProblem(32, sensors, noise_sd)
observations = simulate_observations(problem, truth, seed=1)
print("noise sd:", noise_sd)

# %% [markdown]
# ## 3. The collapsed deep prior, against the exact posterior
# `vae.fit` ended by fitting a mean decoder to `E[f | u]` and measuring the Gaussian field it
# leaves in the training images; for this linear problem that field integrates out, and the
# posterior of `u` is importance sampling (a few seconds). The `sources` simulator is a bump
# plus a Matérn field, so here the exact posterior is known too.

# %%
collapsed = infer_collapsed(problem, generator, observations.numpy())
exact = ExactBumpPosterior(problem, observations.numpy())
draws = collapsed.idata.posterior["u"].values.reshape(-1, len(truth_u))
for j, name in enumerate(generator.scaler.names):
    print(
        f"{name:>14}: truth {truth_u[j]:.3f}  collapsed {draws[:, j].mean():.3f} "
        f"± {draws[:, j].std():.3f}  exact {exact.mean()[j]:.3f} ± {exact.sd()[j]:.3f}"
    )
print("health:", collapsed.health)

# %% [markdown]
# ## 4. The full deep prior: MAP, SVI and NUTS through one entry point
# `infer` takes a method object holding that method's own settings (`MAP`, `SVI`, `NUTS`);
# the method's name with keyword settings (`infer(..., "map", steps=...)`) works too.

# %%
prior = DeepPrior(generator)
steps = 100 if FAST else 2000
# in fast mode the generator and the step counts are too small for a good fit, so the misfit
# and convergence warnings are off there (warn=not FAST); the full tutorial keeps them
quiet = {"progress": False, "warn": not FAST}
map_result = infer(problem, prior, observations, MAP(steps=steps), **quiet)
svi = SVI(guide="fullrank", steps=steps, init=MAP(steps=min(steps, 500)))  # a MAP start
svi_result = infer(problem, prior, observations, svi, **quiet)
nuts = NUTS(
    num_samples=50 if FAST else 1000,
    num_warmup=50 if FAST else 1000,
    num_chains=2,
    max_tree_depth=6 if FAST else 10,  # fast mode: short trajectories, a rough posterior
    jit_compile=True,
)
nuts_result = infer(problem, prior, observations, nuts, progress=not FAST, warn=not FAST)
for result in (map_result, svi_result, nuts_result):
    mean = result.idata.field_summary["field_mean"].values
    error = np.linalg.norm(mean - truth.numpy()) / np.linalg.norm(truth.numpy())
    print(f"{result.method:>4}: relative L2 error of the posterior mean field = {error:.3f}")

# %% [markdown]
# ## 5. ArviZ: diagnostics work on the result unchanged
# `posterior` holds `u` (coordinate `aux` = physical names), `z_aux`, `z_rec`; `sample_stats`
# holds divergences, step size, tree depth, energy; `field_summary` the posterior mean and sd
# of the field on the mesh nodes. Everything round-trips through netCDF.

# %%
idata = nuts_result.idata
print(az.summary(idata, var_names=["u"]))
save_netcdf(idata, OUT / "posterior.nc")
idata = load_netcdf(OUT / "posterior.nc")
axes = az.plot_trace(idata, var_names=["u"])  # drawn with pyplot: a notebook shows it by itself
plots.save_figure(axes.ravel()[0].figure, OUT / "trace.png")
print("health:", nuts_result.health)

# %% [markdown]
# ## 6. Figures: fields, data fit, named parameters

# %%
field = idata.field_summary
fig = plots.posterior_fields(
    truth.numpy(), field["field_mean"].values, field["field_sd"].values, sensors=sensors
)
plots.save_figure(fig, OUT / "fields.png")
fig

# %%
predictive = idata.posterior_predictive["obs"].values.reshape(-1, len(sensors))
fig = plots.observed_vs_predicted(observations.numpy(), predictive.mean(0), predictive.std(0))
plots.save_figure(fig, OUT / "observed_vs_predicted.png")
fig

# %%
# the collapsed posterior of the named parameters, the exact one drawn over it
fig = plots.marginal_posteriors(
    draws, names=generator.scaler.names, truth=truth_u, reference=exact.sample(4000, 0)
)
plots.save_figure(fig, OUT / "marginals.png")
fig

# %% [markdown]
# ## 7. The Gaussian-random-field baseline, in closed form
# For the linear source problem a GRF prior gives a Gaussian posterior exactly. Its
# hyperparameters are fitted by maximum marginal likelihood; it does not know that sources are
# bumps, which is what the deep prior adds.

# %%
grf = GRFPrior(32, gamma=0.1, delta=10.0).fit_hyperparameters(problem, observations)
grf_mean, _ = grf.posterior(problem, observations)
grf_error = np.linalg.norm(grf_mean.numpy() - truth.numpy()) / np.linalg.norm(truth.numpy())
print(f"GRF posterior mean relative L2 error = {grf_error:.3f}")
