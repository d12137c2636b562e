"""The DiT as a diffusers model: :class:`FuseDiTTransformer2DModel` (``ModelMixin``, ``ConfigMixin``).

One class holds deep fusion (FuseDiT) and the shallow-fusion baselines alike, as
:class:`~fusedit.models.dit.DiffusionTransformer` does: ``model_config["fusion"]`` says which. Its ``config.json``
carries every field of :class:`~fusedit.models.config.ModelConfig` (``model_config``, written generically from the
dataclass, so a field added later travels without a change here) and the geometry of the LLM it was built against
(``llm_geometry``): the model is rebuilt without reading the LLM. ``save_pretrained`` / ``from_pretrained`` are
diffusers' own (safetensors, sharded past ``max_shard_size``, ``torch_dtype``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders.peft import PeftAdapterMixin
from diffusers.models.modeling_utils import ModelMixin  # (diffusers also looks ModelMixin up in this module)

from fusedit.config import ConfigError, from_dict, to_dict
from fusedit.models.config import LLMGeometry, ModelConfig, resolve_model_config
from fusedit.models.dit import DiffusionTransformer


def model_config_from_dict(data: Mapping[str, Any] | None) -> ModelConfig:
    """A validated :class:`ModelConfig` from its dictionary (unknown keys are refused, missing ones default)."""
    return from_dict(ModelConfig, dict(data or {}), "model")


def llm_geometry_from_dict(data: Mapping[str, Any] | None) -> LLMGeometry:
    """The :class:`LLMGeometry` recorded in a transformer's config."""
    if not data:
        raise ConfigError("llm_geometry: missing; a FuseDiTTransformer2DModel needs the geometry of its LLM")
    fields = {f.name for f in dataclasses.fields(LLMGeometry)}
    if set(data) != fields:
        raise ConfigError(f"llm_geometry: got keys {sorted(data)}, expected {sorted(fields)}")
    return LLMGeometry(**dict(data))


class FuseDiTTransformer2DModel(DiffusionTransformer, ModelMixin, ConfigMixin, PeftAdapterMixin):  # type: ignore[misc]
    """The diffusion transformer (deep fusion or a shallow baseline) with diffusers' ``save_pretrained`` /
    ``from_pretrained``, and diffusers' LoRA adapters (``PeftAdapterMixin``: ``load_lora_adapter``,
    ``set_adapters``, ``fuse_lora``, ``unload_lora``).

    ``forward(x (B, C, H, W), timestep (B,) = σ·1000, context: TextContext) -> velocity (B, C_out, H, W)``, as
    :class:`~fusedit.models.dit.DiffusionTransformer`; the text context comes from the pipeline's text encoder.

    Args:
        model_config: every :class:`~fusedit.models.config.ModelConfig` field (missing ones take their defaults).
        llm_geometry: the :class:`~fusedit.models.config.LLMGeometry` of the LLM (heads, depth, widths).
    """

    _supports_gradient_checkpointing = False
    _no_split_modules = ["DiTBlock"]  # type: ignore[assignment]

    @register_to_config
    def __init__(self, model_config: dict | None = None, llm_geometry: dict | None = None):
        resolved = resolve_model_config(model_config_from_dict(model_config), llm_geometry_from_dict(llm_geometry))
        super().__init__(resolved)

    @classmethod
    def build(cls, config: ModelConfig, llm: LLMGeometry) -> FuseDiTTransformer2DModel:
        """A freshly initialised model of ``config`` for ``llm`` (as :func:`fusedit.models.dit.build_model` builds)."""
        return cls(model_config=to_dict(config), llm_geometry=dataclasses.asdict(llm))

    @classmethod
    def from_model(cls, model: DiffusionTransformer) -> FuseDiTTransformer2DModel:
        """The same network as ``model``, sharing its parameters and buffers (no copy, no second initialisation)."""
        if isinstance(model, cls):
            return model
        resolved = model.resolved
        with torch.device("meta"):
            converted = cls.build(resolved.config, resolved.llm)
        converted.load_state_dict(model.state_dict(), strict=True, assign=True)
        for name, parameter in model.named_parameters():
            converted.get_parameter(name).requires_grad_(parameter.requires_grad)
        return converted.train(model.training)

    @property
    def model_config(self) -> ModelConfig:
        """The model's :class:`ModelConfig`."""
        return self.resolved.config
