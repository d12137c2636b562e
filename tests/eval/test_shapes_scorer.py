"""The benchmark's scoring rules: an image is right when its objects are exactly the prompt's."""

import numpy as np
import pytest
import torch

from fusedit.data.config import ShapesWorldConfig
from fusedit.data.shapes import CATEGORIES, PALETTE, ObjectSpec, PlacedObject, ShapesWorld, image_to_tensor, make_spec
from fusedit.eval.shapes_scorer import (
    FAILURES,
    as_uint8_images,
    color_following,
    detect,
    diagnose,
    score_image,
    score_images,
)

WORLD = ShapesWorld(ShapesWorldConfig(), 64)


def _scene(*objects):
    return WORLD.draw([PlacedObject(*o) for o in objects])


def _spec(category, objects, relation=None):
    return make_spec(category, [ObjectSpec(*o) for o in objects], relation)


RED_CIRCLE = ("circle", "red", "big", 2, 2)
BLUE_SQUARE = ("square", "blue", "small", 40, 4)
YELLOW_TRIANGLE = ("triangle", "yellow", "small", 6, 44)


def test_ground_truth_renders_of_every_category_score_one():
    rng = np.random.default_rng(0)
    specs = [s for c in CATEGORIES for s in WORLD.all_prompts(c)[::17]]
    result = score_images([WORLD.render(s, rng) for s in specs], specs)
    assert result["overall"] == 1.0 and set(result["accuracy"]) == set(CATEGORIES)


def test_single_object_and_colors_need_exactly_one_object():
    one = _scene(RED_CIRCLE)
    two = _scene(RED_CIRCLE, BLUE_SQUARE)
    assert score_image(one, _spec("single_object", [("circle",)]))
    assert not score_image(one, _spec("single_object", [("square",)]))
    assert not score_image(two, _spec("single_object", [("circle",)]))  # an object the prompt does not name
    assert score_image(one, _spec("colors", [("circle", "red")]))
    assert not score_image(one, _spec("colors", [("circle", "blue")]))
    assert not score_image(two, _spec("colors", [("circle", "red")]))


def test_two_objects_and_color_attribution():
    image = _scene(RED_CIRCLE, BLUE_SQUARE)
    assert score_image(image, _spec("two_object", [("square",), ("circle",)]))
    assert not score_image(image, _spec("two_object", [("square",), ("triangle",)]))
    assert score_image(image, _spec("color_attr", [("square", "blue"), ("circle", "red")]))
    assert not score_image(image, _spec("color_attr", [("square", "red"), ("circle", "blue")]))  # colors swapped
    three = _scene(RED_CIRCLE, BLUE_SQUARE, YELLOW_TRIANGLE)
    assert not score_image(three, _spec("two_object", [("square",), ("circle",)]))


def test_counting_needs_the_exact_number_of_that_shape_and_color():
    image = _scene(
        ("square", "green", "small", 1, 1), ("square", "green", "small", 24, 1), ("square", "green", "small", 46, 1)
    )
    assert score_image(image, _spec("counting", [("square", "green", 3)]))
    assert not score_image(image, _spec("counting", [("square", "green", 2)]))
    assert not score_image(image, _spec("counting", [("square", "green", 4)]))
    assert not score_image(image, _spec("counting", [("square", "red", 3)]))
    mixed = _scene(
        ("square", "green", "small", 1, 1), ("square", "green", "small", 24, 1), ("square", "purple", "small", 46, 1)
    )
    assert not score_image(mixed, _spec("counting", [("square", "green", 2)]))


