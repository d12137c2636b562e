"""Deep fusion equals the reference's formulation, computed naively here.

The naive computation concatenates text and image tokens and runs ONE attention per layer over the whole sequence
with an explicit dense mask (text rows: causal over real text; image rows: every real text token and every image
token), advancing the LLM stream and the DiT stream layer by layer. It shares only weights with fusedit: every
formula (norms, modulation, rotary embeddings, softmax, unpatchify) is written out below.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from fusedit.config import ConfigError
from fusedit.models.config import LLMGeometry, ModelConfig
from fusedit.models.dit import build_model
from fusedit.text.config import TextConfig
from fusedit.text.encoder import TextEncoder


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


HEADS, KV_HEADS, HEAD_DIM, LLM_LAYERS = 4, 2, 8, 4


def gemma2_decoder():
    config = Gemma2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=LLM_LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        attn_logit_softcapping=None,
        query_pre_attn_scalar=HEAD_DIM,
        sliding_window=512,
        rope_theta=100.0,
        pad_token_id=0,
    )
    torch.manual_seed(1)
    model = Gemma2ForCausalLM(config).model.eval()
    with torch.no_grad():  # non-trivial norm weights
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    return model


def _decoder(config_class, model_class, seed: int):
    """A small decoder of ``model_class`` with non-trivial norm weights (mean 1, std 0.3)."""
    config = config_class(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=LLM_LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        rope_theta=100.0,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = model_class(config).model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1, 0.3)
    return model


def llama_decoder():
    return _decoder(LlamaConfig, LlamaForCausalLM, 2)


def qwen3_decoder():
    """Llama's layout plus per-head RMSNorm of the text queries and keys (before RoPE)."""
    return _decoder(Qwen3Config, Qwen3ForCausalLM, 3)


#: every family the tiny LLM comes in (TinyLLMConfig.family), each with its own layer arithmetic in NaiveText
DECODERS = {"gemma2": gemma2_decoder(), "llama": llama_decoder(), "qwen3": qwen3_decoder()}
FAMILIES = list(DECODERS)


from .naive_reference import gemma_rms, heads, image_rope, rope_tables, rotate, softmax_attention  # noqa: E402


class NaiveText:
    """The LLM stream, advanced by hand with the HF layer's weights."""

    def __init__(self, decoder, family):
        self.decoder, self.family = decoder, family
        self.eps = decoder.config.rms_norm_eps

    def norm(self, module, x):
        if self.family == "gemma2":
            return gemma_rms(x, module.weight, self.eps)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * module.weight

    def embed(self, ids):
        h = F.embedding(ids, self.decoder.embed_tokens.weight)
        return h * math.sqrt(h.shape[-1]) if self.family == "gemma2" else h

    def qkv(self, layer, h):
        attn = self.decoder.layers[layer].self_attn
        x = self.norm(self.decoder.layers[layer].input_layernorm, h)
        q, k = heads(attn.q_proj(x), HEADS), heads(attn.k_proj(x), KV_HEADS)
        if self.family == "qwen3":  # per-head RMSNorm of queries and keys
            q, k = self.norm(attn.q_norm, q), self.norm(attn.k_norm, k)
        return q, k, heads(attn.v_proj(x), KV_HEADS)

    def finish(self, layer, h, attn_out):
        block = self.decoder.layers[layer]
        out = block.self_attn.o_proj(attn_out)
        if self.family == "gemma2":
            h = h + self.norm(block.post_attention_layernorm, out)
            m = block.mlp(self.norm(block.pre_feedforward_layernorm, h))
            return h + self.norm(block.post_feedforward_layernorm, m)
        h = h + out
        return h + block.mlp(self.norm(block.post_attention_layernorm, h))


