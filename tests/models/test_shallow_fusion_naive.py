"""The shallow-fusion baselines (self- and cross-attention DiT) equal a naive computation written out here."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding
from transformers import Gemma2Config, Gemma2ForCausalLM

from fusedit.models.config import LLMGeometry, ModelConfig
from fusedit.models.dit import build_model
from fusedit.text.config import TextConfig
from fusedit.text.encoder import TextEncoder

from .naive_reference import gemma_rms, heads, image_rope, softmax_attention  # noqa: E402


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8


def decoder():
    torch.manual_seed(11)
    config = Gemma2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        pad_token_id=0,
    )
    return Gemma2ForCausalLM(config).model.eval()


def naive(model, hidden, mask, x, t):
    c, r = model.resolved.config, model.resolved
    eps = r.rms_norm_eps
    b, _, height, width = x.shape
    p = c.patch_size
    gh, gw = height // p, width // p
    n_img, n_text = gh * gw, hidden.shape[1]
    ce = model.context_embedder
    text = ce[1](gemma_rms(hidden, ce[0].weight, eps))
    emb = None
    if c.timestep_conditioning != "none":
        te = model.timestep
        emb = te.timestep_embedder[2](
            F.silu(
                te.timestep_embedder[0](get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0))
            )
        )
    final_emb = emb
    if c.timestep_conditioning == "adaln-single":
        emb = model.timestep.t_block[1](F.silu(emb))
    z = model.patch_embed(x)
    if c.timestep_conditioning == "addition":
        z = z + final_emb[:, None]
    # offsets do not matter for the baselines (text keys carry no RoPE): use 0 like the reference's DiT
    rope = image_rope(c.pos_embed, gh, gw, torch.zeros(b, dtype=torch.long), HEAD_DIM, r.rope_theta)

    def rot(v):
        from .naive_reference import rotate

        return v if rope is None else rotate(v, *rope)

    for block in model.layers:
        if c.timestep_conditioning == "adaln-zero":
            mods = block.modulation.linear(F.silu(emb)).chunk(6, 1)
        elif c.timestep_conditioning == "adaln-single":
            mods = (block.modulation.scale_shift_table + emb).chunk(6, 1)
        else:
            zero, one = torch.zeros(b, r.hidden_size), torch.ones(b, r.hidden_size)
            mods = (zero, zero, one, zero, zero, one)
        sh, sc, g, sh2, sc2, g2 = mods
        zn = gemma_rms(z, block.input_layernorm.weight, eps) * (1 + sc[:, None]) + sh[:, None]
        at = block.self_attn
        q = rot(gemma_rms(heads(at.q_proj(zn), HEADS), at.q_norm.weight, eps))
        k = rot(gemma_rms(heads(at.k_proj(zn), KV_HEADS), at.k_norm.weight, eps))
        v = heads(at.v_proj(zn), KV_HEADS)
        if c.attention == "self":
            src = at.text_source
            tk = gemma_rms(heads(src.text_k_proj(text), KV_HEADS), at.k_norm.weight, eps)
            tv = heads(src.text_v_proj(text), KV_HEADS)
            allowed = torch.cat([mask, torch.ones(b, n_img, dtype=torch.bool)], 1)[:, None].expand(b, n_img, -1)
            out = softmax_attention(q, torch.cat([tk, k], 2), torch.cat([tv, v], 2), allowed)
        else:
            out = softmax_attention(q, k, v, torch.ones(b, n_img, n_img, dtype=torch.bool))
        a = at.o_proj(out)
        if c.sandwich_norm:
            a = gemma_rms(a, block.attn_out_norm.weight, eps)
        z = z + g[:, None] * a
        if c.attention == "cross":
            ca = block.cross_attn
            qc = gemma_rms(heads(ca.q_proj(z), HEADS), ca.q_norm.weight, eps)
            tk = gemma_rms(heads(ca.text_source.text_k_proj(text), KV_HEADS), ca.k_norm.weight, eps)
            tv = heads(ca.text_source.text_v_proj(text), KV_HEADS)
            cross = ca.o_proj(softmax_attention(qc, tk, tv, mask[:, None].expand(b, n_img, n_text)))
            if c.sandwich_norm:
                cross = gemma_rms(cross, block.cross_out_norm.weight, eps)
            z = z + cross
        zn = gemma_rms(z, block.ffn_norm.weight, eps) * (1 + sc2[:, None]) + sh2[:, None]
        m = block.mlp.down_proj(F.gelu(block.mlp.gate_proj(zn), approximate="tanh") * block.mlp.up_proj(zn))
        if c.sandwich_norm:
            m = gemma_rms(m, block.ffn_out_norm.weight, eps)
        z = z + g2[:, None] * m
    z = gemma_rms(z, model.head.norm_out.weight, eps)
    if c.timestep_conditioning == "adaln-zero":
        scale, shift = model.head.modulation.linear(F.silu(final_emb)).chunk(2, 1)
        z = z * (1 + scale[:, None]) + shift[:, None]
    elif c.timestep_conditioning == "adaln-single":
        shift, scale = (model.head.modulation.scale_shift_table + torch.cat([final_emb] * 2, 1)).chunk(2, 1)
        z = z * (1 + scale[:, None]) + shift[:, None]
    out = model.head.proj_out(z).view(b, gh, gw, p, p, -1).permute(0, 5, 1, 3, 2, 4)
    return out.reshape(b, -1, gh * p, gw * p)


COMBOS = list(
    itertools.product(
        ["self", "cross"],
        ["ape", "1d-rope", "2d-rope", "m-rope"],
        ["none", "adaln-zero", "adaln-single", "addition"],
        [False, True],
    )
)


@pytest.mark.parametrize("attention,pos_embed,timestep,sandwich", COMBOS)
def test_baseline_matches_naive(attention, pos_embed, timestep, sandwich):
    llm = decoder()
    config = ModelConfig(
        fusion="shallow",
        attention=attention,
        pos_embed=pos_embed,
        timestep_conditioning=timestep,
        sandwich_norm=sandwich,
        in_channels=3,
        sample_size=8,
        dit_hidden_size=24,
        dit_num_hidden_layers=2,
        text_hidden_states_index=2,
    )
    model = build_model(config, LLMGeometry.from_hf_config(llm.config)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ids = torch.randint(4, 64, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :2] = False
    encoder = TextEncoder(llm, None, TextConfig(llm="unused"), model.text_requirements())
    context = encoder.encode_tokens(ids, mask)
    hidden = llm(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states[2]
    x, t = torch.randn(2, 3, 8, 8, generator=g), torch.tensor([300.0, 900.0])
    torch.testing.assert_close(model(x, t, context), naive(model, hidden, mask, x, t), atol=2e-5, rtol=1e-4)
