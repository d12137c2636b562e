"""Tests of the procedural shapes world (prompts, held-out split, rendering, training data set)."""

import numpy as np
import pytest
import torch

from fusedit.config import ConfigError
from fusedit.data.config import ShapesWorldConfig
from fusedit.data.shapes import (
    BACKGROUND,
    CATEGORIES,
    COLORS,
    FULL_SCENE_FIELDS,
    NO_SCENE_TARGET,
    PALETTE,
    SCENE_FIELDS,
    SHAPES,
    ShapesWorld,
    enumerate_prompts,
    full_scene_labels,
    object_side,
    restatement,
    scene_labels,
    shape_mask,
)
from fusedit.experiment import load_experiment


@pytest.fixture(scope="module")
def world():
    return ShapesWorld(ShapesWorldConfig(seed=3, size=500, held_out_fraction=0.1), resolution=32)


def test_every_category_has_training_and_held_out_prompts(world):
    assert world.categories == CATEGORIES
    for category in CATEGORIES:
        train = {s.text for s in world.training_prompts(category)}
        held = {s.text for s in world.held_out_prompts(category)}
        assert train and held, category
        assert not train & held
        assert train | held == {s.text for s in world.all_prompts(category)}
        assert all(s.category == category for s in world.held_out_prompts(category))
    n_all = len(world.all_prompts())
    assert len(world.held_out_prompts()) == pytest.approx(0.1 * n_all, rel=0.2)


def test_held_out_split_is_seeded_and_deterministic():
    a = ShapesWorld(ShapesWorldConfig(seed=1), 32).held_out_prompts()
    b = ShapesWorld(ShapesWorldConfig(seed=1), 32).held_out_prompts()
    c = ShapesWorld(ShapesWorldConfig(seed=2), 32).held_out_prompts()
    assert [s.text for s in a] == [s.text for s in b]
    assert [s.text for s in a] != [s.text for s in c]


def test_prompt_texts_are_unique_and_readable():
    texts = [s.text for c in CATEGORIES for s in enumerate_prompts(c)]
    assert len(texts) == len(set(texts))
    assert "a red circle to the left of a blue square" in texts
    assert "three green triangles" in texts
    assert "a circle and a square" in texts
    assert "a red circle and a blue square" in texts


def test_category_weights_set_the_training_mixture():
    world = ShapesWorld(ShapesWorldConfig(category_weights={"position": 3, "color_attr": 2, "counting": 0}), 32)
    drawn = [world.example(i)[1].category for i in range(3000)]
    expected = {
        "single_object": 1 / 8,
        "two_object": 1 / 8,
        "counting": 0.0,
        "colors": 1 / 8,
        "position": 3 / 8,
        "color_attr": 2 / 8,
    }
    for category, p in expected.items():
        assert drawn.count(category) / len(drawn) == pytest.approx(p, abs=0.03), category
    # no weights: the original uniform draw, unchanged example by example
    plain, uniform = ShapesWorld(ShapesWorldConfig(), 32), ShapesWorld(ShapesWorldConfig(category_weights={}), 32)
    assert all(plain.example(i)[1] == uniform.example(i)[1] for i in range(50))


def test_category_weights_errors():
    with pytest.raises(ConfigError, match="unknown category 'shapes'"):
        load_experiment("demo", ["data.shapes.category_weights={shapes: 2}"])
    with pytest.raises(ConfigError, match="category_weights.position: got -1"):
        load_experiment("demo", ["data.shapes.category_weights={position: -1}"])
    with pytest.raises(ValueError, match="weight 0"):
        ShapesWorld(ShapesWorldConfig(max_objects=1, category_weights={"single_object": 0, "colors": 0}), 32)


def test_max_objects_limits_prompts():
    world = ShapesWorld(ShapesWorldConfig(max_objects=1), 32)
    assert world.categories == ("single_object", "colors")
    world3 = ShapesWorld(ShapesWorldConfig(max_objects=3), 32)
    assert max(s.objects[0].count for s in world3.all_prompts("counting")) == 3
    with pytest.raises(ValueError, match="position"):
        world.held_out_prompts("position")


def test_caption_corpus_excludes_held_out(world):
    corpus = set(world.caption_corpus())
    assert not corpus & {s.text for s in world.held_out_prompts()}
    vocab = {w for text in corpus for w in text.split()}
    assert {w for s in world.held_out_prompts() for w in s.text.split()} <= vocab


