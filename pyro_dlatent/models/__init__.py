"""Generative models on the guided/residual latent split."""
