"""Attention modules of a DiT block and the text key/value sources they read (chosen at build time).

Deep fusion (FuseDiT) reads the keys/values its LLM layer used from the :class:`~fusedit.text.TextContext`
(:class:`LLMLayerKV`); the shallow baselines project the embedded hidden-state layer with their own per-layer
projections (:class:`ProjectedKV`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fusedit.models.layers import RMSNorm, Rope, SelfInitializing, apply_rope, attend, merge_heads, split_heads


@dataclass
class TextInputs:
    """What one block reads about the text, prepared by the model before the block loop.

    Attributes:
        hidden: ``(B, L, H_dit)`` embedded hidden states (shallow baselines) or None.
        key_mask: ``(B, L)`` bool, True for real tokens; None when no token is padding.
        keys, values: ``(B, H_kv, L, D)`` of this block's LLM layer (deep fusion) or None. Selected by the model
            so that blocks never index the context with a Python int (one compiled graph serves every block).
    """

    hidden: torch.Tensor | None
    key_mask: torch.Tensor | None
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None


class TextKeyNorm(nn.Module):
    """``model.text_adapter: key-norm``: every text key head vector ``(…, D)`` scaled to unit RMS (no parameters).

    RoPE rotates pairs of dimensions and keeps the vector's norm, so normalising post-RoPE keys equals RoPE of
    normalised keys: relative positions are untouched. Values pass unchanged."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return nn.functional.rms_norm(keys, (keys.shape[-1],), eps=self.eps), values


class TextLinearAdapter(SelfInitializing, nn.Module):
    """``model.text_adapter: linear``: a trainable ``D × D`` map per KV head on the keys and on the values,
    ``(B, H_kv, L, D) -> (B, H_kv, L, D)``, starting at the identity (the reference's keys/values at step 0)."""

    def __init__(self, kv_heads: int, head_dim: int):
        super().__init__()
        self.key_map = nn.Parameter(torch.empty(kv_heads, head_dim, head_dim))
        self.value_map = nn.Parameter(torch.empty(kv_heads, head_dim, head_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        eye = torch.eye(self.key_map.shape[-1]).expand_as(self.key_map)
        with torch.no_grad():
            self.key_map.copy_(eye)
            self.value_map.copy_(eye)

    def forward(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = torch.einsum("bhld,hde->bhle", keys, self.key_map.to(keys.dtype))
        values = torch.einsum("bhld,hde->bhle", values, self.value_map.to(values.dtype))
        return keys, values


class LLMLayerKV(nn.Module):
    """Deep fusion: the keys/values of LLM layer ``layer`` (post-RoPE, or pre-RoPE with ``raw=True``), through the
    block's ``adapter`` (``model.text_adapter``; None: as the LLM computed them, the reference).

    :class:`~fusedit.models.fusion.DeepFusion` puts them into the block's :class:`TextInputs`; ``forward`` hands them
    over.
    """

    def __init__(self, layer: int, raw: bool = False, adapter: nn.Module | None = None):
        super().__init__()
        self.layer, self.raw = layer, raw
        self.adapter = adapter

    def forward(self, text: TextInputs, k_norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        if text.keys is None or text.values is None:
            raise ValueError(f"LLM layer {self.layer}: the block's text inputs hold no keys/values")
        if self.adapter is None:
            return text.keys, text.values
        return self.adapter(text.keys, text.values)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, raw={self.raw}"


class ProjectedKV(nn.Module):
    """Shallow fusion: per-layer ``text_k_proj``/``text_v_proj`` of the embedded text, keys through ``k_norm``."""

    def __init__(self, hidden_size: int, kv_heads: int, head_dim: int):
        super().__init__()
        self.kv_heads = kv_heads
        self.text_k_proj = nn.Linear(hidden_size, kv_heads * head_dim, bias=False)
        self.text_v_proj = nn.Linear(hidden_size, kv_heads * head_dim, bias=False)

    def forward(self, text: TextInputs, k_norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        k = k_norm(split_heads(self.text_k_proj(text.hidden), self.kv_heads))
        v = split_heads(self.text_v_proj(text.hidden), self.kv_heads)
        return k, v


class SelfAttention(nn.Module):
    """Image self-attention, optionally over ``[text keys/values ; image keys/values]`` (``text_source``).

    ``x``: ``(B, N, H)`` normalised image tokens; ``rope``: image rotary tables or None. Queries are image tokens
    only: the text rows of the reference's joint attention are the LLM's business (``docs/design.md``, "The LLM
    as a key/value provider").
    """

    def __init__(
        self,
        hidden_size: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        qk_norm: bool,
        eps: float,
        text_source: nn.Module | None,
    ):
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads
        self.q_proj = nn.Linear(hidden_size, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden_size, bias=False)
        self.q_norm = RMSNorm(head_dim, eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim, eps) if qk_norm else nn.Identity()
        self.text_source = text_source

    def forward(self, x: torch.Tensor, rope: Rope, text: TextInputs) -> torch.Tensor:
        q = self.q_norm(split_heads(self.q_proj(x), self.heads))
        k = self.k_norm(split_heads(self.k_proj(x), self.kv_heads))
        v = split_heads(self.v_proj(x), self.kv_heads)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        key_mask = None
        if self.text_source is not None:
            text_k, text_v = self.text_source(text, self.k_norm)
            k = torch.cat([text_k.to(k.dtype), k], dim=2)
            v = torch.cat([text_v.to(v.dtype), v], dim=2)
            if text.key_mask is not None:
                image_mask = text.key_mask.new_ones(x.shape[0], x.shape[1])
                key_mask = torch.cat([text.key_mask, image_mask], dim=1)
        return self.o_proj(merge_heads(attend(q, k, v, key_mask)))


class CrossAttention(nn.Module):
    """Cross-attention from image tokens (the un-normalised residual stream) to the text.

    Deep fusion: keys/values are the LLM layer's pre-RoPE projections, no key norm. Shallow: projected from the
    embedded text with their own key norm.
    """

    def __init__(
        self,
        hidden_size: int,
        heads: int,
        head_dim: int,
        qk_norm: bool,
        eps: float,
        text_source: nn.Module,
        key_norm: bool,
    ):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(hidden_size, heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden_size, bias=False)
        self.q_norm = RMSNorm(head_dim, eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim, eps) if (qk_norm and key_norm) else nn.Identity()
        self.text_source = text_source

    def forward(self, x: torch.Tensor, text: TextInputs) -> torch.Tensor:
        q = self.q_norm(split_heads(self.q_proj(x), self.heads))
        k, v = self.text_source(text, self.k_norm)
        return self.o_proj(merge_heads(attend(q, k.to(q.dtype), v.to(q.dtype), text.key_mask)))
