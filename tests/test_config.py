"""Configs: YAML + base chains + overrides, typed validation, and clear errors for every kind of mistake."""

from __future__ import annotations

import pytest

from fusedit.config import ConfigError, list_shipped_configs
from fusedit.experiment import load_experiment
from fusedit.models.config import LLMGeometry, ModelConfig, resolve_model_config

GEOMETRY = LLMGeometry(
    model_type="gemma2",
    hidden_size=64,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
)


EXPERIMENTS = [n for n in list_shipped_configs() if not n.startswith("studies/")]  # studies are grid files


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_shipped_config_loads(name):
    config = load_experiment(name)
    assert config.name


def test_reference_configs_cover_the_study():
    names = set(list_shipped_configs())
    for variant in (
        "baseline",
        "1d-rope",
        "2d-rope",
        "m-rope",
        "adaln-single",
        "addition",
        "no-temb",
        "cross-attention",
        "clip-mod",
        "gemma-2",
        "gemma-it",
        "gemma-it-instruction",
        "paligemma",
        "hidden-size-1280",
        "hidden-size-1536",
        "hidden-size-1792",
        "layers-10",
        "layers-14",
        "large-scale",
        "baseline-dit-self",
        "baseline-dit-cross",
    ):
        assert f"reference/{variant}" in names
    large = load_experiment("reference/large-scale")
    assert (large.model.pos_embed, large.model.timestep_conditioning, large.model.sandwich_norm) == (
        "2d-rope",
        "none",
        True,
    )
    assert large.text.llm == "google/gemma-2-2b" and large.model.dit_num_hidden_layers == 26
    layers = load_experiment("reference/layers-10")
    assert layers.model.shared_attention_layers == list(range(4, 14)) and layers.model.initial_layers == 4


def test_base_chain_and_overrides(tmp_path):
    (tmp_path / "a.yaml").write_text("model:\n  pos_embed: ape\n  in_channels: 3\ntrain:\n  lr: 1e-3\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nmodel:\n  attention: cross\n")
    config = load_experiment(tmp_path / "b.yaml", ["model.pos_embed=m-rope", "train.max_steps=7"])
    assert (config.model.pos_embed, config.model.attention, config.train.lr, config.train.max_steps) == (
        "m-rope",
        "cross",
        1e-3,
        7,
    )


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.pos_embd=ape"], "unknown key 'model.pos_embd' in section 'model'; allowed keys:"),
        (["modle.pos_embed=ape"], "unknown key 'modle'"),
        (
            ["model.pos_embed=3d-rope"],
            "model.pos_embed: got '3d-rope', expected one of 'ape', '1d-rope', '2d-rope', 'm-rope'",
        ),
        (["model.qk_norm=maybe"], "model.qk_norm: got 'maybe', expected true or false"),
        (["train.max_steps=ten"], "train.max_steps: got 'ten', expected an integer"),
        (["train.max_steps=0"], "train.max_steps: got 0, expected a positive integer"),
        (["train.batch_size=10", "train.gradient_accumulation_steps=4"], "must be divisible"),
        (["model.text_modulation=true", "model.timestep_conditioning=none"], "needs a timestep embedding"),
        (["model.shared_attention_layers=[3, 1]"], "strictly increasing"),
        (["model.pos_embed=ape", "model.absolute_pos_embed=true"], "pos_embed 'ape' has it already"),
        (
            ["model.pos_embed=ape", "model.absolute_pos_embed=false", "model.pos_embed_max_size=2"],
            "model.pos_embed_max_size: got 2, but model.sample_size=32 is 4 patches per side",
        ),
        (["model.absolute_pos_embed=true", "model.pos_embed_max_size=2"], "the sin-cos table needs at least that many"),
        (["model.initial_layers=2", "model.shared_attention_layers=[1, 2]"], "run text-only"),
        (["data.source=folder"], "data.path: data.source=folder needs data.path"),
        (["model.in_channels=16"], "in_channels=3"),
        (["train.caption_dropout=1.5"], "train.caption_dropout: got 1.5"),
        (["text.trainable=true", "train.llm_lr_scale=0"], "train.llm_lr_scale: got 0.0, expected > 0"),
        (["train.llm_lr_scale=0.1"], "scales the learning rate of a training LLM, but the LLM is frozen"),
        (["train.max_steps"], "must look like key=value"),
    ],
)
def test_bad_configs_fail_with_a_clear_message(overrides, message):
    base = ["model.in_channels=3"] if not any(o.startswith("model.in_channels") for o in overrides) else []
    with pytest.raises(ConfigError) as error:
        load_experiment("demo", base + overrides)
    assert message in str(error.value)


def test_bad_yaml_and_missing_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_experiment(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_experiment(tmp_path / "missing.yaml")
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_experiment(tmp_path / "loop.yaml")


@pytest.mark.parametrize(
    "config,message",
    [
        (
            ModelConfig(num_attention_heads=8),
            "deep fusion shares attention with the LLM, so the DiT's num_attention_heads "
            "must equal the LLM's (4); got 8",
        ),
        (ModelConfig(head_dim=32), "head_dim must equal the LLM's (16); got 32"),
        (ModelConfig(shared_attention_layers=[2, 6]), "layer 6 is past the LLM's depth (6 layers, indices 0..5)"),
        (ModelConfig(initial_layers=6), "model.initial_layers: got 6, but the LLM has only 6 layers"),
        (ModelConfig(shared_attention_layers=[0, 1, 2], dit_num_hidden_layers=2), "expected at least 3"),
        (ModelConfig(fusion="shallow", text_hidden_states_index=9), "model.text_hidden_states_index: got 9"),
    ],
)
def test_invalid_combinations_with_the_llm(config, message):
    with pytest.raises(ConfigError) as error:
        resolve_model_config(config, GEOMETRY)
    assert message in str(error.value)


def test_layer_map_resolution():
    resolved = resolve_model_config(
        ModelConfig(initial_layers=1, shared_attention_layers=[1, 3], dit_num_hidden_layers=4), GEOMETRY
    )
    assert resolved.layer_map == (1, 3, None, None)
    assert resolve_model_config(ModelConfig(initial_layers=2), GEOMETRY).layer_map == (2, 3, 4, 5)
    baseline = resolve_model_config(ModelConfig(fusion="shallow", num_attention_heads=8, head_dim=8), GEOMETRY)
    assert baseline.num_attention_heads == 8 and baseline.layer_map == (None,) * 6


def test_the_old_model_kind_key_is_read_with_a_message():
    with pytest.warns(FutureWarning, match="model.kind is renamed model.fusion: read kind: dit as fusion: shallow"):
        config = load_experiment(None, ["model.kind=dit", "model.in_channels=3"])
    assert config.model.fusion == "shallow"
    with pytest.raises(ConfigError, match="model: kind='fusedit' and fusion='shallow' disagree"):
        load_experiment("tiny/baseline-dit-self", ["model.kind=fusedit"])
    with pytest.raises(ConfigError, match="model.kind: got 'big', expected fusedit or dit"):
        load_experiment("demo", ["model.kind=big"])
