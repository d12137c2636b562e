"""Import of pipeline folders saved by the reference implementation (tang-bd/fuse-dit).

Folder layout (``docs/design.md``, "Reference checkpoints"): ``model_index.json``, ``transformer/config.json``
(transformers-style, with a nested
``base_config`` — the LLM's config) + ``transformer/model.safetensors`` (``llm.*``: the Gemma decoder of FuseDiT;
``dit.*``: the DiT), ``scheduler/``, ``tokenizer/``, ``vae/``, and for the shallow baselines ``llm/`` (a full
``save_pretrained`` causal LM).

The reference's fused layers compute the LLM stream's attention without Gemma 2's logit soft-capping and sliding
window; the imported text encoder does the same (``text.attention: reference``). Its training-time computation is
followed where its cached sampling differs (same section).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from fusedit.models.config import LLMGeometry, ModelConfig
from fusedit.models.dit import DiffusionTransformer, build_model
from fusedit.text.config import TextConfig
from fusedit.text.llm import LLMLoadError, extract_decoder, load_llm_config, load_tokenizer, reference_attention_config


class ReferenceFormatError(ValueError):
    """The folder is not a readable reference pipeline; the message names the file and the problem."""


def is_reference_folder(path: str | Path) -> bool:
    """True when ``path`` holds a reference pipeline (``model_index.json`` naming a fuse-dit transformer)."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return False
    try:
        data = json.loads(index.read_text())
    except json.JSONDecodeError:
        return False
    transformer = data.get("transformer") or [None, None]
    return isinstance(transformer, list) and transformer[0] == "diffusion.models"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ReferenceFormatError(f"{path} is missing; a reference pipeline folder needs it")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ReferenceFormatError(f"{path} is not valid JSON: {error}") from None


def model_config_from_reference(config: dict) -> ModelConfig:
    """Translate the reference's ``transformer/config.json`` into our :class:`ModelConfig`."""
    fusion: Any = {"FuseDiT": "deep", "DiT": "shallow"}.get(str(config.get("model_type")))
    if fusion is None:
        raise ReferenceFormatError(
            f"transformer/config.json: model_type {config.get('model_type')!r} is not FuseDiT or DiT"
        )
    shared = config.get("shared_attention_layers", "all")
    modulation_dim = config.get("text_modulation_embeds_dim")
    return ModelConfig(
        fusion=fusion,
        attention=config.get("attention", "self"),
        pos_embed=config["pos_embed"],
        timestep_conditioning=config.get("timestep_conditioning") or "none",
        text_modulation=modulation_dim is not None,
        text_modulation_dim=modulation_dim,
        qk_norm=bool(config.get("qk_norm", False)),
        sandwich_norm=bool(config.get("sandwich_norm", False)),
        dit_hidden_size=config.get("dit_hidden_size"),
        dit_num_hidden_layers=config.get("dit_num_hidden_layers"),
        initial_layers=int(config.get("initial_layers") or 0),
        shared_attention_layers=shared if shared == "all" else [int(i) for i in shared],
        patch_size=config["patch_size"],
        in_channels=config["in_channels"],
        out_channels=config.get("out_channels"),
        sample_size=config.get("sample_size", 64),
        pos_embed_max_size=config.get("pos_embed_max_size") or 64,
        text_hidden_states_index=config.get("text_hidden_states_index", -1),
    )


def _hf_config(base_config: dict):
    from transformers import AutoConfig

    base = dict(base_config)
    model_type = base.pop("model_type", None)
    if model_type is None:
        raise ReferenceFormatError("transformer/config.json: base_config has no model_type")
    return AutoConfig.for_model(model_type, **base)


# ----------------------------------------------------------------------------------------------------------------------
# DiT weights: reference names -> ours
# ----------------------------------------------------------------------------------------------------------------------


