"""Diffusion transformers: deep fusion (FuseDiT) and the shallow-fusion baselines."""
from __future__ import annotations

from fusedit.models.config import LLMGeometry, ModelConfig, ResolvedModelConfig, resolve_model_config
from fusedit.models.dit import DiffusionTransformer


def build_model(config: ModelConfig, llm: LLMGeometry) -> DiffusionTransformer:
    """Resolve ``config`` against the LLM's geometry (raising ``ConfigError`` on invalid combinations) and build."""
    return DiffusionTransformer(resolve_model_config(config, llm))


__all__ = ["DiffusionTransformer", "LLMGeometry", "ModelConfig", "ResolvedModelConfig", "build_model",
           "resolve_model_config"]
