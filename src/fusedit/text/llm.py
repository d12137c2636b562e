"""Loading decoder-only LLMs and their tokenizers from a local path or a Hugging Face hub id.

Any causal LM whose decoder follows the transformers layout (``embed_tokens``, ``layers[i].self_attn.{q,k,v}_proj``,
a ``Cache``-aware attention) works: Gemma, Gemma 2, Gemma 3 (text), Llama, Qwen2, Qwen3, and PaliGemma's language
model. Only the decoder is kept (no LM head).
"""

from __future__ import annotations

import copy
import inspect
import os
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from fusedit.config import ConfigError
from fusedit.lowmem import import_bitsandbytes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LLMLoadError(RuntimeError):
    """The LLM or tokenizer could not be loaded; the message says from where and why."""


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA and float32 elsewhere; other names map to torch dtypes."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"dtype: got {name!r}, expected auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def _check_source(name_or_path: str, what: str) -> None:
    if not name_or_path:
        raise ConfigError(f"text.{what}: empty; expected a local path or a Hugging Face hub id of a decoder-only LLM")
    looks_local = name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").split("/", 2)[-1]
    if looks_local and not Path(name_or_path).expanduser().exists():
        raise LLMLoadError(f"text.{what}: {name_or_path!r} does not exist (expected a model folder or a hub id)")


def load_llm_config(name_or_path: str):
    """The Hugging Face config of the model at ``name_or_path`` (text config for multimodal models)."""
    from transformers import AutoConfig

    _check_source(name_or_path, "llm")
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except Exception as error:  # transformers raises OSError/ValueError with long texts
        raise LLMLoadError(f"could not read the LLM config at {name_or_path!r}: {error}") from None
    return config


def reference_attention_config(config):
    """A copy of ``config`` whose attention computes like the reference's fused layers.

    tang-bd/fuse-dit computes the LLM stream's attention inside fused layers with plain SDPA: scale
    ``head_dim^-0.5``, no logit soft-capping and no sliding window (``docs/design.md``, "Reference checkpoints").
    """
    config = copy.deepcopy(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if hasattr(text, "attn_logit_softcapping"):
        text.attn_logit_softcapping = None
    if hasattr(text, "query_pre_attn_scalar"):
        text.query_pre_attn_scalar = head_dim
    if getattr(text, "layer_types", None) is not None:
        text.layer_types = ["full_attention"] * len(text.layer_types)
    if hasattr(text, "use_sliding_window"):
        text.use_sliding_window = False
    return config


def extract_decoder(model: nn.Module) -> nn.Module:
    """The decoder stack (``embed_tokens`` + ``layers``) of a causal or image-text-to-text model."""
    candidates = [model]
    for attr in ("model", "language_model"):
        for holder in list(candidates):
            child = getattr(holder, attr, None)
            if isinstance(child, nn.Module):
                candidates.append(child)
    for candidate in reversed(candidates):
        if hasattr(candidate, "layers") and hasattr(candidate, "embed_tokens"):
            return candidate
    raise LLMLoadError(f"{type(model).__name__} has no decoder with embed_tokens and layers; not a decoder-only LLM")


def load_llm(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    attention: Literal["hf", "reference"] = "hf",
    attn_implementation: str | None = None,
    quantization: Literal["none", "int8"] = "none",
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Load the decoder of a causal LM (or of PaliGemma's language model).

    Args:
        name_or_path: local folder or hub id.
        dtype: weights dtype.
        attention: ``reference`` patches the config as :func:`reference_attention_config`.
        attn_implementation: transformers attention backend (``sdpa`` default, ``eager``).
        quantization: ``int8`` loads the linear layers in 8 bits on ``device`` (bitsandbytes' LLM.int8 through
            ``BitsAndBytesConfig``; :class:`~fusedit.config.ConfigError` where bitsandbytes is missing); the model is
            then already on ``device``.
    Returns:
        the decoder module (e.g. ``Gemma2Model``), in eval mode.
    """
    from transformers import AutoModelForCausalLM

    config = load_llm_config(name_or_path)
    if attention == "reference":
        config = reference_attention_config(config)
    kwargs = {"config": config, "dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if quantization == "int8":
        kwargs.update(int8_load_kwargs(device))
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except ValueError:
        try:
            from transformers import AutoModelForImageTextToText

            model = AutoModelForImageTextToText.from_pretrained(name_or_path, **kwargs)
        except Exception as error:
            raise LLMLoadError(f"{name_or_path!r} is not a causal LM transformers can load: {error}") from None
    except Exception as error:
        raise LLMLoadError(f"could not load the LLM from {name_or_path!r}: {error}") from None
    decoder = extract_decoder(model)
    decoder.eval()
    return decoder


def int8_load_kwargs(device: torch.device | str) -> dict:
    """``from_pretrained`` arguments loading the linear layers in 8 bits (LLM.int8) on ``device``."""
    import_bitsandbytes("text.quantization=int8")
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "device_map": {"": str(torch.device(device))}}


def load_tokenizer(name_or_path: str, padding_side: str = "left"):
    """Load a tokenizer and set its padding side; a missing pad token falls back to EOS (reported in the name)."""
    from transformers import AutoTokenizer

    _check_source(name_or_path, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as error:
        raise LLMLoadError(f"could not load the tokenizer from {name_or_path!r}: {error}") from None
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise LLMLoadError(f"tokenizer {name_or_path!r} has neither a pad nor an eos token; add a pad token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def decoder_forward_kwargs(decoder: nn.Module) -> str:
    """Name of the cache argument of ``decoder.forward`` (``cache`` in newer transformers, else ``past_key_values``)."""
    parameters = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"
