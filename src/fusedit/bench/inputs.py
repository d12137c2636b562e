"""Synthetic inputs of a benchmark run: random token ids, random text keys/values, a random-weight LLM."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn
from transformers import AutoModel, Gemma2Config

from fusedit.bench.presets import BenchPreset
from fusedit.models.dit import DiffusionTransformer
from fusedit.text.context import TextContext
from fusedit.text.llm import reference_attention_config

PAD_ID, BOS_ID = 0, 2


def synthetic_tokens(preset: BenchPreset, batch: int, generator: torch.Generator, real: int | None = None):
    """Left-padded prompts: ``(input_ids, attention_mask)`` ``(B, L)``, the last ``real`` tokens real (BOS first)."""
    length, real = preset.text_tokens, preset.real_tokens if real is None else real
    ids = torch.randint(4, preset.vocab_size, (batch, length), generator=generator)
    ids[:, length - real] = BOS_ID
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[:, length - real :] = True
    return ids.masked_fill(~mask, PAD_ID), mask


def random_text_context(
    model: DiffusionTransformer, mask: torch.Tensor, generator: torch.Generator, dtype: torch.dtype
) -> TextContext:
    """A context of random keys/values ``(B, H_kv, L, D)`` for every fused layer (no LLM), padded slots zeroed."""
    r = model.resolved
    b, length = mask.shape
    shape = (b, r.num_key_value_heads, length, r.head_dim)
    keep = mask[:, None, :, None]

    def rand():
        return (torch.randn(shape, generator=generator) * keep).to(dtype)

    layers = r.fused_llm_layers
    return TextContext(mask=mask, keys={i: rand() for i in layers}, values={i: rand() for i in layers})


class NoTokenizer:
    """Stand-in tokenizer: the benchmark feeds token ids directly (``encode_tokens``), so none is needed."""

    def __call__(self, text, **_kwargs):
        if text:
            raise RuntimeError("the benchmark's text encoder takes token ids, not strings")
        return SimpleNamespace(input_ids=[])


def llm_config(preset: BenchPreset) -> Gemma2Config:
    """The Hugging Face config of the preset's LLM (Gemma 2 layout)."""
    return Gemma2Config(
        vocab_size=preset.vocab_size,
        hidden_size=preset.llm_hidden_size,
        intermediate_size=preset.llm_intermediate_size,
        num_hidden_layers=preset.llm_num_layers,
        num_attention_heads=preset.llm_num_heads,
        num_key_value_heads=preset.llm_num_kv_heads,
        head_dim=preset.llm_head_dim,
        query_pre_attn_scalar=preset.llm_head_dim,
        max_position_embeddings=max(8192, preset.text_tokens),
        sliding_window=max(4096, preset.text_tokens),
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=1,
    )


def build_llm(preset: BenchPreset, device: torch.device, dtype: torch.dtype, attention: str = "reference") -> nn.Module:
    """A randomly initialised Hugging Face ``Gemma2Model`` of the preset's geometry (``attention: reference``: plain
    softmax attention, as in the reference's fused layers)."""
    config = llm_config(preset)
    if attention == "reference":
        config = reference_attention_config(config)
    with torch.device(device):
        decoder = AutoModel.from_config(config, dtype=dtype)
    return decoder.to(device).eval()
