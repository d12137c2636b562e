"""Controls of the shapes benchmark: images whose right answer is known, scored by the same code as a model's.

A score means something only next to what ground truth and what garbage get on the same prompts. For every prompt
of an evaluation, each control draws one image per slot (deterministically from a seed):

*Positive* controls (a person would call them correct; the detector must accept them):

* ``ground_truth``: the world's own render of the prompt;
* ``blur``: that render blurred by a Gaussian of σ uniform in ``[0.3, 0.6]`` px;
* ``noise``: plus Gaussian pixel noise of σ = 8/255;
* ``jpeg``: saved as JPEG at quality 75 (4:2:0 chroma) and read back;
* ``resized``: a scene whose objects are 0.8–1.2 times their usual size;
* ``other_rasterizer``: the same scene drawn by PIL's ``ImageDraw`` at 4× and box-filtered down (anti-aliased,
  other edge rules).

*Negative* controls (garbage; the detector must reject them):

* ``blobs``: irregular blobs (thresholded smooth noise) in the prompt's colors, one per object, where the objects
  would be;
* ``solid``: the whole image filled with one of the prompt's colors;
* ``stripes``: stripes of the prompt's colors on the background;
* ``uniform_noise``: uniform RGB noise;
* ``background``: the bare background;
* ``shuffled``: the render of another prompt of the same category (one that asks for something else);
* ``one_fewer`` / ``one_more``: the prompt's render with one of its objects removed / one object added.

Thresholds (asserted by the tests, reported with every evaluation): ground truth ≥ 0.97 overall; every positive
control ≥ 0.90 overall and ≥ 0.85 in every category; every negative control ≤ 0.03 overall and ≤ 0.05 in every
category.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from fusedit.data.shapes import (
    BACKGROUND,
    COLORS,
    PALETTE,
    SHAPES,
    SIZES,
    PlacedObject,
    PromptSpec,
    ShapesWorld,
    enumerate_prompts,
    object_side,
)

POSITIVE_CONTROLS: tuple[str, ...] = ("ground_truth", "blur", "noise", "jpeg", "resized", "other_rasterizer")
NEGATIVE_CONTROLS: tuple[str, ...] = (
    "blobs",
    "solid",
    "stripes",
    "uniform_noise",
    "background",
    "shuffled",
    "one_fewer",
    "one_more",
)
CONTROLS: tuple[str, ...] = POSITIVE_CONTROLS + NEGATIVE_CONTROLS

#: Pass thresholds: (overall, every category); positives must reach them, negatives stay at or under them.
GROUND_TRUTH_MIN = 0.97
POSITIVE_MIN = (0.90, 0.85)
NEGATIVE_MAX = (0.03, 0.05)


def _colors_of(spec: PromptSpec, rng: np.random.Generator) -> list[str]:
    """The prompt's colors, or one random color of the world when it names none."""
    named = list(dict.fromkeys(o.color for o in spec.objects if o.color is not None))
    return named or [COLORS[rng.integers(len(COLORS))]]


def _ground_truth(world, spec, rng):
    return world.draw(world.scene(spec, rng))


def _blur(world, spec, rng):
    sigma = rng.uniform(0.3, 0.6)
    image = world.draw(world.scene(spec, rng)).astype(np.float32)
    return np.clip(ndimage.gaussian_filter(image, sigma=(sigma, sigma, 0)).round(), 0, 255).astype(np.uint8)


def _noise(world, spec, rng):
    image = world.draw(world.scene(spec, rng)).astype(np.float32)
    return np.clip(image + rng.normal(0.0, 8.0, image.shape), 0, 255).round().astype(np.uint8)


def _jpeg(world, spec, rng):
    buffer = io.BytesIO()
    Image.fromarray(world.draw(world.scene(spec, rng))).save(buffer, format="JPEG", quality=75)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def _resized(world, spec, rng):
    return world.draw(world.scene(spec, rng, size_scale=rng.uniform(0.8, 1.2)))


def pil_draw(world: ShapesWorld, objects: Sequence[PlacedObject], supersample: int = 4) -> np.ndarray:
    """The scene drawn by PIL's ``ImageDraw`` at ``supersample``× and box-filtered to the world's resolution."""
    size = world.resolution * supersample
    canvas = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        side = (obj.side or object_side(obj.size, world.resolution)) * supersample
        x0, y0 = obj.x * supersample, obj.y * supersample
        x1, y1 = x0 + side - 1, y0 + side - 1
        color = PALETTE[obj.color]
        if obj.shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=color)
        elif obj.shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=color)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=color)
    return np.asarray(canvas.resize((world.resolution, world.resolution), Image.Resampling.BOX))


def _other_rasterizer(world, spec, rng):
    return pil_draw(world, world.scene(spec, rng))


def _blob_mask(side: int, rng: np.random.Generator) -> np.ndarray:
    """An irregular blob filling about half of a ``side × side`` box: thresholded smooth noise, largest part."""
    field = ndimage.gaussian_filter(rng.normal(size=(side, side)), sigma=max(1.0, side / 5))
    mask = field > np.quantile(field, 0.5)
    labels, num = ndimage.label(mask)
    if num > 1:
        mask = labels == (np.bincount(labels.ravel())[1:].argmax() + 1)
    return mask


