"""Which projections get adapters, what trains, and the adapters' names in peft's format."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import LoraLayer

from fusedit.config import ConfigError
from fusedit.finetune.config import LoRAConfig
from fusedit.finetune.lora import (
    count_parameters,
    from_peft_keys,
    inject_dit_lora,
    inject_llm_lora,
    is_adapted,
    to_peft_keys,
)
from fusedit.models.config import LLMGeometry, ModelConfig
from fusedit.models.dit import build_model

LLM = LLMGeometry("gemma2", 32, 2, 2, 1, 16, 48, 1e-6, 10000.0)


def tiny_model(**fields):
    torch.manual_seed(0)
    config = ModelConfig(
        sample_size=8, patch_size=2, in_channels=3, dit_hidden_size=32, dit_intermediate_size=48, **fields
    )
    return build_model(config, LLM)


def adapted_modules(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def test_attention_and_mlp_of_every_block_get_adapters_and_only_they_train():
    model = tiny_model()
    inject_dit_lora(model, LoRAConfig(rank=2))
    leaves = {name.rsplit(".", 1)[1] for name in adapted_modules(model)}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(name.startswith("layers.") for name in adapted_modules(model)), "only the blocks' projections"
    assert len(adapted_modules(model)) == 7 * len(model.layers)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert is_adapted(model)


def test_single_names_and_the_cross_attention_and_shallow_projections():
    model = tiny_model(attention="cross")
    inject_dit_lora(model, LoRAConfig(rank=2, target_modules=["q_proj"]))
    assert {n.split(".", 2)[2] for n in adapted_modules(model)} == {"self_attn.q_proj", "cross_attn.q_proj"}
    shallow = tiny_model(fusion="shallow")
    inject_dit_lora(shallow, LoRAConfig(rank=2, target_modules=["attention"]))
    assert any(n.endswith("text_source.text_k_proj") for n in adapted_modules(shallow))


def test_a_name_this_model_lacks_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"target_modules: 'text_k_proj' matches no linear layer of this model"):
        inject_dit_lora(tiny_model(), LoRAConfig(target_modules=["text_k_proj"]))


def test_the_adapted_model_starts_as_the_base_model():
    model = tiny_model()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([500.0, 100.0])
    with torch.no_grad():
        for p in model.parameters():  # non-zero output head: the output depends on every layer
            p.add_(0.05 * torch.randn_like(p))
        context = _context(2)
        before = model(x, t, context)
        inject_dit_lora(model, LoRAConfig(rank=2))
        assert torch.equal(model(x, t, context), before), "lora_B starts at zero"


def test_lora_trains_a_small_fraction_of_the_parameters():
    model = tiny_model()
    total_before = sum(p.numel() for p in model.parameters())
    inject_dit_lora(model, LoRAConfig(rank=1, target_modules=["attention"]))
    trainable, total = count_parameters(model)
    assert total == total_before + trainable
    assert 0 < trainable < 0.1 * total


def test_peft_names_round_trip():
    weights = {
        "layers.0.self_attn.q_proj.lora_A.default.weight": torch.ones(2, 4),
        "layers.0.self_attn.q_proj.lora_B.default.weight": torch.zeros(4, 2),
    }
    peft = to_peft_keys(weights)
    assert set(peft) == {
        "base_model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.layers.0.self_attn.q_proj.lora_B.weight",
    }
    assert from_peft_keys(peft) == weights
    assert to_peft_keys({"llm.decoder.layers.0.q.lora_A.default.weight": torch.ones(1)}, "llm.decoder.") == {
        "base_model.model.layers.0.q.lora_A.weight": torch.ones(1)
    }


def test_llm_adapters_only_when_asked():
    from transformers import Gemma2Config, Gemma2Model

    decoder = Gemma2Model(
        Gemma2Config(
            vocab_size=16,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            intermediate_size=48,
        )
    )
    assert inject_llm_lora(decoder, LoRAConfig()) is None and not is_adapted(decoder)
    inject_llm_lora(decoder, LoRAConfig(rank=2, llm_target_modules=["k_proj", "v_proj"]))
    assert {n.rsplit(".", 1)[1] for n in adapted_modules(decoder)} == {"k_proj", "v_proj"}
    assert all(".lora_" in n for n, p in decoder.named_parameters() if p.requires_grad)


def _context(batch: int):
    from fusedit.text.context import TextContext

    kv = {i: torch.randn(batch, 1, 5, 16) for i in range(2)}
    return TextContext(mask=torch.ones(batch, 5, dtype=torch.bool), keys=kv, values=dict(kv), raw_keys={})
