"""Diffusion transformers: deep fusion (FuseDiT) and the shallow-fusion baselines.

:mod:`~fusedit.models.config` (``ModelConfig``, resolution against the LLM), :mod:`~fusedit.models.dit`
(``DiffusionTransformer``, ``build_model``), and their parts: :mod:`~fusedit.models.fusion` (the text paths),
:mod:`~fusedit.models.attention`, :mod:`~fusedit.models.positions`, :mod:`~fusedit.models.timestep`,
:mod:`~fusedit.models.layers`.
"""
