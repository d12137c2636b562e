"""Training properties: every trainable parameter gets a gradient; the frozen LLM gets none and keeps no graph."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from fusedit.models.config import LLMGeometry, ModelConfig
from fusedit.models.dit import build_model
from fusedit.text.config import TextConfig
from fusedit.text.encoder import TextEncoder

VARIANTS = [
    dict(fusion="deep", attention="self", pos_embed="2d-rope", timestep_conditioning="none"),
    dict(fusion="deep", attention="cross", pos_embed="ape", timestep_conditioning="adaln-zero"),
    dict(
        fusion="deep",
        attention="self",
        pos_embed="m-rope",
        timestep_conditioning="adaln-single",
        text_modulation=True,
        shared_attention_layers=[1, 2],
        initial_layers=1,
        dit_num_hidden_layers=3,
    ),
    dict(fusion="deep", attention="self", pos_embed="1d-rope", timestep_conditioning="addition", sandwich_norm=False),
    dict(fusion="shallow", attention="self", pos_embed="2d-rope", timestep_conditioning="adaln-zero"),
    dict(fusion="shallow", attention="cross", pos_embed="ape", timestep_conditioning="adaln-single"),
]


def llm():
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        pad_token_id=0,
    )
    return Gemma2ForCausalLM(config).model


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(x) for x in v.values()))
def test_every_trainable_parameter_gets_a_gradient_and_the_llm_none(variant):
    decoder = llm()
    torch.manual_seed(1)
    model = build_model(
        ModelConfig(in_channels=3, sample_size=8, **variant), LLMGeometry.from_hf_config(decoder.config)
    )
    # Break the zero initialisation of gates/outputs so that every parameter influences the output.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    config = TextConfig(llm="unused", pooled="llm-mean" if variant.get("text_modulation") else "none")
    encoder = TextEncoder(decoder, None, config, model.text_requirements())
    ids = torch.randint(4, 64, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, :2] = False
    context = encoder.encode_tokens(ids, mask)
    tensors = list(context.keys.values()) + list(context.values.values()) + list(context.raw_keys.values())
    if context.hidden_states is not None:
        tensors.append(context.hidden_states)
    assert tensors and all(t.grad_fn is None and not t.requires_grad for t in tensors), "frozen LLM kept a graph"
    model(torch.randn(2, 3, 8, 8), torch.tensor([10.0, 800.0]), context).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"
    assert all(p.grad is None for p in decoder.parameters())


def test_bf16_llm_and_model_run_and_stay_close_to_fp32():
    decoder = llm().eval()
    torch.manual_seed(2)
    model = build_model(
        ModelConfig(in_channels=3, sample_size=8, timestep_conditioning="adaln-zero"),
        LLMGeometry.from_hf_config(decoder.config),
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ids = torch.randint(4, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 5, dtype=torch.bool)
    x, t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4)), torch.tensor([10.0, 800.0])
    encoder = TextEncoder(decoder, None, TextConfig(llm="unused"), model.text_requirements())
    with torch.no_grad():
        reference = model(x, t, encoder.encode_tokens(ids, mask))
        encoder.decoder.to(torch.bfloat16)
        context = encoder.encode_tokens(ids, mask)
        assert context.keys[0].dtype == torch.bfloat16
        mixed = model(x, t, context)  # fp32 DiT reading a bf16 text context
        low = model.to(torch.bfloat16)(x.bfloat16(), t, context)
    assert mixed.dtype == torch.float32 and low.dtype == torch.bfloat16
    torch.testing.assert_close(mixed, reference, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(low.float(), reference, atol=1e-1, rtol=1e-1)
