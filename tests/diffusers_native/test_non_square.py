"""Sampling at a bucket's size: non-square heights and widths work end to end, in fusedit's pipeline and in the
diffusers-native one (after a save/load round trip too), and give the same samples."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline

from fusedit.diffusers_native.convert import pipeline_from_parts
from fusedit.experiment import load_experiment
from fusedit.sampling.pipeline import FuseDiTPipeline, make_scheduler
from tests.conftest import text_dependent_components

PROMPTS = ["a red circle to the left of a blue square", "two green triangles"]
SIZES = [(16, 32), (32, 8)]


@pytest.fixture(scope="module")
def pipes(tiny_llm_dir, demo_overrides):
    """fusedit's pipeline and the diffusers-native one over the same randomised demo model."""
    config = load_experiment("demo", demo_overrides(tiny_llm_dir))
    parts = text_dependent_components(config)
    scheduler = make_scheduler(config.sample.shift)
    ours = FuseDiTPipeline(
        parts.model, parts.text_encoder, scheduler, parts.codec, defaults=config.sample, config=config
    )
    native = pipeline_from_parts(parts.model, parts.text_encoder, scheduler, parts.codec, config.sample, config)
    native.set_progress_bar_config(disable=True)
    return ours, native


def sample(pipe, height, width, **kwargs):
    return pipe(
        PROMPTS,
        height=height,
        width=width,
        num_inference_steps=2,
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(3),
        **kwargs,
    ).images


@pytest.mark.parametrize("height, width", SIZES)
def test_non_square_samples_in_both_pipelines(pipes, height, width, tmp_path):
    ours, native = pipes
    a = sample(ours, height, width, output_type="pt")
    b = sample(native, height, width, output_type="pt")
    assert a.shape == b.shape == (2, 3, height, width)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    images = sample(native, height, width)
    assert [im.size for im in images] == [(width, height)] * 2
    native.save_pretrained(tmp_path / "saved")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "saved")
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(sample(loaded, height, width, output_type="pt"), b, atol=0, rtol=0)
