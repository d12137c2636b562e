"""The geometric shapes detector: it recognises shapes by their geometry, whoever drew them, and nothing else."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fusedit.data.config import ShapesWorldConfig
from fusedit.data.shapes import BACKGROUND, PALETTE, PlacedObject, ShapesWorld
from fusedit.eval.shapes_controls import pil_draw
from fusedit.eval.shapes_detector import background_error, detect, foreground_mask


def _world(resolution: int) -> ShapesWorld:
    return ShapesWorld(ShapesWorldConfig(), resolution)


def _found(image):
    return sorted((o.shape, o.color) for o in detect(image))


def test_hand_built_scene_is_found_exactly():
    world = _world(64)
    objects = [
        PlacedObject("circle", "red", "big", 2, 2),
        PlacedObject("square", "blue", "small", 40, 4),
        PlacedObject("triangle", "yellow", "small", 6, 44),
        PlacedObject("triangle", "white", "big", 36, 36),
    ]
    found = detect(world.draw(objects))
    assert sorted((o.shape, o.color) for o in found) == sorted((o.shape, o.color) for o in objects)
    circle = next(o for o in found if o.shape == "circle")
    assert circle.centroid == pytest.approx((13.0, 13.0), abs=0.05)  # a 22 px circle at (2, 2)
    assert circle.side == pytest.approx(22, abs=1.0)
    triangle = next(o for o in found if o.color == "white")  # the centroid of a triangle is 2/3 of the way down
    assert triangle.centroid[1] == pytest.approx(36 + 22 * 2 / 3, abs=0.6)
    assert [o.centroid[1] for o in found] == sorted(o.centroid[1] for o in found)  # reading order


@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_every_held_out_scene_is_found(resolution):
    world = _world(resolution)
    rng = np.random.default_rng(0)
    for spec in world.held_out_prompts()[::3]:
        objects = world.scene(spec, rng)
        assert _found(world.draw(objects)) == sorted((o.shape, o.color) for o in objects), spec.text


@pytest.mark.parametrize("resolution", [32, 64])
def test_shapes_from_another_rasterizer_are_recognised(resolution):
    # PIL draws the same boxes with other edge rules and anti-aliasing (at 4x, box-filtered): the detector compares
    # geometry, not the world's masks, so it finds the same objects
    world = _world(resolution)
    rng = np.random.default_rng(1)
    for spec in world.held_out_prompts()[::4]:
        objects = world.scene(spec, rng)
        assert _found(pil_draw(world, objects)) == sorted((o.shape, o.color) for o in objects), spec.text


def _canvas(resolution=64):
    image = Image.new("RGB", (resolution, resolution), BACKGROUND)
    return image, ImageDraw.Draw(image)


@pytest.mark.parametrize(
    "draw_it",
    [
        lambda d: d.rectangle([10, 20, 50, 30], fill=PALETTE["red"]),  # a bar: no square of the world is 4:1
        lambda d: d.ellipse([10, 10, 50, 30], fill=PALETTE["red"]),  # an ellipse is not a circle
        lambda d: d.polygon([(10, 10), (50, 12), (30, 50), (28, 25)], fill=PALETTE["red"]),  # an irregular polygon
        lambda d: d.polygon([(12, 12), (52, 12), (32, 52)], fill=PALETTE["red"]),  # an upside-down triangle
        lambda d: d.rectangle([0, 0, 63, 63], fill=PALETTE["red"]),  # a fill
        lambda d: d.rectangle([28, 28, 35, 35], fill=PALETTE["red"]),  # a square too small for the world (8 px)
    ],
)
def test_what_no_shape_of_the_world_fits_is_not_a_shape(draw_it):
    image, draw = _canvas()
    draw_it(draw)
    found = detect(np.asarray(image))
    assert len(found) == 1 and found[0].shape is None and found[0].color == "red"


def test_an_object_of_no_world_color_or_of_mixed_colors_has_no_color():
    image, draw = _canvas()
    draw.ellipse([4, 4, 24, 24], fill=(120, 200, 200))  # teal is not a color of the world
    draw.rectangle([36, 36, 56, 56], fill=PALETTE["red"])
    draw.rectangle([36, 36, 56, 46], fill=PALETTE["green"])  # half red, half green
    found = detect(np.asarray(image))
    assert [(o.shape, o.color) for o in found] == [("circle", None), ("square", None)]


def test_specks_are_ignored_and_noise_is_no_object():
    world = _world(32)
    speckled = world.draw([])
    speckled[5, 5] = speckled[20, 9] = speckled[21, 9] = PALETTE["white"]
    assert detect(speckled) == []
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert not any(o.shape is not None and o.color is not None for o in detect(noise))


def test_foreground_follows_coverage_of_each_color():
    world = _world(32)
    image = world.draw([])
    background = np.array(BACKGROUND, dtype=np.float32)
    for column, color in enumerate(PALETTE.values()):
        for row, alpha in enumerate((0.3, 0.7)):
            image[row, column] = np.round(background + alpha * (np.array(color) - background)).astype(np.uint8)
    mask = foreground_mask(image)
    assert not mask[0, :6].any() and mask[1, :6].all()  # 30 % coverage is background, 70 % foreground, any color


def test_background_error_measures_the_background_only():
    world = _world(32)
    rng = np.random.default_rng(3)
    clean = world.draw(world.scene(world.held_out_prompts()[0], rng))
    assert background_error(clean) == 0.0
    noisy = np.clip(clean + np.random.default_rng(0).normal(0, 6, clean.shape), 0, 255).astype(np.uint8)
    assert 3.0 < background_error(noisy) < 6.0  # mean |N(0, 6)| = 4.8
    speckled = clean.copy()
    speckled[0, 0] = PALETTE["white"]  # a speck is unclean background, not an object
    assert background_error(speckled) > 0.0


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((32, 32, 3), dtype=np.float32), "uint8"),
        (np.zeros((32, 48, 3), dtype=np.uint8), "square"),
        (np.zeros((8, 8, 3), dtype=np.uint8), "at least 16"),
        (np.zeros((32, 32), dtype=np.uint8), "uint8 array"),
    ],
)
def test_bad_images_are_refused_clearly(bad, message):
    with pytest.raises(ValueError, match=message):
        detect(bad)
