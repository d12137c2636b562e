"""``tools/shapes_binding.py``: the failure table and the shape-binding numbers of an evaluation's saved samples."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from fusedit.data.config import ShapesWorldConfig
from fusedit.data.shapes import ShapesWorld

from ..tool_loader import load_tool


def write_evaluation(folder: Path, world: ShapesWorld, images: list[np.ndarray], prompts: list[str]) -> Path:
    folder.mkdir(parents=True)
    settings = {"shapes": asdict(world.config), "resolution": world.resolution}
    (folder / "scores.json").write_text(json.dumps({"settings": settings}))
    np.savez_compressed(folder / "images.npz", images=np.stack(images), prompts=np.array(prompts))
    return folder


def test_right_renders_bind_every_shape_and_one_shape_twice_or_swapped_is_counted(tmp_path, capsys):
    tool = load_tool("shapes_binding")
    world = ShapesWorld(ShapesWorldConfig(), 32)
    rng = np.random.default_rng(0)
    prompts = [s.text for s in world.training_prompts("color_attr") if s.objects[0].shape != s.objects[1].shape][:12]
    right = [world.render(world.spec(p), rng) for p in prompts]
    # the same scenes with the second object drawn in the first one's shape
    twice = []
    for p in prompts:
        first, second = world.scene(world.spec(p), rng)
        twice.append(world.draw([first, replace(second, shape=first.shape)]))
    # and with the two shapes swapped between the colors
    swapped = []
    for p in prompts:
        first, second = world.scene(world.spec(p), rng)
        swapped.append(world.draw([replace(first, shape=second.shape), replace(second, shape=first.shape)]))
    good = tool.analyse_binding(world, np.stack(right), prompts)
    bad = tool.analyse_binding(world, np.stack(twice), prompts)
    crossed = tool.analyse_binding(world, np.stack(swapped), prompts)
    assert good["right"]["color_attr"] == len(prompts) and good["shape_hits"] == good["shape_objects"] == 24
    assert good["distinct_drawn_same"] == 0 and good["distinct_prompts"] == 12
    assert good["distinct_paired"] == 12 and good["distinct_swapped"] == 0
    assert crossed["distinct_swapped"] == 12 and crossed["distinct_paired"] == 0 and crossed["shape_hits"] == 0
    assert bad["distinct_paired"] == bad["distinct_swapped"] == 0
    assert bad["failures"]["color_attr"]["shape"] == 12 and bad["distinct_drawn_same"] == 12
    assert bad["shape_hits"] == 12  # the first object of each image keeps its shape
    folder = write_evaluation(tmp_path / "eval", world, twice, prompts)
    assert tool.main([str(folder)]) == 0
    out = capsys.readouterr().out
    assert "show one shape twice" in out and "the two shapes swapped" in out
