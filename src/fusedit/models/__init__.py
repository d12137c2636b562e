"""Diffusion transformers: deep fusion (FuseDiT) and the shallow-fusion baselines."""
