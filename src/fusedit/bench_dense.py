"""The reference's dense formulation of FuseDiT, for benchmarking and for checking our model against it.

tang-bd/fuse-dit computes every fused layer as *one* attention over ``[text ; image]`` tokens with a dense float
``(L+N)²`` additive mask (causal text rows, bidirectional image rows, padded text keys masked), advancing the text
stream through the LLM layers inside the DiT's loop, with no trimming of padded text columns. Our model instead reads
per-layer text keys/values precomputed once (DESIGN.md §2). The two are mathematically the same on the image rows;
:func:`dense_velocity` recomputes the velocity the reference's way from the *same* weights (our
:class:`~fusedit.models.DiffusionTransformer` for the image stream, a Hugging Face Gemma / Gemma 2 decoder for the text
stream), so tests can compare outputs and ``fusedit bench --vs-dense`` can compare speed.

Written from the reference's description (DESIGN.md §5), not copied. Supported: deep fusion (``fusion: deep``) with
``attention: self``, any position encoding, any timestep conditioning, any layer map.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fusedit.models.attention import TextInputs
from fusedit.models.dit import DiffusionTransformer, unpatchify
from fusedit.models.layers import apply_rope, merge_heads, rotary_tables, split_heads
from fusedit.models.timestep import modulate


def dense_joint_mask(text_mask: torch.Tensor, num_image: int, dtype: torch.dtype) -> torch.Tensor:
    """The reference's additive mask over ``[text ; image]``: ``(B, 1, L+N, L+N)`` with 0 = attend, ``finfo.min`` = not.

    Text rows are causal over text and never see image keys; image rows see every key; padded text keys
    (``text_mask`` ``(B, L)`` False) are masked in every row. A padded text row masked everywhere becomes uniform
    (as in the reference); it only feeds padded text keys, which no real row reads.
    """
    b, length = text_mask.shape
    size = length + num_image
    device = text_mask.device
    allowed = torch.zeros(size, size, dtype=torch.bool, device=device)
    allowed[:length, :length] = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    allowed[length:, :] = True
    keys = torch.cat([text_mask.bool(), torch.ones(b, num_image, dtype=torch.bool, device=device)], dim=1)
    allowed = allowed[None] & keys[:, None, :]
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``(B, H_kv, S, D) -> (B, H_kv·groups, S, D)`` materialised, as the reference does before SDPA."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _text_pre_ffn_norm(layer: nn.Module) -> nn.Module:
    """Gemma 2 has a dedicated pre-FFN norm; Gemma uses ``post_attention_layernorm`` there."""
    return getattr(layer, "pre_feedforward_layernorm", None) or layer.post_attention_layernorm


def _text_ffn(layer: nn.Module, txt: torch.Tensor) -> torch.Tensor:
    """The text stream's MLP half of an LLM layer (Gemma or Gemma 2)."""
    out = layer.mlp(_text_pre_ffn_norm(layer)(txt))
    post = getattr(layer, "post_feedforward_layernorm", None)
    return txt + (post(out) if post is not None else out)


