"""Build a run's components from an :class:`~fusedit.experiment.ExperimentConfig`: model, text encoder, codec."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Union

import torch

from fusedit.experiment import ExperimentConfig
from fusedit.models import DiffusionTransformer, LLMGeometry, build_model
from fusedit.text.encoder import TextEncoder
from fusedit.text.llm import load_llm_config


@dataclass
class Components:
    """The pieces every command needs: the DiT, the text encoder built for it, and the image codec."""

    model: DiffusionTransformer
    text_encoder: TextEncoder
    codec: object


def resolve_relative_paths(config: ExperimentConfig, base: Optional[Path]) -> ExperimentConfig:
    """Make ``text.llm``/``text.tokenizer``/``data.vae`` that are relative to ``base`` (an exported folder, or the
    working directory of a training run) and exist there absolute; hub ids and absolute paths are kept."""
    if base is None:
        return config

    def fix(value: Optional[str]) -> Optional[str]:
        if value and not Path(value).is_absolute() and (base / value).exists():
            return str((base / value).resolve())
        return value

    text = replace(config.text, llm=fix(config.text.llm), tokenizer=fix(config.text.tokenizer))
    data = replace(config.data, vae=fix(config.data.vae))
    return replace(config, text=text, data=data)


def build_components(config: ExperimentConfig, device: Union[str, torch.device] = "cpu",
                     dtype: Optional[torch.dtype] = None) -> Components:
    """Load the LLM named by ``config.text``, build the model for its geometry, and the codec of ``config.data``.

    ``dtype``: the DiT's parameter dtype (default float32; training uses autocast for bf16).
    """
    from fusedit.data.codec import load_codec

    geometry = LLMGeometry.from_hf_config(load_llm_config(config.text.llm))
    model = build_model(config.model, geometry)
    text_encoder = TextEncoder.from_config(config.text, model.text_requirements(), device=device)
    model = model.to(device=device, dtype=dtype or torch.float32)
    codec = load_codec(config.data.vae, subfolder=config.data.vae_subfolder, device=device)
    return Components(model=model, text_encoder=text_encoder, codec=codec)