def test_restatement_names_every_attribute_and_binding():
    spec = {s.text: s for c in CATEGORIES for s in enumerate_prompts(c)}
    assert restatement(spec["a red circle to the left of a blue square"]) == (
        "the red circle is on the left . the blue square is on the right ."
    )
    assert restatement(spec["a red circle to the right of a blue square"]) == (
        "the red circle is on the right . the blue square is on the left ."
    )
    assert restatement(spec["a white triangle below a green circle"]) == (
        "the white triangle is at the bottom . the green circle is on top ."
    )
    assert restatement(spec["a red circle and a blue square"]) == "the circle is red . the square is blue ."
    assert restatement(spec["three green triangles"]) == "count three . color green . shape triangle ."
    assert restatement(spec["a circle and a square"]) == "there is one circle . there is one square ."
    for s in spec.values():  # every color, shape and number word of a prompt is said again
        words = set(restatement(s).split())
        assert {o.shape for o in s.objects} <= words and {o.color for o in s.objects if o.color} <= words, s.text


def test_llm_corpus_restates_training_prompts_only(world):
    restated = world.llm_corpus()
    assert restated == world.llm_corpus("restated")
    captions = world.caption_corpus()
    assert world.llm_corpus("captions") == captions and len(restated) == len(captions)
    assert all(line.startswith(caption + " . ") for line, caption in zip(restated, captions, strict=True))
    held = {s.text for s in world.held_out_prompts()}
    assert not {line.split(" . ")[0] for line in restated} & held
    with pytest.raises(ValueError, match="unknown tiny-LLM corpus 'poems'"):
        world.llm_corpus("poems")


def test_scene_labels_put_position_objects_in_spatial_order():
    spec = {s.text: s for c in CATEGORIES for s in enumerate_prompts(c)}
    red, blue, green, white = (COLORS.index(c) for c in ("red", "blue", "green", "white"))
    circle, square, triangle = (SHAPES.index(s) for s in ("circle", "square", "triangle"))
    assert [name for name, _ in SCENE_FIELDS] == ["first_color", "first_shape", "second_color", "second_shape", "axis"]
    assert scene_labels(spec["a red circle to the left of a blue square"]) == (red, circle, blue, square, 0)
    assert scene_labels(spec["a red circle to the right of a blue square"]) == (blue, square, red, circle, 0)
    assert scene_labels(spec["a white triangle below a green circle"]) == (green, circle, white, triangle, 1)
    assert scene_labels(spec["a green circle above a white triangle"]) == (green, circle, white, triangle, 1)
    # one scene, two wordings: the same labels; a mirrored scene: other labels
    assert scene_labels(spec["a red circle to the left of a blue square"]) == scene_labels(
        spec["a blue square to the right of a red circle"]
    )
    assert scene_labels(spec["a red circle to the left of a blue square"]) != scene_labels(
        spec["a blue square to the left of a red circle"]
    )
    for s in spec.values():
        labels = scene_labels(s)
        assert len(labels) == len(SCENE_FIELDS)
        if s.category == "position":  # every field has a target that fits its classes
            assert all(0 <= v < n for v, (_, n) in zip(labels, SCENE_FIELDS, strict=False)), s.text
        else:  # captions that name no place have none
            assert labels == (NO_SCENE_TARGET,) * len(SCENE_FIELDS), s.text


def test_llm_scene_labels_follow_the_llm_corpus(world):
    captions, labels = world.llm_scene_labels()
    lines = world.llm_corpus()
    assert len(captions) == len(labels) == len(lines)
    assert all(line.startswith(caption + " . ") for line, caption in zip(lines, captions, strict=True))
    assert labels == [scene_labels(world.spec(c)) for c in captions]


@pytest.mark.parametrize("resolution", [32, 64])
def test_render_is_faithful_to_the_spec(resolution):
    world = ShapesWorld(ShapesWorldConfig(), resolution)
    rng = np.random.default_rng(0)
    for spec in world.all_prompts()[::7]:
        objects = world.scene(spec, rng)
        assert len(objects) == sum(o.count for o in spec.objects)
        for req in spec.objects:
            matching = [o for o in objects if o.shape == req.shape and req.color in (None, o.color)]
            assert len(matching) >= req.count
        image = world.draw(objects)
        assert image.dtype == np.uint8 and image.shape == (resolution, resolution, 3)
        # each object's pixels are exactly its mask in its color; the rest is background
        painted = np.zeros((resolution, resolution), dtype=int)
        for o in objects:
            side = object_side(o.size, resolution)
            mask = shape_mask(o.shape, side, side)
            painted[o.y : o.y + side, o.x : o.x + side] += mask
            assert (image[o.y : o.y + side, o.x : o.x + side][mask] == PALETTE[o.color]).all()
        assert painted.max() == 1, "objects overlap"
        assert (image[painted == 0] == BACKGROUND).all()


