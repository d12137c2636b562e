"""The text context equals what the Hugging Face model computes itself, for every supported family.

Keys/values are recomputed here independently from HF's own hidden states: input norm -> k/v projection (-> key norm)
-> rotary embedding written out with the config's rope theta at positions 0..L-1.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from fusedit.text.config import TextConfig
from fusedit.text.context import TextRequirements
from fusedit.text.encoder import TextEncoder


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


COMMON = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    pad_token_id=0,
)

FAMILIES = {
    "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**COMMON)),
    "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**COMMON, sliding_window=4)),
    "gemma3": lambda: tf.Gemma3ForCausalLM(
        tf.Gemma3TextConfig(
            **COMMON, sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"]
        )
    ),
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**COMMON)),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**COMMON)),
    "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**COMMON)),
}


def rope_theta(config, layer: int) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and layer_types[layer] in params:
        params = params[layer_types[layer]]
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def rotate(x, positions, theta):
    dim = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim)
    angles = positions.float()[:, None] * inv
    angles = torch.cat([angles, angles], -1)
    half = dim // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * angles.cos() + rotated * angles.sin()


def independent_kv(decoder, hidden_in, layer):
    """Keys (post-RoPE), raw keys and values of ``layer`` from its input hidden state ``(B, L, H)``."""
    block = decoder.layers[layer]
    attn = block.self_attn
    x = block.input_layernorm(hidden_in)
    b, n, _ = x.shape
    k = attn.k_proj(x).view(b, n, -1, attn.head_dim)
    if getattr(attn, "k_norm", None) is not None:
        k = attn.k_norm(k)
    k = k.transpose(1, 2)
    v = attn.v_proj(x).view(b, n, -1, attn.head_dim).transpose(1, 2)
    return rotate(k, torch.arange(n), rope_theta(decoder.config, layer)), k, v


def make_batch(padding_side: str):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 64, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.bool)
    if padding_side == "left":
        mask[0, :4] = False
        mask[2, :1] = False
    else:
        mask[0, 5:] = False
        mask[2, 8:] = False
    return ids.masked_fill(~mask, 0), mask


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_keys_values_hidden_states_match_hf(family, padding_side):
    torch.manual_seed(0)
    decoder = FAMILIES[family]().model.eval()
    ids, mask = make_batch(padding_side)
    reference = decoder(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
    requirements = TextRequirements(kv_layers=(0, 1, 2), raw_key_layers=(), hidden_states_index=-1, pooled=True)
    encoder = TextEncoder(decoder, None, TextConfig(llm="unused", padding_side=padding_side), requirements)
    context = encoder.encode_tokens(ids, mask)

    real = mask[:, None, :, None].expand(-1, 2, -1, 8)
    for layer in range(3):
        keys, _, values = independent_kv(decoder, reference.hidden_states[layer], layer)
        torch.testing.assert_close(context.keys[layer][real], keys[real], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(context.values[layer][real], values[real], atol=1e-5, rtol=1e-5)
        assert not context.keys[layer][~real].any(), "padded key slots must be zero"
    rows = mask[..., None].expand(-1, -1, 32)
    torch.testing.assert_close(context.hidden_states[rows], reference.hidden_states[-1][rows])
    weights = mask[..., None].float()
    mean = (reference.hidden_states[-1] * weights).sum(1) / weights.sum(1)
    torch.testing.assert_close(context.pooled, mean)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_last_token_pooling_is_the_state_at_each_prompts_last_real_token(padding_side):
    torch.manual_seed(0)
    decoder = FAMILIES["gemma2"]().model.eval()
    ids, mask = make_batch(padding_side)
    reference = decoder(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states[-1]
    requirements = TextRequirements(kv_layers=(0,), pooled=True)
    config = TextConfig(llm="unused", padding_side=padding_side, pooled="llm-last")
    pooled = TextEncoder(decoder, None, config, requirements).encode_tokens(ids, mask).pooled
    for row in range(ids.shape[0]):
        last = max(i for i, real in enumerate(mask[row].tolist()) if real)
        torch.testing.assert_close(pooled[row], reference[row, last])


@pytest.mark.parametrize("family", ["gemma2", "qwen3"])
def test_raw_keys_are_pre_rope(family):
    torch.manual_seed(0)
    decoder = FAMILIES[family]().model.eval()
    ids, mask = make_batch("left")
    reference = decoder(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
    encoder = TextEncoder(decoder, None, TextConfig(llm="unused"), TextRequirements(raw_key_layers=(1,)))
    context = encoder.encode_tokens(ids, mask)
    _, raw, values = independent_kv(decoder, reference.hidden_states[1], 1)
    real = mask[:, None, :, None].expand(-1, 2, -1, 8)
    torch.testing.assert_close(context.raw_keys[1][real], raw[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(context.values[1][real], values[real], atol=1e-5, rtol=1e-5)


def test_deep_fusion_encoder_runs_only_needed_layers():
    decoder = FAMILIES["llama"]().model.eval()
    encoder = TextEncoder(decoder, None, TextConfig(llm="unused"), TextRequirements(kv_layers=(0, 1)))
    assert len(encoder.decoder.layers) == 2


def test_frozen_encoder_keeps_no_graph_and_trainable_one_does():
    decoder = FAMILIES["gemma2"]().model
    ids, mask = make_batch("left")
    frozen = TextEncoder(decoder, None, TextConfig(llm="unused"), TextRequirements(kv_layers=(0, 1, 2)))
    assert not any(p.requires_grad for p in decoder.parameters())
    assert list(frozen.trainable_parameters()) == []
    with torch.enable_grad():
        context = frozen.encode_tokens(ids, mask)
    assert all(not k.requires_grad and k.grad_fn is None for k in context.keys.values())

    decoder = FAMILIES["gemma2"]().model
    trainable = TextEncoder(
        decoder, None, TextConfig(llm="unused", trainable=True), TextRequirements(kv_layers=(0, 1, 2))
    )
    with torch.enable_grad():
        context = trainable.encode_tokens(ids, mask)
        sum(k.sum() for k in context.keys.values()).backward()
    assert decoder.layers[2].self_attn.k_proj.weight.grad is not None


def test_paligemma_language_model_loads_as_the_text_stream(tmp_path):
    """PaliGemma (transformers' ``PaliGemmaForConditionalGeneration``): ``load_llm`` keeps its language model, the
    geometry is read from its text config, and the text context matches the language model's own computation."""
    from fusedit.models.config import LLMGeometry
    from fusedit.text.llm import load_llm, load_llm_config

    text = tf.GemmaConfig(**COMMON)
    vision = tf.SiglipVisionConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8
    )
    torch.manual_seed(0)
    tf.PaliGemmaForConditionalGeneration(
        tf.PaliGemmaConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=32)
    ).save_pretrained(tmp_path)
    geometry = LLMGeometry.from_hf_config(load_llm_config(str(tmp_path)))
    assert (geometry.model_type, geometry.hidden_size, geometry.num_hidden_layers, geometry.head_dim) == (
        "gemma",
        32,
        3,
        8,
    )
    decoder = load_llm(str(tmp_path))
    assert type(decoder).__name__ == "GemmaModel" and len(decoder.layers) == 3
    ids, mask = make_batch("left")
    reference = decoder(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
    encoder = TextEncoder(decoder, None, TextConfig(llm=str(tmp_path)), TextRequirements(kv_layers=(0, 1, 2)))
    context = encoder.encode_tokens(ids, mask)
    real = mask[:, None, :, None].expand(-1, 2, -1, 8)
    for layer in range(3):
        keys, _, values = independent_kv(decoder, reference.hidden_states[layer], layer)
        torch.testing.assert_close(context.keys[layer][real], keys[real], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(context.values[layer][real], values[real], atol=1e-5, rtol=1e-5)
