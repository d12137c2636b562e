"""``tools/object_counts.py``: images scored correct and objects detected per prompt and guidance scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusedit.data.config import ShapesWorldConfig
from fusedit.data.shapes import ShapesWorld
from fusedit.sampling.pipeline import PipelineOutput

from ..tool_loader import load_tool


@pytest.fixture(scope="module")
def tool():
    return load_tool("object_counts")


class _DrawsFirstObjectOnly:
    """A fake model that renders only the first object a prompt names (or everything: ``whole=True``)."""

    def __init__(self, whole: bool):
        self.world, self.whole, self.cfgs = ShapesWorld(ShapesWorldConfig(), 32), whole, []

    def __call__(self, prompts, *, num_inference_steps, guidance_scale, generator, output_type):
        assert output_type == "pt" and len(generator) == len(prompts)
        self.cfgs.append(guidance_scale)
        texts = [p if self.whole else p.split(" and ")[0] for p in prompts]
        images = [
            self.world.render(self.world.spec(text), np.random.default_rng(g.initial_seed()))
            for text, g in zip(texts, generator, strict=True)
        ]
        return PipelineOutput(images=torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255)


def test_counts_tell_one_object_from_two(tool):
    right = tool.count_objects(_DrawsFirstObjectOnly(whole=True), "a square and a triangle", 3.0, 6, 0, 1)
    assert right.correct == 6 and right.objects == {2: 6}
    fake = _DrawsFirstObjectOnly(whole=False)
    half = tool.count_objects(fake, "a square and a triangle", 5.0, 6, 0, 1)
    assert half.correct == 0 and half.objects == {1: 6} and fake.cfgs == [5.0]
    assert half.line() == "'a square and a triangle' cfg 5: correct 0/6, objects {1: 6}"
