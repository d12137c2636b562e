"""FuseDiTTransformer2DModel: every ModelConfig field travels through config.json, save_pretrained/from_pretrained
(safetensors, sharded, torch_dtype) give the same network, deep fusion and the shallow baselines alike."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from fusedit.config import ConfigError, to_dict
from fusedit.diffusers_native.transformer import FuseDiTTransformer2DModel
from fusedit.models.config import LLMGeometry, ModelConfig
from fusedit.models.dit import build_model
from fusedit.text.context import TextContext

LLM = LLMGeometry("gemma2", 32, 2, 2, 1, 16, 48, 1e-6, 10000.0)
DEEP = ModelConfig(
    in_channels=3,
    patch_size=4,
    sample_size=16,
    dit_hidden_size=32,
    absolute_pos_embed=True,
    pos_embed_max_size=16,
    timestep_conditioning="adaln-zero",
    prediction="sample",
)
SHALLOW = dataclasses.replace(
    DEEP, fusion="shallow", attention="cross", pos_embed="1d-rope", prediction="velocity", sandwich_norm=False
)


def random_context(model, batch: int = 2, length: int = 5) -> TextContext:
    generator = torch.Generator().manual_seed(3)
    req, geometry = model.text_requirements(), model.resolved.llm
    kv = (batch, geometry.num_key_value_heads, length, geometry.head_dim)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, :2] = False
    context = TextContext(
        mask=mask,
        keys={i: torch.randn(kv, generator=generator) for i in req.kv_layers},
        values={i: torch.randn(kv, generator=generator) for i in req.kv_layers},
    )
    if req.hidden_states_index is not None:
        context.hidden_states = torch.randn(batch, length, geometry.hidden_size, generator=generator)
    return context


def test_config_json_carries_every_model_config_field(tmp_path):
    model = FuseDiTTransformer2DModel.build(DEEP, LLM)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert set(saved["model_config"]) == {f.name for f in dataclasses.fields(ModelConfig)}
    assert saved["model_config"] == to_dict(DEEP) and saved["llm_geometry"] == dataclasses.asdict(LLM)
    assert saved["_class_name"] == "FuseDiTTransformer2DModel"


@pytest.mark.parametrize("config", [DEEP, SHALLOW], ids=["deep", "shallow"])
def test_save_and_load_give_the_same_network(tmp_path, config):
    torch.manual_seed(0)
    source = build_model(config, LLM)
    with torch.no_grad():
        for param in source.parameters():
            param.add_(0.05 * torch.randn(param.shape))
    model = FuseDiTTransformer2DModel.from_model(source)
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(source.parameters(), model.parameters(), strict=True))
    model.save_pretrained(tmp_path, max_shard_size="20KB")  # sharded: several files and an index
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    loaded = FuseDiTTransformer2DModel.from_pretrained(tmp_path)
    assert loaded.model_config == config
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([300.0, 800.0])
    context = random_context(source)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, context), source(x, t, context), rtol=0, atol=0)
    half = FuseDiTTransformer2DModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_a_bad_config_is_refused_with_the_key():
    with pytest.raises(ConfigError, match="unknown key 'model.no_such_field'"):
        FuseDiTTransformer2DModel(model_config={"no_such_field": 1}, llm_geometry=dataclasses.asdict(LLM))
    with pytest.raises(ConfigError, match="llm_geometry: missing"):
        FuseDiTTransformer2DModel(model_config=to_dict(DEEP))