def _layer_key(rest: str, config: ModelConfig) -> str | None:
    """Map one ``dit.layers.{i}.`` suffix; None for keys we do not have (dropped)."""
    adaln_zero = config.timestep_conditioning == "adaln-zero"
    rules = [
        (r"input_layernorm\.linear\.(weight|bias)", r"modulation.linear.\1") if adaln_zero else None,
        (r"input_layernorm\.norm\.weight", "input_layernorm.weight") if adaln_zero else None,
        (r"scale_shift_table", "modulation.scale_shift_table"),
        (r"self_attn\.(text_[kv]_proj)\.(weight|bias)", r"self_attn.text_source.\1.\2"),
        (r"cross_attn\.(text_[kv]_proj)\.(weight|bias)", r"cross_attn.text_source.\1.\2"),
        (r"post_attention_layernorm\.weight", "attn_out_norm.weight" if config.sandwich_norm else "ffn_norm.weight"),
        (r"pre_feedforward_layernorm\.weight", "ffn_norm.weight"),
        (r"post_feedforward_layernorm\.weight", "ffn_out_norm.weight"),
        (r"post_cross_attention_layernorm\.weight", "cross_out_norm.weight"),
    ]
    for rule in rules:
        if rule is not None and re.fullmatch(rule[0], rest):
            return re.sub(rule[0], rule[1], rest)
    return rest


def _top_key(rest: str, config: ModelConfig) -> str | None:
    adaln_zero = config.timestep_conditioning == "adaln-zero"
    rules = [
        (r"timestep_embedder\.(\d)\.(weight|bias)", r"timestep.timestep_embedder.\1.\2"),
        (r"t_block\.(\d)\.(weight|bias)", r"timestep.t_block.\1.\2"),
        (r"condition_embedder\.(.+)", r"timestep.condition_embedder.\1"),
        (r"norm_out\.linear\.(weight|bias)", r"head.modulation.linear.\1") if adaln_zero else None,
        (r"norm_out\.norm\.weight", "head.norm_out.weight") if adaln_zero else None,
        (r"norm_out\.weight", "head.norm_out.weight"),
        (r"scale_shift_table", "head.modulation.scale_shift_table"),
        (r"proj_out\.(weight|bias)", r"head.proj_out.\1"),
        (r"patch_embed\.pos_embed", None),
    ]
    for rule in rules:
        if rule is not None and re.fullmatch(rule[0], rest):
            return None if rule[1] is None else re.sub(rule[0], rule[1], rest)
    return rest


def convert_dit_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename the reference's DiT weights to our :class:`DiffusionTransformer` names.

    FuseDiT checkpoints hold them under ``dit.*`` (next to ``llm.*``); a shallow-fusion ``DiT`` checkpoint *is* the
    DiT, so its keys have no prefix.
    """
    prefix = "dit." if config.fusion == "deep" else ""
    converted = {}
    for key, value in state.items():
        if not key.startswith(prefix) or (not prefix and key.startswith("llm.")):
            continue
        rest = key[len(prefix) :]
        match = re.match(r"layers\.(\d+)\.(.+)", rest)
        if match:
            new = _layer_key(match.group(2), config)
            new = None if new is None else f"layers.{match.group(1)}.{new}"
        else:
            new = _top_key(rest, config)
        if new is not None:
            converted[new] = value
    return converted


def load_dit_weights(model: DiffusionTransformer, state: dict[str, torch.Tensor], where: str) -> None:
    """Load converted weights, failing loudly on anything missing or left over."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state and not k.endswith("pos_embed"))
    unexpected = sorted(k for k in state if k not in own)
    if missing or unexpected:
        raise ReferenceFormatError(
            f"{where}: weights do not match the configured model; missing {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise ReferenceFormatError(
                f"{where}: {key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}"
            )
    model.load_state_dict(state, strict=False)


# ----------------------------------------------------------------------------------------------------------------------
# The LLM of a FuseDiT folder (llm.* inside transformer/model.safetensors)
# ----------------------------------------------------------------------------------------------------------------------


