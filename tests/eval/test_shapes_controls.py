"""The benchmark's controls: what a person calls right scores high, garbage scores near zero (on a sample of prompts).

The full-suite control table is in docs/evaluation.md (`fusedit eval --suite shapes --controls`).
"""

import numpy as np
import pytest

from fusedit.data.config import ShapesWorldConfig
from fusedit.data.shapes import CATEGORIES, ShapesWorld
from fusedit.eval.shapes_controls import (
    CONTROLS,
    GROUND_TRUTH_MIN,
    NEGATIVE_CONTROLS,
    NEGATIVE_MAX,
    POSITIVE_CONTROLS,
    POSITIVE_MIN,
    control_images,
    control_passes,
)
from fusedit.eval.shapes_report import run_controls
from fusedit.eval.shapes_scorer import score_images


def _sample(world: ShapesWorld, per_category: int) -> list:
    """``per_category`` held-out prompt slots of every category (prompts repeated in order where there are few)."""
    specs = []
    for category in CATEGORIES:
        prompts = world.held_out_prompts(category)
        specs += [prompts[i % len(prompts)] for i in range(per_category)]
    return specs


@pytest.mark.parametrize("resolution, per_category", [(32, 30), (64, 12)])
def test_controls_meet_their_thresholds(resolution, per_category):
    world = ShapesWorld(ShapesWorldConfig(), resolution)
    table = run_controls(world, _sample(world, per_category), seed=1)
    assert set(table) == set(CONTROLS)
    failing = {name: (round(v["overall"], 3), v["categories"]) for name, v in table.items() if not v["passes"]}
    assert not failing
    assert table["ground_truth"]["overall"] >= GROUND_TRUTH_MIN
    for name in POSITIVE_CONTROLS:
        assert table[name]["overall"] >= POSITIVE_MIN[0]
        assert min(table[name]["categories"].values()) >= POSITIVE_MIN[1], name
    for name in NEGATIVE_CONTROLS:
        assert table[name]["overall"] <= NEGATIVE_MAX[0], name
        assert max(table[name]["categories"].values()) <= NEGATIVE_MAX[1], name
    assert table["ground_truth"]["background_error"] == 0.0


def test_control_images_are_deterministic_and_differ_by_control():
    world = ShapesWorld(ShapesWorldConfig(), 32)
    specs = world.held_out_prompts()[:6]
    first = control_images("blobs", world, specs, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(first, control_images("blobs", world, specs, seed=3), strict=False))
    assert not all(
        np.array_equal(a, b) for a, b in zip(first, control_images("blobs", world, specs, seed=4), strict=False)
    )
    truth = control_images("ground_truth", world, specs, seed=3)
    assert not any(
        np.array_equal(a, b) for a, b in zip(truth, control_images("one_fewer", world, specs, seed=3), strict=False)
    )


def test_shuffled_control_always_asks_for_something_else():
    world = ShapesWorld(ShapesWorldConfig(), 32)
    specs = _sample(world, 10)
    images = control_images("shuffled", world, specs, seed=0)
    assert score_images(images, specs)["overall"] == 0.0


def test_pass_rules():
    everything = {c: 1.0 for c in CATEGORIES}
    assert control_passes("ground_truth", 0.98, everything) and not control_passes("ground_truth", 0.96, everything)
    assert control_passes("jpeg", 0.91, {**everything, "counting": 0.86})
    assert not control_passes("jpeg", 0.95, {**everything, "counting": 0.80})
    nothing = {c: 0.0 for c in CATEGORIES}
    assert control_passes("blobs", 0.02, nothing)
    assert not control_passes("blobs", 0.02, {**nothing, "single_object": 0.1})
    assert not control_passes("solid", 0.04, nothing)
    with pytest.raises(ValueError, match="unknown control"):
        control_images("fog", world=ShapesWorld(ShapesWorldConfig(), 32), specs=[])
