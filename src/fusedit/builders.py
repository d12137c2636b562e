"""Build a run's components from an :class:`~fusedit.experiment.ExperimentConfig`: model, text encoder, codec."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from fusedit.config import ConfigError
from fusedit.data.codec import load_codec
from fusedit.devices import check_device
from fusedit.experiment import ExperimentConfig
from fusedit.models.config import LLMGeometry
from fusedit.models.dit import DiffusionTransformer, build_model
from fusedit.text.encoder import TextEncoder
from fusedit.text.llm import load_llm_config


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` (checked: :class:`~fusedit.devices.DeviceError` when unusable), else CUDA when available, else
    CPU."""
    if device is not None:
        return check_device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Components:
    """The pieces every command needs: the DiT, the text encoder built for it, and the image codec."""

    model: DiffusionTransformer
    text_encoder: TextEncoder
    codec: object


def resolve_relative_paths(config: ExperimentConfig, base: Path | None) -> ExperimentConfig:
    """Make ``text.llm``/``text.tokenizer``/``data.vae`` that are relative to ``base`` (an exported folder, or the
    working directory of a training run) and exist there absolute; hub ids and absolute paths are kept."""
    if base is None:
        return config

    def fix(value: str | None) -> str | None:
        if value and not Path(value).is_absolute() and (base / value).exists():
            return str((base / value).resolve())
        return value

    text = replace(config.text, llm=fix(config.text.llm) or config.text.llm, tokenizer=fix(config.text.tokenizer))
    data = replace(config.data, vae=fix(config.data.vae))
    return replace(config, text=text, data=data)


def build_components(
    config: ExperimentConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Components:
    """Load the LLM named by ``config.text``, build the model for its geometry, and the codec of ``config.data``.

    ``dtype``: the DiT's parameter dtype (default float32; training uses autocast for bf16).
    """
    geometry = LLMGeometry.from_hf_config(load_llm_config(config.text.llm))
    model = build_model(config.model, geometry)
    text_encoder = TextEncoder.from_config(config.text, model.text_requirements(), device=device)
    model = model.to(device=device, dtype=dtype or torch.float32)
    codec = load_codec(config.data.vae, subfolder=config.data.vae_subfolder, device=device)
    return Components(model=model, text_encoder=text_encoder, codec=codec)


def check_training_size(config: ExperimentConfig, codec) -> None:
    """Raise :class:`~fusedit.config.ConfigError` unless ``data.resolution`` fits the model: a multiple of the patch
    size × the codec's spatial factor and, with a sin-cos position table, at most ``model.pos_embed_max_size``
    patches per side. Checked before training starts, so that a bad size is not found at the first step. A latent
    cache (``data.source: latents``) has its own size and does not read ``data.resolution``."""
    if config.data.source == "latents":
        return
    model, size = config.model, config.data.resolution
    multiple = model.patch_size * codec.spatial_factor
    if size % multiple:
        raise ConfigError(
            f"data.resolution: got {size}, expected a multiple of {multiple} (model.patch_size "
            f"{model.patch_size} × the codec's spatial factor {codec.spatial_factor})"
        )
    if not model.sincos_table_covers(size // multiple):
        raise ConfigError(
            f"data.resolution: got {size}, which is {size // multiple} patches per side, but the sin-cos "
            f"position table has model.pos_embed_max_size={model.pos_embed_max_size}; raise it or lower "
            f"the resolution"
        )