def test_position_needs_the_relation_along_its_axis():
    image = _scene(RED_CIRCLE, ("square", "blue", "small", 44, 8))  # blue square to the right, nearly level
    left = _spec("position", [("circle", "red"), ("square", "blue")], "left of")
    assert score_image(image, left)
    assert score_image(image, _spec("position", [("square", "blue"), ("circle", "red")], "right of"))
    assert not score_image(image, _spec("position", [("circle", "red"), ("square", "blue")], "right of"))
    assert not score_image(image, _spec("position", [("circle", "red"), ("square", "blue")], "above"))
    diagonal = _scene(("circle", "red", "small", 2, 2), ("square", "blue", "small", 14, 40))  # far more below
    assert not score_image(diagonal, left)  # the offset across the axis dominates
    assert not score_image(_scene(RED_CIRCLE), left)


def test_unrecognised_objects_make_an_image_wrong():
    image = _scene(RED_CIRCLE)
    image[50:54, 20:60] = (230, 40, 40)  # a red bar: an object of no shape
    assert not score_image(image, _spec("colors", [("circle", "red")]))


def _two_colored(image: np.ndarray, color: tuple[int, int, int], columns: int) -> np.ndarray:
    """``image`` with the pixels of ``color`` from column ``columns`` on repainted in another world color: an object
    of a known shape and of no one color."""
    image = image.copy()
    mask = (image == color).all(-1)
    mask[:, :columns] = False
    image[mask] = PALETTE["yellow"] if color != PALETTE["yellow"] else PALETTE["red"]
    return image


def test_diagnose_names_why_an_image_is_wrong():
    """Each reason on an image made to fail that way and only that way; a right image has none."""
    right = _scene(RED_CIRCLE, ("square", "blue", "small", 44, 8))
    left = _spec("position", [("circle", "red"), ("square", "blue")], "left of")
    bar = _scene(RED_CIRCLE)
    bar[50:54, 20:60] = (40, 90, 240)  # a blue bar: an object of no shape
    odd_color = _two_colored(_scene(RED_CIRCLE, ("square", "blue", "small", 44, 8)), (40, 90, 240), columns=51)
    cases = {
        None: right,
        "count": _scene(RED_CIRCLE),
        "unknown_shape": bar,
        "unknown_color": odd_color,
        "shape": _scene(RED_CIRCLE, ("circle", "blue", "small", 44, 8)),
        "color": _scene(("circle", "blue", "big", 2, 2), ("square", "red", "small", 44, 8)),
        "relation": _scene(("circle", "red", "big", 36, 2), ("square", "blue", "small", 4, 8)),
    }
    assert set(cases) - {None} == set(FAILURES)
    for reason, image in cases.items():
        assert diagnose(detect(image), left) == reason, reason
    # a prompt that names no color: an object of no world color is not a reason (the category ignores colors)
    odd_circle = _two_colored(_scene(RED_CIRCLE), (230, 40, 40), columns=13)
    assert detect(odd_circle)[0].shape == "circle" and detect(odd_circle)[0].color is None
    assert diagnose(detect(odd_circle), _spec("single_object", [("circle",)])) is None


def test_color_following_reports_precision_with_recall():
    spec = _spec("color_attr", [("square", "blue"), ("circle", "red")])
    assert color_following(detect(_scene(RED_CIRCLE, BLUE_SQUARE)), spec) == (1.0, 1.0)
    assert color_following(detect(_scene(RED_CIRCLE, YELLOW_TRIANGLE)), spec) == (0.5, 0.5)
    assert color_following(detect(_scene()), spec) == (0.0, 0.0)
    assert color_following(detect(_scene(RED_CIRCLE)), _spec("single_object", [("circle",)])) is None


def test_accepts_model_output_tensors():
    rng = np.random.default_rng(3)
    world = ShapesWorld(ShapesWorldConfig(), 32)
    specs = world.held_out_prompts()[:8]
    images = [world.render(s, rng) for s in specs]
    batch = torch.stack([image_to_tensor(im) for im in images])
    converted = as_uint8_images(batch)
    assert all(np.array_equal(a, b) for a, b in zip(converted, images, strict=False))
    assert score_images(batch, specs)["overall"] == 1.0
    with pytest.raises(ValueError, match="specs"):
        score_images(batch, specs[:7])