def test_position_relation_is_rendered():
    world = ShapesWorld(ShapesWorldConfig(), 32)
    rng = np.random.default_rng(1)
    for spec in world.all_prompts("position")[::11]:
        a, b = world.scene(spec, rng)[:2]
        dx, dy = b.x - a.x, b.y - a.y
        expected = {"left of": dx > 0, "right of": dx < 0, "above": dy > 0, "below": dy < 0}[spec.relation]
        assert expected, (spec.text, a, b)


def test_train_dataset_is_deterministic_and_order_independent(world):
    ds = world.train_dataset()
    assert len(ds) == 500
    forward = [ds[i] for i in range(20)]
    other = ShapesWorld(ShapesWorldConfig(seed=3, size=500, held_out_fraction=0.1), 32).train_dataset()
    for i in reversed(range(20)):
        item = other[i]
        assert item["caption"] == forward[i]["caption"]
        assert torch.equal(item["image"], forward[i]["image"])
    item = forward[0]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 32, 32)
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert torch.equal(ds[-1]["image"], ds[499]["image"])
    with pytest.raises(IndexError):
        ds[500]


def test_train_dataset_uses_only_training_prompts_of_all_categories(world):
    ds = world.train_dataset()
    held = {s.text for s in world.held_out_prompts()}
    captions = [ds[i]["caption"] for i in range(300)]
    assert not held & set(captions)
    assert {world.spec(c).category for c in captions} == set(CATEGORIES)
    counts = [sum(o.count for o in world.spec(c).objects) for c in captions]
    assert min(counts) == 1 and max(counts) == 4


def test_different_seeds_give_different_images():
    a = ShapesWorld(ShapesWorldConfig(seed=0), 32).train_dataset()[0]["image"]
    b = ShapesWorld(ShapesWorldConfig(seed=1), 32).train_dataset()[0]["image"]
    assert not torch.equal(a, b)


def test_bad_arguments_raise_clear_errors(world):
    with pytest.raises(ValueError, match="resolution"):
        ShapesWorld(ShapesWorldConfig(), 8)
    with pytest.raises(ValueError, match="unknown category"):
        enumerate_prompts("spatial")
    with pytest.raises(KeyError, match="not a prompt"):
        world.spec("a dog")


def test_full_scene_labels_describe_every_caption():
    spec = {s.text: s for c in CATEGORIES for s in enumerate_prompts(c)}
    red, blue, green = (COLORS.index(c) for c in ("red", "blue", "green"))
    circle, square, triangle = (SHAPES.index(s) for s in ("circle", "square", "triangle"))
    none_shape, no_relation, any_color = len(SHAPES), 2, NO_SCENE_TARGET
    assert [name for name, _ in FULL_SCENE_FIELDS] == [
        "first_color", "first_shape", "first_count", "second_color", "second_shape", "relation"
    ]  # fmt: skip
    assert full_scene_labels(spec["a circle"]) == (any_color, circle, 0, any_color, none_shape, no_relation)
    assert full_scene_labels(spec["three green triangles"]) == (green, triangle, 2, any_color, none_shape, no_relation)
    assert full_scene_labels(spec["a red circle and a blue square"]) == (red, circle, 0, blue, square, no_relation)
    assert full_scene_labels(spec["a square and a circle"]) == (any_color, square, 0, any_color, circle, no_relation)
    # position captions: spatial order and the axis, as scene_labels gives them
    assert full_scene_labels(spec["a red circle to the right of a blue square"]) == (blue, square, 0, red, circle, 0)
    assert full_scene_labels(spec["a green circle below a red triangle"]) == (red, triangle, 0, green, circle, 1)
    for s in spec.values():
        labels = full_scene_labels(s)
        assert all(v == NO_SCENE_TARGET or 0 <= v < n for v, (_, n) in zip(labels, FULL_SCENE_FIELDS, strict=True))
    world = ShapesWorld(ShapesWorldConfig(), 32)
    captions, labels = world.llm_scene_labels("all")
    assert captions == [s.text for s in world.training_prompts()] and labels[0] == full_scene_labels(
        world.training_prompts()[0]
    )
    with pytest.raises(ValueError, match="unknown scene scope 'some'"):
        world.llm_scene_labels("some")
