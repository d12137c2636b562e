"""The controls scored in a spawned process are the controls scored in this one."""

import json

import pytest

from fusedit.data.config import ShapesWorldConfig
from fusedit.data.shapes import CATEGORIES, ShapesWorld
from fusedit.eval.shapes_controls_worker import ControlsInBackground
from fusedit.eval.shapes_report import run_controls


def _few_prompts(world: ShapesWorld) -> list:
    return [world.held_out_prompts(category)[0] for category in CATEGORIES] * 2


def test_the_worker_returns_the_inline_table():
    world = ShapesWorld(ShapesWorldConfig(), 32)
    specs = _few_prompts(world)
    beside = ControlsInBackground.start(world, specs, seed=5).result()
    # compared as JSON text: a control without background pixels has background error NaN, which != itself
    assert json.dumps(beside, sort_keys=True) == json.dumps(run_controls(world, specs, seed=5), sort_keys=True)
    assert json.dumps(beside, sort_keys=True) != json.dumps(run_controls(world, specs, seed=6), sort_keys=True)


def test_a_failure_in_the_worker_is_raised_to_the_caller():
    world = ShapesWorld(ShapesWorldConfig(), 32)
    pending = ControlsInBackground.start(world, ["not a prompt spec"], seed=0)
    with pytest.raises(AttributeError):
        pending.result()


def test_controls_of_other_prompts_are_refused_by_the_evaluation():
    world = ShapesWorld(ShapesWorldConfig(), 32)
    specs = _few_prompts(world)
    pending = ControlsInBackground.start(world, specs, seed=5)
    pending.check_scores(specs, 5)
    with pytest.raises(ValueError, match="started for 12 prompts with seed 5"):
        pending.check_scores(specs[1:], 5)
    with pytest.raises(ValueError, match="with seed 6"):
        pending.check_scores(specs, 6)
    pending.cancel()
