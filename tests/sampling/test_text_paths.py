"""Cached sampling = uncached sampling = training-time sampling, on a model whose output depends on the text; and
the comparison catches a pipeline that encodes the wrong prompts or zeroes the text keys/values (planted errors).

* cached: the pipeline's default, the text context computed once per call (the unconditional one cached);
* uncached: ``use_text_cache=False``, no text context at all, the LLM run inside every step over ``[text ; image]``
  (the reference's formulation, :mod:`fusedit.reference.joint`);
* training-time: the text encoded as the trainer encodes captions (``text_encoder.encode``, conditional and
  unconditional batches apart), one model forward per branch, in a loop written here.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import fusedit.sampling.text as sampling_text
from fusedit.experiment import load_experiment
from fusedit.sampling.pipeline import FuseDiTPipeline, make_scheduler
from fusedit.text.encoder import TextEncoder
from tests.conftest import text_dependent_components

PROMPTS = ["a red circle to the left of a blue square", "two green triangles"]
OTHER_PROMPTS = ["a white square above a yellow circle", "a purple circle"]
TOLERANCE = 1e-5  # two different computations agreeing to float precision (measured: about 1e-6)
STEPS, GUIDANCE = 3, 3.0


@pytest.fixture(scope="module")
def pipe(tiny_llm_dir, demo_overrides) -> FuseDiTPipeline:
    """The demo's model (deep fusion, 2D RoPE + sin-cos table, AdaLN-Zero, pooled-text modulation) on the tiny
    Gemma 2 LLM, with random weights large enough that the output depends on the text."""
    config = load_experiment("demo", demo_overrides(tiny_llm_dir))
    parts = text_dependent_components(config)
    return FuseDiTPipeline(
        parts.model,
        parts.text_encoder,
        make_scheduler(config.sample.shift),
        parts.codec,
        defaults=config.sample,
        config=config,
    )


def latents() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def pipeline_sampling(pipe: FuseDiTPipeline, prompts: list[str], cached: bool) -> torch.Tensor:
    return pipe(
        prompts,
        height=16,
        width=16,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        latents=latents(),
        output_type="latent",
        use_text_cache=cached,
    ).images


@torch.no_grad()
def training_time_sampling(pipe: FuseDiTPipeline, prompts: list[str]) -> torch.Tensor:
    """Euler + CFG written out, each branch's text encoded as the trainer encodes captions."""
    encoder, model, scheduler = pipe.text_encoder, pipe.model, make_scheduler(pipe.defaults.shift)
    scheduler.set_timesteps(STEPS)
    x = latents()
    for t in scheduler.timesteps:
        v_cond = model(x, t.expand(len(prompts)), encoder.encode(prompts))
        v_uncond = model(x, t.expand(len(prompts)), encoder.encode([""] * len(prompts)))
        x = scheduler.step(v_uncond + GUIDANCE * (v_cond - v_uncond), t, x, return_dict=False)[0]
    return x


def assert_sampling_paths_agree(pipe: FuseDiTPipeline, prompts: list[str]) -> torch.Tensor:
    """The comparison under test: cached = uncached = training-time within :data:`TOLERANCE`; returns the cached
    latents."""
    cached = pipeline_sampling(pipe, prompts, cached=True)
    torch.testing.assert_close(pipeline_sampling(pipe, prompts, cached=False), cached, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(training_time_sampling(pipe, prompts), cached, atol=TOLERANCE, rtol=0)
    return cached


def test_cached_uncached_and_training_time_sampling_agree_on_a_text_dependent_model(pipe):
    cached = assert_sampling_paths_agree(pipe, PROMPTS)
    again = pipeline_sampling(pipe, PROMPTS, cached=True)  # the unconditional context now comes from the cache
    torch.testing.assert_close(again, cached, atol=0, rtol=0)
    # the model reads the text: other prompts move the latents by far more than the tolerance
    moved = (pipeline_sampling(pipe, OTHER_PROMPTS, cached=True) - cached).abs().max().item()
    assert moved > 1000 * TOLERANCE, moved


def test_the_uncached_path_keeps_no_text_context(pipe, monkeypatch):
    calls = []
    monkeypatch.setattr(TextEncoder, "encode", lambda *a, **k: pytest.fail("the uncached path encoded a context"))
    real = sampling_text.joint_velocity
    monkeypatch.setattr(sampling_text, "joint_velocity", lambda *a, **k: calls.append(1) or real(*a, **k))
    pipeline_sampling(pipe, PROMPTS, cached=False)
    assert len(calls) == STEPS  # the LLM ran inside every step


def test_planted_error_the_pipeline_encodes_the_wrong_prompts(pipe, monkeypatch):
    encode = FuseDiTPipeline.encode_prompt
    monkeypatch.setattr(
        FuseDiTPipeline, "encode_prompt", lambda self, prompts, n=None: encode(self, list(reversed(prompts)), n)
    )
    with pytest.raises(AssertionError):
        assert_sampling_paths_agree(pipe, PROMPTS)


def test_planted_error_the_text_keys_and_values_are_zeroed(pipe, monkeypatch):
    encode = FuseDiTPipeline.encode_prompt

    def zeroed(self, prompts, n=None):
        context = encode(self, prompts, n)
        return replace(
            context,
            keys={i: torch.zeros_like(k) for i, k in context.keys.items()},
            values={i: torch.zeros_like(v) for i, v in context.values.items()},
        )

    monkeypatch.setattr(FuseDiTPipeline, "encode_prompt", zeroed)
    with pytest.raises(AssertionError):
        assert_sampling_paths_agree(pipe, PROMPTS)
