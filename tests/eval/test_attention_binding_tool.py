"""``tools/attention_binding.py``: how much an object's image patches attend to their own object's words."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fusedit.models.attention as attention_module
from fusedit.data.config import ShapesWorldConfig
from fusedit.data.shapes import PlacedObject, ShapesWorld
from fusedit.experiment import load_experiment
from fusedit.models.layers import attend
from tests.conftest import text_dependent_components

from ..tool_loader import load_tool


@pytest.fixture(scope="module")
def tool():
    return load_tool("attention_binding")


def test_probabilities_reproduce_the_attention_output(tool):
    """Probabilities times the values must give what the model's attention (SDPA) gives, for grouped-query heads
    and a padding mask: a wrong head grouping or mask would not."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, n, 8, generator=gen) for h, n in ((4, 5), (2, 7), (2, 7)))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, :3] = False
    probs = tool.attention_probabilities(q, k, mask)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 4, 5))
    assert float(probs[1, :, :, :3].abs().max()) == 0.0
    expected = attend(q, k, v, mask)
    assert torch.allclose(probs @ v.repeat_interleave(2, dim=1), expected, atol=1e-5)


def test_text_columns_are_taken_from_joint_and_cross_attention_only(tool):
    joint, cross, image_only = torch.rand(1, 16, 9 + 16), torch.rand(1, 16, 9), torch.rand(1, 16, 16)
    picked = tool.text_attention([joint, image_only, cross], num_text=9, num_patches=16)
    assert len(picked) == 2
    assert torch.equal(picked[0], joint[..., :9]) and torch.equal(picked[1], cross)
    with pytest.raises(ValueError, match="cannot tell"):
        tool.text_attention([joint], num_text=16, num_patches=16)


def test_patch_fractions_cover_the_object(tool):
    world = ShapesWorld(ShapesWorldConfig(), 16)
    square = PlacedObject("square", "red", "large", 4, 0, 8)  # x 4..11, y 0..7
    (fractions,) = tool.patch_fractions(world, [square], patch=4)
    expected = np.zeros((4, 4))
    expected[0:2, 1:3] = 1.0
    assert np.array_equal(fractions, expected.reshape(-1))


def test_measure_counts_every_text_attention_and_restores_the_model(tool, tiny_llm_dir, demo_overrides):
    parts = text_dependent_components(load_experiment("demo", demo_overrides(tiny_llm_dir)))
    world = ShapesWorld(ShapesWorldConfig(), 16)
    specs = tool.two_object_prompts(world)[:6]
    assert specs and all(s.objects[0].shape != s.objects[1].shape for s in specs)
    real = attention_module.attend
    tallies = tool.measure(parts.model, parts.text_encoder, world, specs, sigma=0.5, seed=0)
    assert attention_module.attend is real
    layers = sorted({k for k, _ in tallies})
    assert layers == list(range(len(parts.model.layers)))
    for (_, word), tally in tallies.items():
        assert word in ("shape", "color") and len(tally.own) == len(tally.other) > 0
        assert all(0.0 <= p <= 1.0 for p in tally.own + tally.other)