def _text_attn_out(layer: nn.Module, txt: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    out = layer.self_attn.o_proj(attn)
    if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma 2: post-attention norm on the attention output
        out = layer.post_attention_layernorm(out)
    return txt + out


def _text_qkv(layer: nn.Module, txt: torch.Tensor, heads: int, kv_heads: int):
    attn = layer.self_attn
    h = layer.input_layernorm(txt)
    return (split_heads(attn.q_proj(h), heads), split_heads(attn.k_proj(h), kv_heads),
            split_heads(attn.v_proj(h), kv_heads))


def _text_only_layer(layer: nn.Module, txt: torch.Tensor, rope, mask: torch.Tensor, heads: int, kv_heads: int):
    """An LLM layer outside the layer map: text rows only, same plain attention (scale ``D^-0.5``, no softcap)."""
    q, k, v = _text_qkv(layer, txt, heads, kv_heads)
    q, k = apply_rope(q, rope), apply_rope(k, rope)
    groups = heads // kv_heads
    attn = F.scaled_dot_product_attention(q, _repeat_kv(k, groups), _repeat_kv(v, groups), attn_mask=mask.to(q.dtype))
    return _text_ffn(layer, _text_attn_out(layer, txt, merge_heads(attn)))


def _joint_layer(block: nn.Module, layer: nn.Module, x: torch.Tensor, txt: torch.Tensor, emb: Optional[torch.Tensor],
                 rope, mask: torch.Tensor, heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused layer the reference's way: joint attention over ``[text ; image]`` with the dense mask.

    ``x``: ``(B, N, H_dit)`` image stream; ``txt``: ``(B, L, H_llm)`` text stream; ``rope``: ``(cos, sin)`` over
    the ``L+N`` tokens (None entries: no rotation of that part); ``mask``: ``(B, 1, L+N, L+N)``.
    Returns the new ``(x, txt)``.
    """
    length = txt.shape[1]
    mod = block.modulation(emb) if block.modulation is not None else None
    h = block.input_layernorm(x)
    if mod is not None:
        h = modulate(h, mod.shift_msa, mod.scale_msa)
    sa = block.self_attn
    q_img = sa.q_norm(split_heads(sa.q_proj(h), heads))
    k_img = sa.k_norm(split_heads(sa.k_proj(h), kv_heads))
    v_img = split_heads(sa.v_proj(h), kv_heads)
    q_txt, k_txt, v_txt = _text_qkv(layer, txt, heads, kv_heads)
    text_rope, image_rope = rope
    q_txt, k_txt = apply_rope(q_txt, text_rope), apply_rope(k_txt, text_rope)
    if image_rope is not None:
        q_img, k_img = apply_rope(q_img, image_rope), apply_rope(k_img, image_rope)
    dtype = q_img.dtype
    q = torch.cat([q_txt.to(dtype), q_img], dim=2)
    k = torch.cat([k_txt.to(dtype), k_img], dim=2)
    v = torch.cat([v_txt.to(dtype), v_img], dim=2)
    groups = heads // kv_heads
    out = merge_heads(F.scaled_dot_product_attention(q, _repeat_kv(k, groups), _repeat_kv(v, groups),
                                                     attn_mask=mask.to(q.dtype)))
    txt = _text_ffn(layer, _text_attn_out(layer, txt, out[:, :length].to(txt.dtype)))

    attn = block.attn_out_norm(sa.o_proj(out[:, length:]))
    x = x + (attn if mod is None else mod.gate_msa[:, None] * attn)
    h = block.ffn_norm(x)
    if mod is not None:
        h = modulate(h, mod.shift_mlp, mod.scale_mlp)
    mlp = block.ffn_out_norm(block.mlp(h))
    return x + (mlp if mod is None else mod.gate_mlp[:, None] * mlp), txt


def check_dense_supported(model: DiffusionTransformer, llm: nn.Module) -> None:
    """Raise ``ValueError`` for combinations the dense formulation does not cover."""
    c = model.resolved.config
    if c.fusion != "deep" or c.attention != "self":
        raise ValueError(f"the dense formulation covers deep fusion with self-attention only; got fusion={c.fusion!r}, "
                         f"attention={c.attention!r}")
    model_type = getattr(getattr(llm, "config", None), "model_type", "")
    if model_type not in ("gemma", "gemma2"):
        raise ValueError(f"the dense formulation follows the reference, which supports Gemma and Gemma 2 decoders; "
                         f"got {model_type or type(llm).__name__!r}")
    needed = max(model.resolved.fused_llm_layers) + 1
    if len(llm.layers) < needed:
        raise ValueError(f"the LLM has {len(llm.layers)} layers but the model fuses layer {needed - 1}")


def dense_velocity(model: DiffusionTransformer, llm: nn.Module, x: torch.Tensor, timestep: torch.Tensor,
                   input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The velocity of ``model`` computed the reference's way (joint attention, dense mask, text stream in the loop).

    Args:
        model: a deep-fusion :class:`DiffusionTransformer` (self-attention); its weights are used as they are.
        llm: the Hugging Face decoder (``Gemma2Model`` / ``GemmaModel``) whose layers provide the text stream;
            its attention is computed like the reference's fused layers (plain softmax, scale ``D^-0.5``, no
            soft-capping or sliding window), i.e. ``text.attention: reference`` semantics.
        x: ``(B, C, H, W)`` noisy latents; ``timestep``: ``(B,)`` = σ·1000.
        input_ids, attention_mask: ``(B, L)`` tokens and padding mask (True/1 = real token), padding included.
    Returns:
        ``(B, C_out, H, W)`` velocity; gradients flow as in the reference (through the text rows too).
    """
    check_dense_supported(model, llm)
    r = model.resolved
    b, _, height, width = x.shape
    p = model.patch_size
    h, w = height // p, width // p
    heads, kv_heads = r.num_attention_heads, r.num_key_value_heads
    text_mask = attention_mask.bool()
    length = text_mask.shape[1]

    tokens = model.patch_embed(x)
    cond = model.timestep(timestep.to(tokens.device), None, tokens.dtype)
    if model.adds_timestep_to_tokens:
        tokens = tokens + cond.final[:, None]
    image_rope = model.positions(h, w, text_mask.sum(dim=1))

    embed = llm.embed_tokens
    txt = embed(input_ids)
    if not hasattr(embed, "embed_scale"):  # older transformers: Gemma scales outside the embedding module
        txt = txt * torch.tensor(llm.config.hidden_size ** 0.5, dtype=txt.dtype)
    text_positions = torch.arange(length, device=x.device)[None].expand(b, -1)
    text_rope = rotary_tables(text_positions, r.llm.head_dim, r.llm.rope_theta)

    joint_mask = dense_joint_mask(text_mask, h * w, tokens.dtype)
    text_mask_2d = joint_mask[:, :, :length, :length]
    no_text = TextInputs(hidden=None, key_mask=None)

    next_llm_layer = 0
    for block, llm_layer in zip(model.layers, r.layer_map):
        if llm_layer is None:  # DiT layer past the map: image tokens only
            tokens = block(tokens, cond.layer, image_rope, no_text)
            continue
        while next_llm_layer < llm_layer:  # LLM layers outside the map advance the text stream alone
            txt = _text_only_layer(llm.layers[next_llm_layer], txt, text_rope, text_mask_2d, heads, kv_heads)
            next_llm_layer += 1
        tokens, txt = _joint_layer(block, llm.layers[llm_layer], tokens, txt, cond.layer, (text_rope, image_rope),
                                   joint_mask, heads, kv_heads)
        next_llm_layer += 1
    return unpatchify(model.head(tokens, cond), h, w, p)
