"""FLOPs per image of a study variant (fusedit.study.costs), counted on a real pipeline."""

from __future__ import annotations

import pytest

from fusedit.experiment import load_experiment
from fusedit.sampling.pipeline import FuseDiTPipeline, make_scheduler
from fusedit.study.costs import count_flops, measure_costs
from tests.conftest import text_dependent_components

PROMPTS = ["a red circle", "a blue square left of a green triangle"]


def pipeline(llm_dir, overrides, variant: list[str]) -> FuseDiTPipeline:
    config = load_experiment("demo", overrides(llm_dir) + variant)
    parts = text_dependent_components(config)
    return FuseDiTPipeline(parts.model, parts.text_encoder, make_scheduler(config.sample.shift), parts.codec)


@pytest.mark.parametrize(
    "variant",
    [
        ["model.fusion=deep"],
        ["model.fusion=shallow", "model.attention=self"],
        ["model.fusion=shallow", "model.attention=cross"],
    ],
)
def test_sampling_cost_is_steps_times_branches_times_one_forward(tiny_llm_dir, demo_overrides, variant):
    """An independent relation: a 5-step CFG call runs the DiT 10 times and encodes the prompt (and the empty
    prompt, a few tokens) once, so it must cost 10 DiT forwards + the LLM's share, within the empty prompt's."""
    pipe = pipeline(tiny_llm_dir, demo_overrides, variant)
    costs = measure_costs(pipe, PROMPTS, steps=5, guidance_scale=3.0)
    dit, text = costs["dit_forward_gflops"], costs["text_forward_gflops"]
    assert dit > 0 and text > 0
    expected = 10 * dit + text
    assert expected <= costs["sample_gflops_per_image"] <= expected + text, costs
    assert costs["train_gflops_per_image"] == pytest.approx(3 * dit + text)


def test_longer_prompts_and_trainable_text_cost_more(tiny_llm_dir, demo_overrides):
    pipe = pipeline(tiny_llm_dir, demo_overrides, ["model.fusion=deep"])
    assert count_flops(pipe, PROMPTS[1], 1, 1.0) > count_flops(pipe, PROMPTS[0], 1, 1.0)
    frozen = measure_costs(pipe, PROMPTS[:1], steps=2, guidance_scale=1.0)
    trained = measure_costs(pipe, PROMPTS[:1], steps=2, guidance_scale=1.0, text_trainable=True)
    assert trained["train_gflops_per_image"] == pytest.approx(
        frozen["train_gflops_per_image"] + 2 * frozen["text_forward_gflops"]
    )
    with pytest.raises(ValueError, match="no prompts"):
        measure_costs(pipe, [], steps=2, guidance_scale=1.0)