def naive_forward(model, decoder, family, x, timestep, ids, mask, pooled=None, hidden=None):
    """The reference's joint computation of a FuseDiT (``model``) on LLM ``decoder``, written out in full.
    ``hidden``: the LLM hidden state ``(B, L, H_llm)`` the layers past the map read (``model.unfused_text: hidden``)."""
    c, r = model.resolved.config, model.resolved
    eps, theta = r.rms_norm_eps, r.rope_theta
    b, _, height, width = x.shape
    p = c.patch_size
    gh, gw = height // p, width // p
    n_text = ids.shape[1]
    text = NaiveText(decoder, family)

    # timestep embedding
    emb = emb_final = None
    if c.timestep_conditioning != "none":
        te = model.timestep
        feats = get_timestep_embedding(timestep, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
        emb = te.timestep_embedder[2](F.silu(te.timestep_embedder[0](feats)))
        if c.text_modulation:
            ce = te.condition_embedder
            emb = emb + ce[3](F.silu(ce[1](gemma_rms(pooled, ce[0].weight, eps))))
        emb_final = emb
        if c.timestep_conditioning == "adaln-single":
            emb = te.t_block[1](F.silu(emb))

    z = model.patch_embed(x)  # diffusers PatchEmbed (conv + optional sin-cos table)
    if c.timestep_conditioning == "addition":
        z = z + emb_final[:, None]
    h = text.embed(ids)
    n_real = mask.sum(1)
    text_cos, text_sin = rope_tables(torch.arange(n_text)[None].expand(b, -1), HEAD_DIM, theta)
    img_rope = image_rope(c.pos_embed, gh, gw, n_real if c.text_key_rope else torch.zeros_like(n_real), HEAD_DIM, theta)
    causal = torch.tril(torch.ones(n_text, n_text, dtype=torch.bool))
    text_rows = causal[None] & mask[:, None, :]
    n_img = gh * gw

    def modulation(block):
        if c.timestep_conditioning == "adaln-zero":
            return block.modulation.linear(F.silu(emb)).chunk(6, 1)
        if c.timestep_conditioning == "adaln-single":
            return (block.modulation.scale_shift_table + emb).chunk(6, 1)
        zero, one = torch.zeros(b, r.hidden_size), torch.ones(b, r.hidden_size)
        return zero, zero, one, zero, zero, one

    def maybe_norm(module, v):
        return v if isinstance(module, torch.nn.Identity) else gemma_rms(v, module.weight, eps)

    def image_attention_inputs(block, z):
        sh, sc, g, sh2, sc2, g2 = modulation(block)
        zn = gemma_rms(z, block.input_layernorm.weight, eps) * (1 + sc[:, None]) + sh[:, None]
        at = block.self_attn
        q, k, v = heads(at.q_proj(zn), HEADS), heads(at.k_proj(zn), KV_HEADS), heads(at.v_proj(zn), KV_HEADS)
        if c.qk_norm:
            q, k = gemma_rms(q, at.q_norm.weight, eps), gemma_rms(k, at.k_norm.weight, eps)
        if img_rope is not None:
            q, k = rotate(q, *img_rope), rotate(k, *img_rope)
        return q, k, v, (g, sh2, sc2, g2)

    def image_finish(block, z, attn_out, mods, cross=None):
        g, sh2, sc2, g2 = mods
        a = maybe_norm(block.attn_out_norm, block.self_attn.o_proj(attn_out))
        z = z + g[:, None] * a
        if cross is not None:
            z = z + maybe_norm(block.cross_out_norm, cross(z))
        zn = gemma_rms(z, block.ffn_norm.weight, eps) * (1 + sc2[:, None]) + sh2[:, None]
        mlp = block.mlp.down_proj(F.gelu(block.mlp.gate_proj(zn), approximate="tanh") * block.mlp.up_proj(zn))
        return z + g2[:, None] * maybe_norm(block.ffn_out_norm, mlp)

    fused = {llm: i for i, llm in enumerate(r.layer_map) if llm is not None}
    last = max(fused)
    for layer in range(last + 1):
        qt, kt, vt = text.qkv(layer, h)
        qt, kt_rot = rotate(qt, text_cos, text_sin), rotate(kt, text_cos, text_sin)
        if layer not in fused:
            h = text.finish(layer, h, softmax_attention(qt, kt_rot, vt, text_rows))
            continue
        block = model.layers[fused[layer]]
        qi, ki, vi, mods = image_attention_inputs(block, z)
        if c.attention == "self" and (c.text_adapter != "none" or not c.text_key_rope):
            # the image rows read adapted (or un-rotated) text keys/values; the text rows (the LLM's own) do not
            ka, va = kt_rot if c.text_key_rope else kt, vt
            if c.text_adapter != "none":
                ka, va = naive_text_adapter(c.text_adapter, block.self_attn.text_source, ka, va, eps)
            h_new = text.finish(layer, h, softmax_attention(qt, kt_rot, vt, text_rows))
            allowed = torch.cat(
                [mask[:, None, :].expand(b, n_img, n_text), torch.ones(b, n_img, n_img, dtype=torch.bool)], 2
            )
            image_out = softmax_attention(qi, torch.cat([ka, ki], 2), torch.cat([va, vi], 2), allowed)
            z = image_finish(block, z, image_out, mods)
        elif c.attention == "self":
            # ONE joint attention over [text ; image] with the reference's dense mask
            q = torch.cat([qt, qi], 2)
            k = torch.cat([kt_rot, ki], 2)
            v = torch.cat([vt, vi], 2)
            total = n_text + n_img
            allowed = torch.zeros(b, total, total, dtype=torch.bool)
            allowed[:, :n_text, :n_text] = text_rows
            allowed[:, n_text:, :n_text] = mask[:, None, :]
            allowed[:, n_text:, n_text:] = True
            out = softmax_attention(q, k, v, allowed)
            h_new = text.finish(layer, h, out[:, :n_text])
            z = image_finish(block, z, out[:, n_text:], mods)
        else:
            h_new = text.finish(layer, h, softmax_attention(qt, kt_rot, vt, text_rows))
            image_self = softmax_attention(qi, ki, vi, torch.ones(b, n_img, n_img, dtype=torch.bool))
            ca = block.cross_attn
            if c.text_adapter != "none":
                kt, vt = naive_text_adapter(c.text_adapter, ca.text_source, kt, vt, eps)

            def cross(z_res, kt=kt, vt=vt, ca=ca):
                qc = heads(ca.q_proj(z_res), HEADS)
                if c.qk_norm:
                    qc = gemma_rms(qc, ca.q_norm.weight, eps)
                allowed = mask[:, None, :].expand(b, n_img, n_text)
                return ca.o_proj(softmax_attention(qc, kt, vt, allowed))  # pre-RoPE text keys

            z = image_finish(block, z, image_self, mods, cross)
        h = h_new
    image_only = torch.ones(b, n_img, n_img, dtype=torch.bool)
    if hidden is not None:  # embedded once: RMSNorm -> Linear, as the shallow baselines
        ce = model.context_embedder
        text_h = ce[1](gemma_rms(hidden, ce[0].weight, eps))
    for i in range(len(fused), r.num_layers):  # layers past the map: image tokens only, or the LLM's hidden state
        block = model.layers[i]
        qi, ki, vi, mods = image_attention_inputs(block, z)
        if hidden is None:
            z = image_finish(block, z, softmax_attention(qi, ki, vi, image_only), mods)
            continue
        if c.attention == "self":  # joined to the image self-attention, keys RMS-normed (qk_norm), no RoPE
            at = block.self_attn
            tk = gemma_rms(heads(at.text_source.text_k_proj(text_h), KV_HEADS), at.k_norm.weight, eps)
            tv = heads(at.text_source.text_v_proj(text_h), KV_HEADS)
            allowed = torch.cat([mask[:, None, :].expand(b, n_img, n_text), image_only], 2)
            z = image_finish(
                block, z, softmax_attention(qi, torch.cat([tk, ki], 2), torch.cat([tv, vi], 2), allowed), mods
            )
        else:  # a cross-attention with query and key norms
            ca = block.cross_attn

            def cross(z_res, ca=ca, text_h=text_h):
                qc = gemma_rms(heads(ca.q_proj(z_res), HEADS), ca.q_norm.weight, eps)
                tk = gemma_rms(heads(ca.text_source.text_k_proj(text_h), KV_HEADS), ca.k_norm.weight, eps)
                tv = heads(ca.text_source.text_v_proj(text_h), KV_HEADS)
                return ca.o_proj(softmax_attention(qc, tk, tv, mask[:, None, :].expand(b, n_img, n_text)))

            z = image_finish(block, z, softmax_attention(qi, ki, vi, image_only), mods, cross)

    head = model.head
    z = gemma_rms(z, head.norm_out.weight, eps)
    if c.timestep_conditioning == "adaln-zero":
        scale, shift = head.modulation.linear(F.silu(emb_final)).chunk(2, 1)
        z = z * (1 + scale[:, None]) + shift[:, None]
    elif c.timestep_conditioning == "adaln-single":
        shift, scale = (head.modulation.scale_shift_table + torch.cat([emb_final, emb_final], 1)).chunk(2, 1)
        z = z * (1 + scale[:, None]) + shift[:, None]
    if c.head_hidden:  # a GELU hidden layer before the projection to patches
        z = F.gelu(z @ head.expand[0].weight.T + head.expand[0].bias, approximate="tanh")
    out = z @ head.proj_out.weight.T + head.proj_out.bias
    out = out.view(b, gh, gw, p, p, -1).permute(0, 5, 1, 3, 2, 4).reshape(b, -1, gh * p, gw * p)
    if c.prediction == "sample":  # the network predicts x_0; the velocity is (x_t - x_0) / max(sigma, 0.05)
        out = (x - out) / (timestep / 1000).clamp(min=0.05).view(-1, 1, 1, 1)
    return out


def naive_text_adapter(kind, source, keys, values, eps):
    """``model.text_adapter`` written out: unit-RMS keys, or per-KV-head matrices on keys and values."""
    if kind == "key-norm":
        return keys * torch.rsqrt(keys.pow(2).mean(-1, keepdim=True) + eps), values
    key_map, value_map = source.adapter.key_map, source.adapter.value_map
    keys = torch.stack([keys[:, i] @ key_map[i] for i in range(keys.shape[1])], 1)
    values = torch.stack([values[:, i] @ value_map[i] for i in range(values.shape[1])], 1)
    return keys, values


# ----------------------------------------------------------------------------------------------------------------------

LAYER_MAPS = {
    "all": dict(),
    "subset": dict(initial_layers=1, shared_attention_layers=[1, 3]),
    "extra-dit": dict(shared_attention_layers=[0, 1, 2], dit_num_hidden_layers=4),
}


def randomize(model, seed):
    """Non-trivial weights everywhere (the default init zeroes gates and outputs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def encode(decoder, model, ids, mask, pooled=False):
    encoder = TextEncoder(
        decoder, tokenizer=None, config=TextConfig(llm="unused"), requirements=model.text_requirements()
    )
    return encoder.encode_tokens(ids, mask)


def inputs(seed, padding_side):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 64, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.bool)
    if padding_side == "left":
        mask[0, :3] = False
    else:
        mask[0, 4:] = False
    ids = ids.masked_fill(~mask, 0)
    x = torch.randn(2, 3, 8, 8, generator=g)
    t = torch.tensor([700.0, 35.0])
    return x, t, ids, mask


def small_deep_model(decoder, **fields):
    """A small deep-fusion FuseDiT on ``decoder`` (8 px pixels, patch 2, 24 wide) with ``fields`` of ModelConfig."""
    geometry = dict(
        fusion="deep", in_channels=3, sample_size=8, patch_size=2, dit_hidden_size=24, dit_intermediate_size=40
    )
    config = ModelConfig(**{**geometry, **fields})
    return build_model(config, LLMGeometry.from_hf_config(decoder.config)).eval()


COMBOS = list(
    itertools.product(
        ["self", "cross"],
        ["ape", "1d-rope", "2d-rope", "m-rope"],
        ["none", "adaln-zero", "adaln-single", "addition"],
        [False, True],
        list(LAYER_MAPS),
    )
)


@pytest.mark.parametrize("attention,pos_embed,timestep,sandwich,layer_map", COMBOS)
def test_matches_naive_joint_attention(attention, pos_embed, timestep, sandwich, layer_map):
    index = COMBOS.index((attention, pos_embed, timestep, sandwich, layer_map))
    family = FAMILIES[(index + index // len(LAYER_MAPS)) % len(FAMILIES)]  # every family meets every layer map
    decoder = copy.deepcopy(DECODERS[family])  # the encoder may drop unused layers of its decoder
    model = small_deep_model(
        decoder,
        attention=attention,
        pos_embed=pos_embed,
        timestep_conditioning=timestep,
        sandwich_norm=sandwich,
        qk_norm=True,
        **LAYER_MAPS[layer_map],
    )
    randomize(model, 3)
    for padding_side in ("left", "right"):
        x, t, ids, mask = inputs(4, padding_side)
        ours = model(x, t, encode(decoder, model, ids, mask))
        naive = naive_forward(model, decoder, family, x, t, ids, mask)
        torch.testing.assert_close(ours, naive, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("timestep", ["adaln-zero", "adaln-single", "addition"])
def test_text_modulation_matches_naive(family, timestep):
    decoder = copy.deepcopy(DECODERS[family])
    config = ModelConfig(
        fusion="deep",
        pos_embed="2d-rope",
        timestep_conditioning=timestep,
        text_modulation=True,
        text_modulation_dim=12,
        in_channels=3,
        sample_size=8,
        dit_hidden_size=24,
    )
    model = build_model(config, LLMGeometry.from_hf_config(decoder.config)).eval()
    randomize(model, 5)
    x, t, ids, mask = inputs(6, "left")
    context = encode(decoder, model, ids, mask)
    context.pooled = torch.randn(2, 12, generator=torch.Generator().manual_seed(7))
    ours = model(x, t, context)
    naive = naive_forward(model, decoder, family, x, t, ids, mask, pooled=context.pooled)
    torch.testing.assert_close(ours, naive, atol=2e-5, rtol=1e-4)


def sincos_table(model_config, gh, gw, dim):
    """The reference's (SD3's) 2D sin-cos table for a ``gh × gw`` patch grid, written out: ``(gh·gw, dim)``.

    A ``pos_embed_max_size``² table with positions ``index · base / max`` (``base`` = patches per side at
    ``sample_size``) is centre-cropped; each token gets ``[sin(col·ω), cos(col·ω), sin(row·ω), cos(row·ω)]`` with
    ``ω_k = 10000^(-k / (dim/4))``.
    """
    size, base = model_config.pos_embed_max_size, model_config.sample_size // model_config.patch_size
    top, left = (size - gh) // 2, (size - gw) // 2
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows = []
    for i in range(gh):
        for j in range(gw):
            row, col = (top + i) * base / size, (left + j) * base / size
            rows.append(
                torch.cat(
                    [torch.sin(col * omega), torch.cos(col * omega), torch.sin(row * omega), torch.cos(row * omega)]
                )
            )
    return torch.stack(rows).float()


@pytest.mark.parametrize("pos_embed", ["1d-rope", "2d-rope", "m-rope"])
def test_absolute_pos_embed_adds_the_sincos_table_on_top_of_rope(pos_embed):
    decoder = copy.deepcopy(DECODERS["gemma2"])
    config = ModelConfig(
        pos_embed=pos_embed,
        absolute_pos_embed=True,
        timestep_conditioning="adaln-zero",
        in_channels=3,
        sample_size=8,
        patch_size=2,
        dit_hidden_size=24,
        dit_intermediate_size=40,
    )
    model = build_model(config, LLMGeometry.from_hf_config(decoder.config)).eval()
    randomize(model, 11)
    # non-square input: the crop is centred on each axis separately
    x = torch.randn(2, 3, 8, 12, generator=torch.Generator().manual_seed(12))
    conv = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=2)
    expected = conv.flatten(2).transpose(1, 2) + sincos_table(config, 4, 6, 24)
    torch.testing.assert_close(model.patch_embed(x), expected, atol=1e-5, rtol=1e-5)
    # the whole model, rotary embeddings included, still equals the naive joint attention
    for padding_side in ("left", "right"):
        xs, t, ids, mask = inputs(13, padding_side)
        ours = model(xs, t, encode(decoder, model, ids, mask))
        torch.testing.assert_close(
            ours, naive_forward(model, decoder, "gemma2", xs, t, ids, mask), atol=2e-5, rtol=1e-4
        )
    # and the table is the only difference from the same weights without it
    plain = build_model(replace(config, absolute_pos_embed=False), LLMGeometry.from_hf_config(decoder.config)).eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    torch.testing.assert_close(
        model.patch_embed(x) - plain.patch_embed(x),
        sincos_table(config, 4, 6, 24).expand(2, -1, -1),
        atol=1e-5,
        rtol=1e-5,
    )


def _adapter_model(attention, adapter, decoder, **extra):
    return small_deep_model(
        decoder,
        attention=attention,
        pos_embed="2d-rope",
        timestep_conditioning="adaln-zero",
        text_adapter=adapter,
        **extra,
    )


@pytest.mark.parametrize("attention", ["self", "cross"])
@pytest.mark.parametrize("adapter", ["key-norm", "linear"])
@pytest.mark.parametrize("family", FAMILIES)
def test_text_adapters_match_naive(attention, adapter, family):
    """The image rows read the adapted LLM keys/values (random, non-identity maps), the LLM's own rows do not."""
    decoder = copy.deepcopy(DECODERS[family])
    model = _adapter_model(attention, adapter, decoder, **LAYER_MAPS["extra-dit"])
    randomize(model, 5)
    x, t, ids, mask = inputs(6, "left")
    ours = model(x, t, encode(decoder, model, ids, mask))
    torch.testing.assert_close(ours, naive_forward(model, decoder, family, x, t, ids, mask), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("attention", ["self", "cross"])
def test_linear_text_adapter_starts_as_the_reference(attention):
    """At initialisation the linear adapter is the identity: the same weights give the reference's output."""
    decoder = copy.deepcopy(DECODERS["gemma2"])
    plain = _adapter_model(attention, "none", decoder)
    randomize(plain, 7)
    adapted = _adapter_model(attention, "linear", decoder)
    missing, unexpected = adapted.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all("adapter" in name for name in missing)
    x, t, ids, mask = inputs(8, "right")
    context = encode(decoder, plain, ids, mask)
    torch.testing.assert_close(adapted(x, t, context), plain(x, t, context))


@pytest.mark.parametrize("adapter", ["none", "linear"])
@pytest.mark.parametrize("family", FAMILIES)
def test_unrotated_text_keys_match_naive(adapter, family):
    """``text_key_rope: false``: the image rows read the LLM's pre-RoPE keys, image positions start at 0."""
    decoder = copy.deepcopy(DECODERS[family])
    model = _adapter_model("self", adapter, decoder, text_key_rope=False)
    randomize(model, 9)
    assert not model.image_follows_text
    for padding_side in ("left", "right"):
        x, t, ids, mask = inputs(10, padding_side)
        ours = model(x, t, encode(decoder, model, ids, mask))
        naive = naive_forward(model, decoder, family, x, t, ids, mask)
        torch.testing.assert_close(ours, naive, atol=2e-5, rtol=1e-4)


def test_unrotated_text_keys_need_deep_self_attention():
    for fusion, attention in (("deep", "cross"), ("shallow", "self")):
        with pytest.raises(ConfigError, match="text_key_rope"):
            ModelConfig(fusion=fusion, attention=attention, text_key_rope=False, in_channels=3).validate()


def test_text_adapter_needs_deep_fusion():
    with pytest.raises(ConfigError, match="text_adapter"):
        ModelConfig(fusion="shallow", text_adapter="linear", in_channels=3).validate()


def test_trimming_padding_changes_nothing():
    decoder = copy.deepcopy(DECODERS["gemma2"])
    model = build_model(
        ModelConfig(pos_embed="2d-rope", in_channels=3, sample_size=8), LLMGeometry.from_hf_config(decoder.config)
    ).eval()
    randomize(model, 8)
    x, t, ids, mask = inputs(9, "left")
    mask[1, :2] = False  # both prompts padded: the first two columns are padding everywhere
    context = encode(decoder, model, ids, mask)
    trimmed = context.trimmed()
    assert trimmed.length == context.length - 2
    torch.testing.assert_close(model(x, t, trimmed), model(x, t, context), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("head_hidden, prediction", [(16, "velocity"), (16, "sample"), (None, "sample")])
def test_output_head_and_prediction_variants_match_naive(head_hidden, prediction):
    decoder = copy.deepcopy(DECODERS["gemma2"])
    config = ModelConfig(
        pos_embed="2d-rope",
        in_channels=3,
        sample_size=8,
        patch_size=4,
        head_hidden=head_hidden,
        prediction=prediction,
        timestep_conditioning="adaln-zero",
        dit_hidden_size=24,
    )
    model = build_model(config, LLMGeometry.from_hf_config(decoder.config)).eval()
    randomize(model, 31)
    x, t, ids, mask = inputs(32, "left")
    ours = model(x, t, encode(decoder, model, ids, mask))
    torch.testing.assert_close(ours, naive_forward(model, decoder, "gemma2", x, t, ids, mask), atol=2e-5, rtol=1e-4)


def test_sample_prediction_turns_the_network_output_into_the_velocity():
    # the same weights predicting the clean sample: the velocity is (x - output) / max(σ, 0.05), and a network that
    # outputs the true x_0 yields the true velocity ε - x_0
    decoder = copy.deepcopy(DECODERS["gemma2"])
    config = ModelConfig(pos_embed="2d-rope", in_channels=3, sample_size=8, timestep_conditioning="adaln-zero")
    geometry = LLMGeometry.from_hf_config(decoder.config)
    velocity = build_model(config, geometry).eval()
    randomize(velocity, 21)
    sample = build_model(replace(config, prediction="sample"), geometry).eval()
    sample.load_state_dict(velocity.state_dict())
    x, _, ids, mask = inputs(22, "left")
    t = torch.tensor([700.0, 10.0])  # σ = 0.7, and 0.01 below the floor
    context = encode(decoder, velocity, ids, mask)
    raw = velocity(x, t, context)
    expected = (x - raw) / torch.tensor([0.7, 0.05]).view(2, 1, 1, 1)
    torch.testing.assert_close(sample(x, t, context), expected, atol=1e-5, rtol=1e-5)
    from fusedit.models.prediction import SamplePrediction

    g = torch.Generator().manual_seed(0)
    x0, noise, sigma = (
        torch.randn(2, 3, 4, 4, generator=g),
        torch.randn(2, 3, 4, 4, generator=g),
        torch.tensor([0.3, 0.9]),
    )
    x_t = (1 - sigma.view(2, 1, 1, 1)) * x0 + sigma.view(2, 1, 1, 1) * noise
    torch.testing.assert_close(SamplePrediction()(x0, x_t, sigma * 1000), noise - x0, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="prediction"):
        replace(config, prediction="sample", out_channels=6).validate()


@pytest.mark.parametrize("attention", ["self", "cross"])
@pytest.mark.parametrize("family", FAMILIES)
def test_unfused_layers_reading_the_llm_hidden_state_match_naive(attention, family):
    """``unfused_text: hidden``: the DiT layers past the map read the LLM's last hidden state (taken here from the
    Hugging Face model's own ``output_hidden_states``), embedded and projected as the shallow baselines do."""
    decoder = copy.deepcopy(DECODERS[family])
    model = _adapter_model(attention, "none", decoder, unfused_text="hidden", **LAYER_MAPS["extra-dit"])
    randomize(model, 11)
    requirements = model.text_requirements()
    assert requirements.hidden_states_index == -1
    last = model.layers[-1]
    reader = last.self_attn.text_source if attention == "self" else last.cross_attn.text_source
    assert type(reader).__name__ == "ProjectedKV"
    for padding_side in ("left", "right"):
        x, t, ids, mask = inputs(12, padding_side)
        hidden = decoder(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states[-1]
        ours = model(x, t, encode(decoder, model, ids, mask))
        naive = naive_forward(model, decoder, family, x, t, ids, mask, hidden=hidden)
        torch.testing.assert_close(ours, naive, atol=2e-5, rtol=1e-4)
        # the last layer does read it: another hidden state changes the output
        other = naive_forward(model, decoder, family, x, t, ids, mask, hidden=hidden.flip(0))
        assert not torch.allclose(other, naive, atol=1e-3)


def test_unfused_text_is_refused_where_it_means_nothing():
    """Only deep fusion with DiT layers past its map can give those layers the hidden state; a clear error
    otherwise (never a silently ignored setting)."""

    decoder = DECODERS["gemma2"]
    with pytest.raises(ConfigError, match=r"model.unfused_text: 'hidden' .* all 4 DiT layers are fused"):
        small_deep_model(decoder, unfused_text="hidden")
    with pytest.raises(ConfigError, match="model.unfused_text: 'hidden' gives deep fusion"):
        ModelConfig(fusion="shallow", unfused_text="hidden").validate()
    with pytest.raises(ConfigError, match="expected 'none' or 'hidden'"):
        ModelConfig(unfused_text="last").validate()
    with pytest.raises(ConfigError, match="model.text_hidden_states_index: got 9"):
        small_deep_model(decoder, unfused_text="hidden", text_hidden_states_index=9, **LAYER_MAPS["extra-dit"])