def build_reference_llm(hf_config, state: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    """A Hugging Face decoder built from ``base_config`` with the ``llm.*`` weights.

    The reference prunes what the last fused layer does not need (its ``o_proj``, MLP and norms after attention)
    and the final norm; those stay zero — no output we read depends on them.
    """
    from transformers import AutoModel

    config = reference_attention_config(hf_config)
    decoder = AutoModel.from_config(config)
    with torch.no_grad():
        for parameter in decoder.parameters():
            parameter.zero_()
    weights = {k[len("llm.") :]: v for k, v in state.items() if k.startswith("llm.")}
    if not weights:
        raise ReferenceFormatError("transformer/model.safetensors has no llm.* weights (expected a FuseDiT model)")
    result = decoder.load_state_dict(weights, strict=False)
    if result.unexpected_keys:
        raise ReferenceFormatError(
            f"transformer/model.safetensors: unexpected LLM weights {result.unexpected_keys[:8]}"
        )
    return decoder.to(dtype).eval()


def load_baseline_llm(llm_dir: Path, dtype: torch.dtype) -> nn.Module:
    """The decoder of a shallow-fusion folder's ``llm/`` (a ``save_pretrained`` Gemma / Gemma 2 model).

    The reference ran it under transformers 4.43, whose default (SDPA) Gemma 2 attention has no logit soft-capping
    (it keeps ``query_pre_attn_scalar`` and the sliding window); newer transformers default Gemma 2 to eager
    attention *with* soft-capping, which shifts the hidden states (about 3e-4 on the tiny fixtures). So the
    soft-capping is switched off here; everything else follows the saved config.
    """
    from transformers import AutoModelForCausalLM

    config = load_llm_config(str(llm_dir))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "attn_logit_softcapping", None) is not None:
        text.attn_logit_softcapping = None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(llm_dir), config=config, dtype=dtype)
    except Exception as error:  # transformers raises OSError/ValueError with long texts
        raise LLMLoadError(f"could not load the shallow-fusion LLM from {llm_dir}: {error}") from None
    return extract_decoder(model).eval()


@dataclass
class ReferenceModel:
    """What a reference folder holds, converted: our model + text side + scheduler/VAE/tokenizer locations."""

    model: DiffusionTransformer
    model_config: ModelConfig
    text_config: TextConfig
    decoder: nn.Module
    tokenizer: Any
    scheduler_path: Path
    vae_path: Path | None


def load_reference_folder(path: str | Path, dtype: torch.dtype = torch.float32) -> ReferenceModel:
    """Load a reference pipeline folder into fusedit objects (no sampling here; see
    :mod:`fusedit.sampling.pipeline`)."""

    root = Path(path)
    config = _read_json(root / "transformer" / "config.json")
    if "base_config" not in config:
        raise ReferenceFormatError(f"{root / 'transformer' / 'config.json'} has no base_config (the LLM's config)")
    model_config = model_config_from_reference(config)
    weights_path = root / "transformer" / "model.safetensors"
    if not weights_path.is_file():
        raise ReferenceFormatError(f"{weights_path} is missing")
    state = load_file(str(weights_path))
    hf_config = _hf_config(config["base_config"])
    if model_config.fusion == "deep":
        decoder = build_reference_llm(hf_config, state, dtype)
        attention: Any = "reference"
    else:
        llm_dir = root / "llm"
        if not llm_dir.is_dir():
            raise ReferenceFormatError(
                f"{llm_dir} is missing; a shallow-fusion (DiT) reference folder keeps its LLM there"
            )
        decoder = load_baseline_llm(llm_dir, dtype)
        hf_config = decoder.config
        attention = "hf"
    model = build_model(model_config, LLMGeometry.from_hf_config(hf_config))
    load_dit_weights(model, convert_dit_state_dict(state, model_config), str(weights_path))
    model = model.to(dtype).eval()
    tokenizer = load_tokenizer(str(root / "tokenizer"), padding_side="left")
    pooled: Any = "none"
    clip_model = None
    if model_config.text_modulation:
        # FuseDiT's "CLIP-mod" pools a CLIP text model (its folder's clip/); the DiT baseline mean-pools the LLM.
        pooled, clip_model = ("clip", str(root / "clip")) if model_config.fusion == "deep" else ("llm-mean", None)
    text_config = TextConfig(
        llm=str(root / ("transformer" if model_config.fusion == "deep" else "llm")),
        tokenizer=str(root / "tokenizer"),
        padding="max_length",
        padding_side="left",
        attention=attention,
        pooled=pooled,
        clip_model=clip_model,
    )
    vae = root / "vae"
    return ReferenceModel(
        model, model_config, text_config, decoder, tokenizer, root / "scheduler", vae if vae.is_dir() else None
    )
