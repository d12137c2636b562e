"""``tools/probe_text_binding.py``: a linear probe for the color of an object at its shape word, per LLM layer."""

from __future__ import annotations

import torch

from fusedit.data.config import ShapesWorldConfig
from fusedit.data.shapes import ShapesWorld
from fusedit.text.config import TextConfig
from fusedit.text.encoder import TextEncoder

from ..tool_loader import load_tool


def test_probe_reads_a_planted_signal_and_not_noise():
    tool = load_tool("probe_text_binding")
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 6, (600,), generator=gen)
    test = torch.arange(600) % 4 == 0
    noise = torch.randn(600, 16, generator=gen)
    planted = noise.clone()
    planted[:, :6] += 6 * torch.nn.functional.one_hot(y, 6)
    assert tool.probe_accuracy(planted, y, test) > 0.95
    assert tool.probe_accuracy(noise, y, test) < 0.35  # chance 1/6


def test_features_sit_at_each_shape_word(tiny_llm_dir):
    """One row per object at its own shape word: layer 0 of a causal LLM sees that word alone, so its keys and
    values are one vector per shape whatever the color (a row taken at the color word would differ per color)."""
    tool = load_tool("probe_text_binding")
    world = ShapesWorld(ShapesWorldConfig(), 32)
    specs = tool.two_color_prompts(world)[:40]
    shapes = sorted({o.shape for s in specs for o in s.objects})
    encoder = TextEncoder.from_config(
        TextConfig(llm=str(tiny_llm_dir), padding="longest"), tool._requirements(str(tiny_llm_dir))
    )
    features, colors, prompt_index = tool.shape_word_features(encoder, specs, shapes, batch_size=16)
    assert len(colors) == len(prompt_index) == 2 * len(specs)
    assert colors[:2] == [o.color for o in specs[0].objects] and prompt_index[:4] == [0, 0, 1, 1]
    objects = [o for s in specs for o in s.objects]
    for name in ("key L0", "value L0"):
        rows = features[name]
        for shape in shapes:
            same = rows[[i for i, o in enumerate(objects) if o.shape == shape]]
            assert torch.allclose(same, same[:1].expand_as(same), atol=1e-5), (name, shape)
    assert "hidden (last)" in features and features["hidden (last)"].shape[0] == len(colors)
