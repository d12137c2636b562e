"""A tiny diffusers-native pipeline (the demo's model on the tiny Gemma 2 LLM, random weights large enough that the
output depends on the text), built without training."""

from __future__ import annotations

import pytest

from fusedit.diffusers_native.convert import pipeline_from_parts
from fusedit.diffusers_native.pipeline import FuseDiTPipeline
from fusedit.experiment import load_experiment
from fusedit.sampling.pipeline import make_scheduler
from tests.conftest import text_dependent_components


def tiny_pipeline(llm_dir, overrides: list[str]) -> FuseDiTPipeline:
    config = load_experiment("demo", overrides)
    parts = text_dependent_components(config)
    pipe = pipeline_from_parts(
        parts.model, parts.text_encoder, make_scheduler(config.sample.shift), parts.codec, config.sample, config
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(tiny_llm_dir, demo_overrides) -> FuseDiTPipeline:
    return tiny_pipeline(tiny_llm_dir, demo_overrides(tiny_llm_dir))
