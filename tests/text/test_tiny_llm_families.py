"""The tiny LLM's families (``TinyLLMConfig.family``: gemma2, llama, qwen3) and its instruction prefix: each family
pretrains, saves and loads as its transformers class with the same size; the family and the instruction are part of
what decides whether a saved tiny LLM is reused; a FuseDiT builds and trains on each family."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusedit.config import ConfigError
from fusedit.data.config import ShapesWorldConfig
from fusedit.data.shapes import ShapesWorld
from fusedit.experiment import load_experiment
from fusedit.models.config import LLMGeometry
from fusedit.text.llm import load_llm
from fusedit.text.tiny_llm import (
    MARKER_NAME,
    TINY_LLM_FAMILIES,
    UNK_ID,
    TinyLLMConfig,
    build_tiny_llm,
    ensure_shapes_world_llm,
    ensure_tiny_llm,
    marker_matches,
    pretrain_tiny_llm,
    read_marker,
)
from fusedit.train.launch import train_run
from tests.conftest import TINY_LLM, overrides_for

CORPUS = ["a red circle", "a blue square to the left of a green triangle", "two white squares", "a yellow circle"]
SMALL = dataclasses.replace(TINY_LLM, steps=3, batch_size=4, max_length=16)
CLASSES = {"gemma2": "Gemma2ForCausalLM", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def test_families_are_the_three_named():
    assert tuple(TINY_LLM_FAMILIES) == ("gemma2", "llama", "qwen3") and TinyLLMConfig().family == "gemma2"


@pytest.mark.parametrize("family", list(CLASSES))
def test_each_family_pretrains_saves_and_loads_with_the_same_geometry(tmp_path, family):
    config = dataclasses.replace(SMALL, family=family)
    folder = pretrain_tiny_llm(CORPUS, tmp_path / family, config)
    saved = json.loads((folder / "config.json").read_text())
    assert saved["architectures"] == [CLASSES[family]] and read_marker(folder)["config"]["family"] == family
    geometry = LLMGeometry.from_hf_config(AutoModelForCausalLM.from_pretrained(folder).config)
    # what a FuseDiT copies is the same in every family (RoPE base and norm epsilon included)
    assert dataclasses.replace(geometry, model_type="-") == LLMGeometry(
        "-", 32, 2, 2, 1, 16, 48, rms_norm_eps=1e-6, rope_theta=10000.0
    )
    assert geometry.model_type == family
    decoder = load_llm(str(folder))
    ids = AutoTokenizer.from_pretrained(folder)(["a red circle"], return_tensors="pt")["input_ids"]
    assert torch.isfinite(decoder(input_ids=ids).last_hidden_state).all()


def test_families_share_vocabulary_and_differ_in_weights():
    models = {f: build_tiny_llm(dataclasses.replace(SMALL, family=f), vocab_size=20) for f in CLASSES}
    assert {type(m).__name__ for m in models.values()} == set(CLASSES.values())
    assert all(m.get_input_embeddings().weight.shape == (20, 32) for m in models.values())
    assert hasattr(models["qwen3"].model.layers[0].self_attn, "q_norm")  # Qwen 3's per-head query/key norms


def test_family_and_instruction_decide_reuse_and_old_markers_still_match(tmp_path, capsys):
    folder = pretrain_tiny_llm(CORPUS, tmp_path / "llm", SMALL)
    capsys.readouterr()
    for changed in (dataclasses.replace(SMALL, family="llama"), dataclasses.replace(SMALL, instruction="draw :")):
        assert not marker_matches(read_marker(folder), changed)
    ensure_tiny_llm(folder, CORPUS, dataclasses.replace(SMALL, family="qwen3"))
    assert "tiny-llm step" in capsys.readouterr().out and read_marker(folder)["config"]["family"] == "qwen3"
    # a marker written before family/instruction existed (a gemma2 pretraining, no prefix) is still reused
    marker = read_marker(folder)
    ensure_tiny_llm(folder, CORPUS, SMALL)
    marker = read_marker(folder)
    del marker["config"]["family"], marker["config"]["instruction"]
    (folder / MARKER_NAME).write_text(json.dumps(marker))
    capsys.readouterr()
    assert ensure_tiny_llm(folder, CORPUS, SMALL) == folder and "tiny-llm step" not in capsys.readouterr().out
    assert not marker_matches(marker, dataclasses.replace(SMALL, family="llama"))


def test_bad_family_and_instruction_are_refused():
    with pytest.raises(ConfigError, match="TinyLLMConfig.family: got 'gpt2', expected one of gemma2, llama, qwen3"):
        TinyLLMConfig(family="gpt2").validate()
    with pytest.raises(ConfigError, match="TinyLLMConfig.instruction"):
        TinyLLMConfig(instruction="two\nlines").validate()


def test_instruction_prefix_is_learned_as_words_before_every_line(tmp_path):
    world = ShapesWorld(ShapesWorldConfig(max_objects=2), 32)
    config = dataclasses.replace(SMALL, steps=1, max_length=48, instruction="Generate an image of:")
    folder = ensure_shapes_world_llm(tmp_path / "tuned", world, config)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.convert_tokens_to_ids("generate") != UNK_ID and tokenizer.convert_tokens_to_ids("image") != UNK_ID
    base = ensure_shapes_world_llm(tmp_path / "base", world, dataclasses.replace(config, instruction=""))
    assert AutoTokenizer.from_pretrained(base).convert_tokens_to_ids("generate") == UNK_ID
    assert read_marker(folder)["corpus_sha256"] != read_marker(base)["corpus_sha256"]
    assert read_marker(folder)["final_scene_loss"] > 0  # the scene objective found each caption after the prefix


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_deep_fusion_trains_on_each_family(tmp_path, family):
    """A FuseDiT on a llama / qwen3 tiny LLM trains end to end (gemma2 is every other run's LLM)."""
    corpus = ShapesWorld(ShapesWorldConfig(), 16).caption_corpus()
    config = dataclasses.replace(SMALL, family=family, steps=0, max_length=40)
    folder = pretrain_tiny_llm(corpus, tmp_path / "llm", config)
    experiment = load_experiment("demo", overrides_for(folder) + ["train.max_steps=2"])
    summary = train_run(experiment, tmp_path / "run", device="cpu", progress=False)
    assert summary.step == 2 and all(torch.isfinite(torch.tensor(v)) for v in summary.losses.values())
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
