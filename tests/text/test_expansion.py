"""Prompt expansion (``text.expansion: greedy``): the prompt is followed by the LLM's own greedy continuation, and
the DiT reads exactly what encoding that longer text gives."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from fusedit.config import ConfigError
from fusedit.experiment import load_experiment
from fusedit.text.cache import CachedTextEncoder
from fusedit.text.config import TextConfig
from fusedit.text.encoder import TextEncoder
from fusedit.text.expansion import PromptExpander
from fusedit.text.llm import load_tokenizer


@pytest.fixture(scope="module")
def expander(tiny_llm_dir):
    return PromptExpander.from_pretrained(str(tiny_llm_dir), load_tokenizer(str(tiny_llm_dir)), " .", 6)


def test_the_continuation_is_the_llm_greedy_generation(expander, tiny_llm_dir):
    tokenizer = expander.tokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_llm_dir).eval()
    ids = tokenizer("a red circle .", return_tensors="pt")
    # an independent greedy decode: the arg-max token appended one at a time, the whole sequence re-run each time
    sequence = ids["input_ids"]
    for _ in range(6):
        with torch.no_grad():
            following = model(input_ids=sequence).logits[0, -1].argmax()
        if int(following) == tokenizer.eos_token_id:
            break
        sequence = torch.cat([sequence, following.view(1, 1)], dim=1)
    continuation = tokenizer.decode(sequence[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert continuation  # random weights still continue the text
    assert expander.expand("a red circle") == f"a red circle . {continuation}".rstrip()


def test_the_empty_prompt_stays_empty_and_continuations_are_remembered(expander, monkeypatch):
    assert expander.expand("") == ""
    first = expander.expand("two green triangles")
    monkeypatch.setattr(expander, "_generate", lambda prompts: pytest.fail("generated again"))
    assert expander.expand("two green triangles") == first
    with pytest.raises(ValueError, match="max_new_tokens"):
        PromptExpander(expander.model, expander.tokenizer, " .", 0)


def test_a_continuation_does_not_depend_on_the_batch_it_came_in(tiny_llm_dir):
    tokenizer = load_tokenizer(str(tiny_llm_dir))
    prompts = ["a red circle", "a blue square", "two green triangles", "a circle", "a white circle", "a red circle"]
    together = PromptExpander.from_pretrained(str(tiny_llm_dir), tokenizer, " .", 6)
    batched = together.expand_all(prompts)
    alone = [PromptExpander.from_pretrained(str(tiny_llm_dir), tokenizer, " .", 6).expand(p) for p in prompts]
    assert batched == alone and len(set(batched)) > 2


def test_an_expanding_encoder_encodes_the_expanded_text(tiny_llm_dir, demo_overrides):
    config = load_experiment("demo", demo_overrides(tiny_llm_dir) + ["text.max_length=24"])
    requirements = dataclasses.replace(config.text, expansion="greedy", expansion_max_new_tokens=8)
    from fusedit.builders import build_components

    parts = build_components(config, device="cpu")
    plain = parts.text_encoder
    expanding = TextEncoder.from_config(requirements, parts.model.text_requirements())
    prompts = ["a red circle to the left of a blue square", "", "two green triangles"]
    expanded = [expanding.formatter.expander.expand(p) for p in prompts]
    assert expanded[1] == "" and all(e.startswith(p + " .") for p, e in zip(prompts, expanded, strict=True) if p)
    got, want = expanding.encode(prompts), plain.encode(expanded)
    for layer in want.keys:
        torch.testing.assert_close(got.keys[layer], want.keys[layer], atol=1e-6, rtol=0)
        torch.testing.assert_close(got.values[layer], want.values[layer], atol=1e-6, rtol=0)
    # the training cache goes through the same formatter
    cached, plain_cached = CachedTextEncoder(expanding).encode(prompts), CachedTextEncoder(plain).encode(expanded)
    for layer in want.keys:
        assert torch.equal(cached.keys[layer], plain_cached.keys[layer])


def test_expansion_settings_are_validated():
    with pytest.raises(ConfigError, match="expansion_max_new_tokens"):
        TextConfig(llm="x", expansion="greedy", expansion_max_new_tokens=0).validate()


def test_a_run_trained_with_expansion_samples_with_it(tmp_path, tiny_llm_dir, demo_overrides):
    from fusedit.sampling.loading import load_pipeline
    from fusedit.train.launch import train_run

    overrides = demo_overrides(tiny_llm_dir) + ["text.expansion=greedy", "text.max_length=24", "train.max_steps=1"]
    config = load_experiment("demo", overrides)
    train_run(config, tmp_path / "run", device="cpu", progress=False)
    pipe = load_pipeline(tmp_path / "run", device="cpu")
    formatter = pipe._current_sampler().text_encoder.formatter
    assert formatter.format("a red circle").startswith("a red circle . ") and formatter.format("") == ""
    image = pipe(["a red circle"], num_inference_steps=1, output_type="pt").images
    assert image.shape == (1, 3, 16, 16)
    pipe.prompt_expander = None  # what a saved pipeline has: only the layers the transformer reads
    with pytest.raises(ValueError, match="prompt expansion"):
        pipe(["a red circle"], num_inference_steps=1)


def test_known_captions_are_expanded_ahead_in_one_pass(tiny_llm_dir, monkeypatch):
    from fusedit.data.config import ShapesWorldConfig
    from fusedit.data.shapes import ShapesDataset, ShapesWorld
    from fusedit.text.expansion import expand_ahead

    world = ShapesWorld(ShapesWorldConfig(size=64, max_objects=2), 16)
    dataset = ShapesDataset(world)
    config = TextConfig(llm=str(tiny_llm_dir), dtype="float32", max_length=24, expansion="greedy")
    from fusedit.text.context import TextRequirements

    encoder = TextEncoder.from_config(config, TextRequirements(kv_layers=(0,)))
    assert expand_ahead(encoder, dataset) == len(world.training_prompts()) > 10
    monkeypatch.setattr(encoder.formatter.expander, "_generate", lambda prompts: pytest.fail("generated again"))
    encoder.encode([dataset[i]["caption"] for i in range(8)])
    assert expand_ahead(encoder, object()) == 0  # a dataset that cannot list its captions: nothing ahead
    plain = TextEncoder.from_config(dataclasses.replace(config, expansion="none"), TextRequirements(kv_layers=(0,)))
    assert expand_ahead(plain, dataset) == 0
