"""The reference's formulation of FuseDiT: the LLM runs inside the DiT's layer loop, over ``[text ; image]``.

tang-bd/fuse-dit computes every fused layer as *one* attention over ``[text ; image]`` tokens with a dense
``(L+N)²`` additive mask (causal text rows, bidirectional image rows, padded text keys masked), advancing the text
stream through the LLM layers inside the DiT's loop, with no trimming of padded text columns. fusedit instead runs
the LLM once per prompt batch and hands each block the keys/values of its LLM layer (``docs/design.md``, "The LLM as
a key/value provider"). The two agree on the image rows; :func:`joint_velocity` recomputes the velocity the
reference's way from the *same* weights (our :class:`~fusedit.models.dit.DiffusionTransformer` for the image stream,
the Hugging Face decoder's own layers for the text stream). It is

* the uncached path of the pipeline (``use_text_cache=False``): no text context is kept, the LLM runs at every step;
* the "dense" side of ``fusedit bench --vs-dense``;
* an independent check of the model in the tests.

Written from the reference's description, not copied. Covered: deep fusion with ``attention: self`` (joint attention
with the dense mask) or ``cross`` (the text stream advanced in the loop, each block's cross-attention reading its
layer's pre-RoPE keys and values), any position encoding, timestep conditioning and layer map; shallow fusion (the
LLM's hidden states recomputed at every step, see :func:`llm_hidden_states`). Text layers follow the decoder's own
attention: its scale, Gemma 2's logit soft-capping and sliding window, Qwen 3's query/key norms. Families whose
layers differ further (Gemma 3's per-layer RoPE) are refused by :func:`check_joint_supported`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fusedit.models.attention import TextInputs
from fusedit.models.dit import DiffusionTransformer, unpatchify
from fusedit.models.layers import Rope, apply_rope, merge_heads, split_heads
from fusedit.models.timestep import modulate
from fusedit.text.context import TextContext

#: Decoder families whose layers this module computes (``config.model_type``).
SUPPORTED_LLMS = ("gemma", "gemma2", "llama", "qwen2", "qwen3")


def dense_joint_mask(
    text_mask: torch.Tensor, num_image: int, dtype: torch.dtype, sliding_window: int | None = None
) -> torch.Tensor:
    """The reference's additive mask over ``[text ; image]``: ``(B, 1, L+N, L+N)`` with 0 = attend, ``finfo.min`` = not.

    Text rows are causal over text (and within ``sliding_window`` tokens, for a sliding-window LLM layer) and never
    see image keys; image rows see every key; padded text keys (``text_mask`` ``(B, L)`` False) are masked in every
    row. A padded text row masked everywhere becomes uniform (as in the reference); it only feeds padded text keys,
    which no real row reads.
    """
    b, length = text_mask.shape
    size = length + num_image
    device = text_mask.device
    allowed = torch.zeros(size, size, dtype=torch.bool, device=device)
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    if sliding_window is not None:
        causal = causal & ~torch.ones_like(causal).tril(-sliding_window)
    allowed[:length, :length] = causal
    allowed[length:, :] = True
    keys = torch.cat([text_mask.bool(), torch.ones(b, num_image, dtype=torch.bool, device=device)], dim=1)
    allowed = allowed[None] & keys[:, None, :]
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``(B, H_kv, S, D) -> (B, H_kv·groups, S, D)`` materialised, as the reference does before SDPA."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


class _TextLayer:
    """The text stream's side of one Hugging Face decoder layer (Gemma, Gemma 2, Llama, Qwen 2/3 layouts)."""

    def __init__(self, layer: Any, heads: int, kv_heads: int) -> None:
        self.layer, self.attn = layer, layer.self_attn
        self.heads, self.kv_heads = heads, kv_heads
        self.scale = float(self.attn.scaling)
        self.softcap = getattr(self.attn, "attn_logit_softcapping", None)
        self.sliding_window = getattr(self.attn, "sliding_window", None)

    def qkv(self, txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pre-RoPE ``(q, k, v)`` ``(B, H, L, D)`` of the text stream ``txt`` ``(B, L, H_llm)`` (query/key norms of
        the family applied)."""
        attn, h = self.attn, self.layer.input_layernorm(txt)
        q, k = split_heads(attn.q_proj(h), self.heads), split_heads(attn.k_proj(h), self.kv_heads)
        if isinstance(getattr(attn, "q_norm", None), nn.Module):  # Qwen 3: per-head norms before RoPE
            q = attn.q_norm(q.transpose(1, 2)).transpose(1, 2)
            k = attn.k_norm(k.transpose(1, 2)).transpose(1, 2)
        return q, k, split_heads(attn.v_proj(h), self.kv_heads)

    def finish(self, txt: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """Output projection, residual and MLP half of the layer for the text rows' attention ``(B, L, H·D)``."""
        layer = self.layer
        out = self.attn.o_proj(attention)
        gemma2 = hasattr(layer, "pre_feedforward_layernorm")
        if gemma2:  # Gemma 2: post-attention norm on the attention output, dedicated pre-FFN norm
            out = layer.post_attention_layernorm(out)
        txt = txt + out
        pre_ffn = layer.pre_feedforward_layernorm if gemma2 else layer.post_attention_layernorm
        mlp = layer.mlp(pre_ffn(txt))
        post = getattr(layer, "post_feedforward_layernorm", None)
        return txt + (post(mlp) if post is not None else mlp)


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, text: _TextLayer, text_length: int
) -> torch.Tensor:
    """One attention over all rows of ``q`` ``(B, H, S, D)`` and keys ``k, v`` ``(B, H_kv, S, D)`` with the additive
    ``mask``: text rows (the first ``text_length``) with the LLM's scale and soft-capping, image rows with
    ``D^-0.5``. Returns ``(B, H, S, D)``."""
    groups = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    image_scale = q.shape[-1] ** -0.5
    if text.softcap is None and abs(text.scale - image_scale) < 1e-12:  # plain softmax everywhere: SDPA
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))
    scale = torch.full((q.shape[2], 1), image_scale, dtype=q.dtype, device=q.device)
    scale[:text_length] = text.scale
    scores = (q @ k.transpose(-1, -2)) * scale
    if text.softcap is not None:
        text_rows = scores[:, :, :text_length]
        scores = torch.cat([torch.tanh(text_rows / text.softcap) * text.softcap, scores[:, :, text_length:]], dim=2)
    probs = torch.softmax((scores + mask.to(scores.dtype)).float(), dim=-1).to(q.dtype)
    return probs @ v