def _blobs(world, spec, rng):
    image = world.draw([])
    for obj in world.scene(spec, rng):
        side = obj.side or object_side(obj.size, world.resolution)
        region = image[obj.y : obj.y + side, obj.x : obj.x + side]
        region[_blob_mask(side, rng)] = PALETTE[obj.color]
    return image


def _solid(world, spec, rng):
    image = world.draw([])
    image[:] = PALETTE[_colors_of(spec, rng)[0]]
    return image


def _stripes(world, spec, rng):
    image = world.draw([])
    colors = _colors_of(spec, rng)
    width = max(2, world.resolution // 8)
    band = np.arange(world.resolution) // width
    for i, color in enumerate(colors):
        rows = band % (2 * len(colors)) == 2 * i
        if rng.random() < 0.5:
            image[rows, :] = PALETTE[color]
        else:
            image[:, rows] = PALETTE[color]
    return image


def _uniform_noise(world, spec, rng):
    return rng.integers(0, 256, size=(world.resolution, world.resolution, 3), dtype=np.uint8)


def _background(world, spec, rng):
    return world.draw([])


def _content(spec: PromptSpec) -> tuple:
    """What a prompt asks for, independent of its wording ("A left of B" = "B right of A")."""
    objects = tuple(sorted((o.shape, o.color or "", o.count) for o in spec.objects))
    if spec.relation is None:
        return objects
    subject, reference = spec.objects
    first, second = (subject, reference) if spec.relation in ("left of", "above") else (reference, subject)
    axis = "x" if spec.relation in ("left of", "right of") else "y"
    return ((first.shape, first.color), (second.shape, second.color), axis)


def _shuffled(world, spec, rng):
    others = [s for s in enumerate_prompts(spec.category, world.config.max_objects) if _content(s) != _content(spec)]
    return world.draw(world.scene(others[rng.integers(len(others))], rng))


def _one_fewer(world, spec, rng):
    objects = world.scene(spec, rng)
    drop = int(rng.integers(len(objects)))
    return world.draw([o for i, o in enumerate(objects) if i != drop])


def _one_more(world, spec, rng):
    """The prompt's objects plus one of a random shape and color (laid out afresh so that all of them fit)."""
    objects = world.scene(spec, rng)
    items = [(o.shape, o.color, o.size) for o in objects]
    items.append((SHAPES[rng.integers(len(SHAPES))], COLORS[rng.integers(len(COLORS))], SIZES[rng.integers(2)]))
    placed = world.layout(items, spec.relation, rng)
    if placed is None:  # five objects may not fit at the smallest resolutions: keep the first four's layout
        placed = objects + [_squeeze_in(world, objects, items[-1], rng)]
    return world.draw(placed)


def _squeeze_in(world, objects, item, rng) -> PlacedObject:
    """A small extra object at the free spot farthest from every placed object (may touch one at tiny sizes)."""
    side = object_side("small", world.resolution)
    best, best_gap = (0, 0), -1.0
    for y in range(0, world.resolution - side + 1):
        for x in range(0, world.resolution - side + 1):
            gap = min((max(abs(x - o.x), abs(y - o.y)) for o in objects), default=world.resolution)
            if gap > best_gap:
                best, best_gap = (x, y), gap
    return PlacedObject(item[0], item[1], "small", best[0], best[1], side)


_GENERATORS: dict[str, Callable[[ShapesWorld, PromptSpec, np.random.Generator], np.ndarray]] = {
    "ground_truth": _ground_truth,
    "blur": _blur,
    "noise": _noise,
    "jpeg": _jpeg,
    "resized": _resized,
    "other_rasterizer": _other_rasterizer,
    "blobs": _blobs,
    "solid": _solid,
    "stripes": _stripes,
    "uniform_noise": _uniform_noise,
    "background": _background,
    "shuffled": _shuffled,
    "one_fewer": _one_fewer,
    "one_more": _one_more,
}


def control_images(name: str, world: ShapesWorld, specs: Sequence[PromptSpec], seed: int = 0) -> list[np.ndarray]:
    """One ``np.uint8 (R, R, 3)`` image of control ``name`` per entry of ``specs`` (deterministic in ``seed``,
    the control and the entry's index)."""
    if name not in _GENERATORS:
        raise ValueError(f"unknown control {name!r}; expected one of {CONTROLS}")
    index = CONTROLS.index(name)
    return [
        _GENERATORS[name](world, spec, np.random.default_rng([seed, 7177, index, i])) for i, spec in enumerate(specs)
    ]


def control_passes(name: str, overall: float, categories: dict[str, float]) -> bool:
    """Whether control ``name`` meets its threshold (see the module docstring)."""
    if name in POSITIVE_CONTROLS:
        floor_overall, floor_category = POSITIVE_MIN
        if name == "ground_truth":
            floor_overall = GROUND_TRUTH_MIN
        return overall >= floor_overall and all(v >= floor_category for v in categories.values())
    ceiling_overall, ceiling_category = NEGATIVE_MAX
    return overall <= ceiling_overall and all(v <= ceiling_category for v in categories.values())
