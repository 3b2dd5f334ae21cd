"""Disentangled deep priors for Bayesian inverse problems on an elliptic PDE."""