def _text_only_layer(
    text: _TextLayer, txt: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], text_mask: torch.Tensor
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """An LLM layer the DiT does not attend to jointly: text rows only. Returns the new ``txt`` and the layer's
    pre-RoPE ``(k, v)`` (what a cross-attention block reads)."""
    q, k, v = text.qkv(txt)
    mask = dense_joint_mask(text_mask, 0, q.dtype, text.sliding_window)
    out = _attention(apply_rope(q, rope), apply_rope(k, rope), v, mask, text, txt.shape[1])
    return text.finish(txt, merge_heads(out)), (k, v)


def _joint_layer(
    block: Any,
    text: _TextLayer,
    x: torch.Tensor,
    txt: torch.Tensor,
    emb: torch.Tensor | None,
    ropes: tuple[tuple[torch.Tensor, torch.Tensor], Rope],
    text_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused layer the reference's way: joint attention over ``[text ; image]`` with the dense mask.

    ``x``: ``(B, N, H_dit)`` image stream; ``txt``: ``(B, L, H_llm)`` text stream; ``ropes``: ``(text, image)``
    rotary tables (image None: no rotation); ``text_mask``: ``(B, L)``. Returns the new ``(x, txt)``.
    """
    length, sa = txt.shape[1], block.self_attn
    mod = block.modulation(emb) if block.modulation is not None else None
    h = block.input_layernorm(x)
    if mod is not None:
        h = modulate(h, mod.shift_msa, mod.scale_msa)
    q_img = sa.q_norm(split_heads(sa.q_proj(h), sa.heads))
    k_img = sa.k_norm(split_heads(sa.k_proj(h), sa.kv_heads))
    v_img = split_heads(sa.v_proj(h), sa.kv_heads)
    q_txt, k_txt, v_txt = text.qkv(txt)
    text_rope, image_rope = ropes
    q_txt, k_txt = apply_rope(q_txt, text_rope), apply_rope(k_txt, text_rope)
    if image_rope is not None:
        q_img, k_img = apply_rope(q_img, image_rope), apply_rope(k_img, image_rope)
    dtype = q_img.dtype
    q = torch.cat([q_txt.to(dtype), q_img], dim=2)
    k = torch.cat([k_txt.to(dtype), k_img], dim=2)
    v = torch.cat([v_txt.to(dtype), v_img], dim=2)
    mask = dense_joint_mask(text_mask, x.shape[1], dtype, text.sliding_window)
    out = merge_heads(_attention(q, k, v, mask, text, length))
    txt = text.finish(txt, out[:, :length].to(txt.dtype))

    attn = block.attn_out_norm(sa.o_proj(out[:, length:]))
    x = x + (attn if mod is None else mod.gate_msa[:, None] * attn)
    h = block.ffn_norm(x)
    if mod is not None:
        h = modulate(h, mod.shift_mlp, mod.scale_mlp)
    mlp = block.ffn_out_norm(block.mlp(h))
    return x + (mlp if mod is None else mod.gate_mlp[:, None] * mlp), txt


def check_joint_supported(model: DiffusionTransformer, llm: Any) -> None:
    """Raise ``ValueError`` for an LLM family whose layers this module does not compute, or an LLM too shallow for
    the model's layer map."""
    model_type = getattr(getattr(llm, "config", None), "model_type", "")
    if model_type not in SUPPORTED_LLMS:
        raise ValueError(
            f"the reference's formulation (the LLM run inside every step) covers the decoder families "
            f"{', '.join(SUPPORTED_LLMS)}; got {model_type or type(llm).__name__!r}. Sample with the "
            f"text cache (use_text_cache=True)"
        )
    needed = max(model.resolved.fused_llm_layers, default=-1) + 1
    if len(llm.layers) < needed:
        raise ValueError(f"the LLM has {len(llm.layers)} layers but the model fuses layer {needed - 1}")


def llm_hidden_states(llm: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every hidden state of a plain Hugging Face forward over the padded prompts (no cache, no trimming), padded
    positions zeroed: ``(B, L, H_llm)`` each, the last one after the final norm."""
    out = llm(input_ids=input_ids, attention_mask=attention_mask.long(), use_cache=False, output_hidden_states=True)
    keep = attention_mask.bool()[..., None]
    return tuple(h * keep.to(h.dtype) for h in out.hidden_states)


def _deep_velocity(
    model: DiffusionTransformer,
    llm: Any,
    x: torch.Tensor,
    timestep: torch.Tensor,
    input_ids: torch.Tensor,
    text_mask: torch.Tensor,
    pooled: torch.Tensor | None,
) -> torch.Tensor:
    resolved, p = model.resolved, model.patch_size
    h, w = x.shape[2] // p, x.shape[3] // p
    tokens = model.patch_embed(x)
    cond = model.timestep(timestep.to(tokens.device), pooled, tokens.dtype)
    if model.adds_timestep_to_tokens:
        tokens = tokens + cond.final[:, None]
    image_rope = model.positions(h, w, text_mask.sum(dim=1))
    txt = llm.embed_tokens(input_ids)
    positions = torch.arange(input_ids.shape[1], device=x.device)[None].expand(input_ids.shape[0], -1)
    text_rope = llm.rotary_emb(txt, positions)
    key_mask = text_mask if not bool(text_mask.all()) else None
    layers = [
        _TextLayer(layer, resolved.llm.num_attention_heads, resolved.llm.num_key_value_heads) for layer in llm.layers
    ]
    cross = resolved.config.attention == "cross"
    next_llm_layer = 0
    for block, llm_layer in zip(model.layers, resolved.layer_map, strict=True):
        if llm_layer is None:  # DiT layer past the map: image tokens only
            tokens = block(tokens, cond.layer, image_rope, TextInputs(hidden=None, key_mask=None))
            continue
        while next_llm_layer < llm_layer:  # LLM layers outside the map advance the text stream alone
            txt, _ = _text_only_layer(layers[next_llm_layer], txt, text_rope, text_mask)
            next_llm_layer += 1
        if cross:  # the block's cross-attention reads this layer's pre-RoPE keys and values
            txt, (k, v) = _text_only_layer(layers[llm_layer], txt, text_rope, text_mask)
            tokens = block(tokens, cond.layer, image_rope, TextInputs(hidden=None, key_mask=key_mask, keys=k, values=v))
        else:
            tokens, txt = _joint_layer(
                block, layers[llm_layer], tokens, txt, cond.layer, (text_rope, image_rope), text_mask
            )
        next_llm_layer += 1
    # the network's output means what model.prediction says (the velocity, or the clean sample it follows from)
    return model.prediction(unpatchify(model.head(tokens, cond), h, w, p), x, timestep)


def joint_velocity(
    model: DiffusionTransformer,
    llm: Any,
    x: torch.Tensor,
    timestep: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pooled: torch.Tensor | None = None,
) -> torch.Tensor:
    """The velocity of ``model`` computed the reference's way (LLM in the loop; for deep self-attention fusion one
    joint attention over ``[text ; image]`` with the dense mask).

    Args:
        model: a :class:`DiffusionTransformer` (deep or shallow fusion); its weights are used as they are.
        llm: the Hugging Face decoder (e.g. ``Gemma2Model``) whose layers provide the text stream.
        x: ``(B, C, H, W)`` noisy latents; ``timestep``: ``(B,)`` = σ·1000.
        input_ids, attention_mask: ``(B, L)`` tokens and padding mask (True/1 = real token), padding included.
        pooled: ``(B, P)`` pooled text embedding for text modulation (None when the model has none).
    Returns:
        ``(B, C_out, H, W)`` velocity; gradients flow as in the reference (through the text rows too).
    """
    check_joint_supported(model, llm)
    text_mask = attention_mask.bool()
    if model.resolved.config.fusion == "shallow":
        index = model.resolved.config.text_hidden_states_index
        hidden = llm_hidden_states(llm, input_ids, text_mask)[index]
        return model(x, timestep, TextContext(mask=text_mask, hidden_states=hidden, pooled=pooled))
    return _deep_velocity(model, llm, x, timestep, input_ids, text_mask, pooled)
