"""The embedded "shapes world": a procedural, seeded text-to-image data set with faithful captions.

Images are ``R × R`` RGB pictures on a plain dark background (:data:`BACKGROUND`) holding 1–4 flat, non-overlapping
objects. An object is a shape (:data:`SHAPES`) in one of the well-separated colors of :data:`PALETTE`, with a size
(``small`` / ``big``) and a position. Every image contains exactly the objects its caption names, nothing else.

Captions follow GenEval's six categories; their grammar (:class:`PromptSpec`, :func:`make_spec`,
:func:`parse_prompt`...) lives in :mod:`fusedit.data.shapes_grammar` and is re-exported here. Each prompt string has
a structured :class:`PromptSpec` that :mod:`fusedit.eval.shapes_scorer` checks. A seeded,
deterministic fraction of the prompt strings of every category is held out: it never appears in training and serves
as the evaluation prompt set.

Conventions: images are ``np.uint8`` arrays ``(R, R, 3)`` (rendering) or ``float32`` tensors ``(3, R, R)`` in
``[-1, 1]`` (the training data set). Pixel coordinates are ``x`` = column (grows to the right) and ``y`` = row (grows
downwards), so "above" means a smaller ``y``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from fusedit.data.config import ShapesWorldConfig
from fusedit.data.shapes_grammar import (  # noqa: F401  (re-exported: the world's grammar)
    CATEGORIES,
    COLORS,
    FULL_SCENE_FIELDS,
    LLM_CORPORA,
    NO_SCENE_TARGET,
    RELATIONS,
    SCENE_FIELDS,
    SCENE_SCOPES,
    SHAPES,
    ObjectSpec,
    PromptSpec,
    enumerate_prompts,
    full_scene_labels,
    make_spec,
    parse_prompt,
    restatement,
    scene_labels,
)

#: Object colors (RGB), chosen far apart from each other and from the background.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (170, 50, 210),
    "white": (240, 240, 240),
}
if tuple(PALETTE) != COLORS:  # pragma: no cover - a guard for edits of either table
    raise RuntimeError("PALETTE and COLORS list different colors")

#: Background color (RGB).
BACKGROUND: tuple[int, int, int] = (16, 16, 20)

#: Object sizes; their side in pixels is ``SIZE_FRACTIONS[size] * resolution`` (rounded).
SIZES: tuple[str, ...] = ("small", "big")
SIZE_FRACTIONS: dict[str, float] = {"small": 0.22, "big": 0.34}

#: Smallest supported image side in pixels.
MIN_RESOLUTION = 16

# ----------------------------------------------------------------------------------------------------------------
# Rasterisation
# ----------------------------------------------------------------------------------------------------------------


def shape_mask(shape: str, height: int, width: int) -> np.ndarray:
    """Boolean mask ``(height, width)`` of ``shape`` filling that box (pixel-centre sampling, no anti-aliasing).

    ``circle``: the inscribed ellipse; ``square``: the whole box; ``triangle``: apex at the top centre, base along the
    bottom edge. (The detector of :mod:`fusedit.eval.shapes_detector` does not use these masks.)
    """
    v = (np.arange(height, dtype=np.float64)[:, None] + 0.5) / height
    u = (np.arange(width, dtype=np.float64)[None, :] + 0.5) / width
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if shape == "square":
        return np.ones((height, width), dtype=bool)
    if shape == "triangle":
        return np.abs(u - 0.5) <= v / 2 + 0.5 / width
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


@dataclass(frozen=True)
class PlacedObject:
    """An object of a rendered scene: its shape, color, size, top-left corner ``(x, y)`` and, when it was drawn at
    another than its size's usual side (evaluation controls), that side (pixels)."""

    shape: str
    color: str
    size: str
    x: int
    y: int
    side: int | None = None


def object_side(size: str, resolution: int, scale: float = 1.0) -> int:
    """Side in pixels of an object of ``size`` (times ``scale``) in an image of ``resolution`` pixels."""
    return max(3, int(round(SIZE_FRACTIONS[size] * resolution * scale)))


def _layout_margins(resolution: int) -> tuple[int, int]:
    """(gap between objects, gap to the image border) in pixels."""
    return max(2, int(round(0.06 * resolution))), max(1, int(round(0.03 * resolution)))


def _boxes_clear(a: tuple[int, int, int], b: tuple[int, int, int], gap: int) -> bool:
    """Whether square boxes ``(x, y, side)`` are at least ``gap`` pixels apart (Chebyshev)."""
    ax, ay, asz = a
    bx, by, bsz = b
    return ax + asz + gap <= bx or bx + bsz + gap <= ax or ay + asz + gap <= by or by + bsz + gap <= ay


class ShapesWorld:
    """The shapes world of one configuration at one resolution.

    Args:
        config: seed, number of training examples, max objects per image, held-out fraction.
        resolution: image side ``R`` in pixels (>= 16; the scorer is validated at 32 and 64).
    """

    def __init__(self, config: ShapesWorldConfig, resolution: int):
        if not isinstance(resolution, int) or resolution < MIN_RESOLUTION:
            raise ValueError(
                f"ShapesWorld: resolution must be an integer >= {MIN_RESOLUTION} pixels, got {resolution!r}"
            )
        config.validate()
        self.config = config
        self.resolution = resolution
        self._gap, self._border = _layout_margins(resolution)
        self._prompts: dict[str, list[PromptSpec]] = {}
        self._held_out: dict[str, list[PromptSpec]] = {}
        self._training: dict[str, list[PromptSpec]] = {}
        for index, category in enumerate(CATEGORIES):
            specs = enumerate_prompts(category, config.max_objects)
            if not specs:
                continue
            n_held = self._num_held_out(len(specs))
            order = np.random.default_rng([config.seed, 7919, index]).permutation(len(specs))
            held = set(order[:n_held].tolist())
            self._prompts[category] = specs
            self._held_out[category] = [s for i, s in enumerate(specs) if i in held]
            self._training[category] = [s for i, s in enumerate(specs) if i not in held]
        self._by_text = {s.text: s for specs in self._prompts.values() for s in specs}
        weights = np.array([float(config.category_weights.get(c, 1.0)) for c in self.categories])
        if weights.sum() <= 0:
            raise ValueError(
                f"data.shapes.category_weights: {config.category_weights} gives every category of this "
                f"world ({self.categories}) weight 0; expected at least one positive weight"
            )
        #: probability of each category (in :attr:`categories` order) in the training data
        self.category_probabilities = weights / weights.sum()

    def _num_held_out(self, n: int) -> int:
        """Held-out prompts of a category with ``n`` prompts: round(fraction·n), at least 1 when the fraction > 0."""
        if self.config.held_out_fraction <= 0 or n < 2:
            return 0
        return min(n - 1, max(1, int(round(self.config.held_out_fraction * n))))

    # -- prompts -------------------------------------------------------------------------------------------------

    @property
    def categories(self) -> tuple[str, ...]:
        """Categories with at least one prompt under this ``max_objects``."""
        return tuple(self._prompts)

    def _check_category(self, category: str | None) -> None:
        if category is not None and category not in self._prompts:
            raise ValueError(
                f"category {category!r} is not in this shapes world; available: {self.categories}"
                + ("" if category in CATEGORIES else f" (GenEval categories: {CATEGORIES})")
            )

    def _select(self, table: dict[str, list[PromptSpec]], category: str | None) -> list[PromptSpec]:
        self._check_category(category)
        if category is not None:
            return list(table[category])
        return [s for c in self.categories for s in table[c]]

    def all_prompts(self, category: str | None = None) -> list[PromptSpec]:
        """Every prompt (training and held-out), optionally of one category."""
        return self._select(self._prompts, category)

    def training_prompts(self, category: str | None = None) -> list[PromptSpec]:
        """Prompts that appear in training, optionally of one category."""
        return self._select(self._training, category)

    def held_out_prompts(self, category: str | None = None) -> list[PromptSpec]:
        """Prompts never shown in training (the evaluation set), optionally of one category."""
        return self._select(self._held_out, category)

    def caption_corpus(self) -> list[str]:
        """All training prompt strings; held-out strings are excluded."""
        return [s.text for s in self.training_prompts()]

    def llm_corpus(self, kind: str = "restated") -> list[str]:
        """The tiny LLM's pretraining text, built from the training prompts only (held-out ones are excluded).

        ``captions``: the prompt strings alone. ``restated``: every prompt followed by its :func:`restatement`
        (``"a red circle and a blue square . the circle is red . the square is blue ."``). In the caption language
        alone every color word is equally likely wherever one may appear, so next-token training has no reason to
        keep them apart in the hidden states the DiT reads; predicting the restatement needs each word's identity,
        and which shape it belongs to, carried forward from the prompt — as a real LLM's states carry a text's
        meaning. Measured in ``docs/results/demo.md``.
        """
        if kind not in LLM_CORPORA:
            raise ValueError(f"unknown tiny-LLM corpus {kind!r}; expected one of {LLM_CORPORA}")
        if kind == "captions":
            return self.caption_corpus()
        return [f"{s.text} . {restatement(s)}" for s in self.training_prompts()]

    def llm_scene_labels(self, scope: str = "position") -> tuple[list[str], list[tuple[int, ...]]]:
        """The training captions and their scene labels, in the order of :meth:`llm_corpus`'s lines (each line
        starts with its caption): :func:`scene_labels` (``scope="position"``) or :func:`full_scene_labels`
        (``"all"``)."""
        if scope not in SCENE_SCOPES:
            raise ValueError(f"unknown scene scope {scope!r}; expected one of {SCENE_SCOPES}")
        label = scene_labels if scope == "position" else full_scene_labels
        specs = self.training_prompts()
        return [s.text for s in specs], [label(s) for s in specs]

    def spec(self, text: str) -> PromptSpec:
        """The :class:`PromptSpec` of a prompt string of this world."""
        try:
            return self._by_text[text]
        except KeyError:
            raise KeyError(f"{text!r} is not a prompt of this shapes world (see ShapesWorld.all_prompts())") from None

    # -- rendering -----------------------------------------------------------------------------------------------

    def scene(self, spec: PromptSpec, rng: np.random.Generator, size_scale: float = 1.0) -> list[PlacedObject]:
        """Sample the objects of an image faithful to ``spec``: colors left open are drawn, sizes and positions too.

        ``size_scale`` multiplies every object's side (evaluation controls draw objects 0.8–1.2 times the usual size);
        training data always uses 1.
        """
        items: list[tuple[str, str, str]] = []
        for obj in spec.objects:
            for _ in range(obj.count):
                color = obj.color if obj.color is not None else COLORS[rng.integers(len(COLORS))]
                items.append((obj.shape, color, SIZES[rng.integers(len(SIZES))]))
        if len(items) > self.config.max_objects:
            raise ValueError(
                f"prompt {spec.text!r} needs {len(items)} objects but max_objects is {self.config.max_objects}"
            )
        placed = self.layout(items, spec.relation, rng, size_scale)
        if placed is None:  # pragma: no cover - always feasible at >= 16 px with up to 4 objects
            raise RuntimeError(f"could not lay out {spec.text!r} at {self.resolution} px")
        return placed

    def layout(
        self,
        items: Sequence[tuple[str, str, str]],
        relation: str | None,
        rng: np.random.Generator,
        size_scale: float = 1.0,
    ) -> list[PlacedObject] | None:
        """Place ``(shape, color, size)`` items without overlap (a relation constrains items 0 and 1), shrinking
        every item to ``small`` when the sizes drawn do not fit; None when even that fails."""
        items = list(items)
        for _ in range(3):
            boxes = self._place(items, relation, rng, size_scale)
            if boxes is not None:
                return [
                    PlacedObject(s, c, z, x, y, side) for (s, c, z), (x, y, side) in zip(items, boxes, strict=False)
                ]
            items = [(s, c, "small") for s, c, _ in items]
        return None

    def _place(
        self, items: list[tuple[str, str, str]], relation: str | None, rng: np.random.Generator, size_scale: float = 1.0
    ) -> list[tuple[int, int, int]] | None:
        """``(x, y, side)`` of non-overlapping boxes for ``items`` (a relation constrains items 0 and 1)."""
        sides = [object_side(z, self.resolution, size_scale) for _, _, z in items]
        lo = self._border
        for _ in range(100):
            boxes: list[tuple[int, int, int]] = []
            for side in sides:
                hi = self.resolution - self._border - side
                if hi < lo:
                    return None
                for _ in range(60):
                    cand = (int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1)), side)
                    if all(_boxes_clear(cand, b, self._gap) for b in boxes):
                        boxes.append(cand)
                        break
                else:
                    break
            if len(boxes) == len(sides) and (relation is None or self._relation_ok(boxes[0], boxes[1], relation)):
                return boxes
        return None

    def _relation_ok(self, a: tuple[int, int, int], b: tuple[int, int, int], relation: str) -> bool:
        """``a <relation> b`` with the boxes separated along the relation's axis and that axis dominant."""
        dx = (b[0] + b[2] / 2) - (a[0] + a[2] / 2)  # > 0: a is left of b
        dy = (b[1] + b[2] / 2) - (a[1] + a[2] / 2)  # > 0: a is above b
        main, perp = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
        return main >= (a[2] + b[2]) / 2 + self._gap and abs(perp) <= 0.5 * main

    def draw(
        self, objects: Sequence[PlacedObject], palette: Mapping[str, tuple[int, int, int]] = PALETTE
    ) -> np.ndarray:
        """Rasterise placed objects onto the background: ``np.uint8 (R, R, 3)``; each object in ``palette[color]``
        (the world's own colors unless a caller repaints some, e.g. the fine-tuning tutorial's teal)."""
        image = np.empty((self.resolution, self.resolution, 3), dtype=np.uint8)
        image[:] = BACKGROUND
        for obj in objects:
            side = obj.side or object_side(obj.size, self.resolution)
            mask = shape_mask(obj.shape, side, side)
            region = image[obj.y : obj.y + side, obj.x : obj.x + side]
            if region.shape[:2] != mask.shape:
                raise ValueError(f"object {obj} does not fit in a {self.resolution} px image")
            region[mask] = palette[obj.color]
        return image

    def render(self, spec: PromptSpec, rng: np.random.Generator) -> np.ndarray:
        """A random image faithful to ``spec``: ``np.uint8 (R, R, 3)``."""
        return self.draw(self.scene(spec, rng))

    def example(self, index: int) -> tuple[np.ndarray, PromptSpec]:
        """Training example ``index``: a deterministic function of ``(config.seed, index)`` only.

        A category is drawn (uniformly, or by ``config.category_weights``), then one of its training prompts, then
        the image.
        """
        rng = np.random.default_rng([self.config.seed, 104729, index])
        if self.config.category_weights:
            category = self.categories[rng.choice(len(self.categories), p=self.category_probabilities)]
        else:  # the original draw, so that unweighted worlds keep their exact data
            category = self.categories[rng.integers(len(self.categories))]
        prompts = self._training[category]
        if not prompts:  # every prompt of a one-prompt category cannot be held out, so this is defensive only
            prompts = self._prompts[category]
        spec = prompts[rng.integers(len(prompts))]
        return self.render(spec, rng), spec

    def train_dataset(self) -> ShapesDataset:
        """The training data set (``config.size`` examples)."""
        return ShapesDataset(self)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """``np.uint8 (R, R, 3)`` → ``float32 (3, R, R)`` in ``[-1, 1]``."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(127.5).sub_(1.0)


class ShapesDataset(Dataset):
    """Training pairs of a :class:`ShapesWorld`: item ``i`` is ``{"image": float32 (3, R, R) in [-1, 1],
    "caption": str}``, generated on the fly from ``(seed, i)`` (independent of access order, so resumable)."""

    def __init__(self, world: ShapesWorld):
        self.world = world

    def __len__(self) -> int:
        return self.world.config.size

    def known_captions(self) -> list[str]:
        """Every caption the dataset can yield (its world's training prompts), for work done once ahead of training
        (:func:`fusedit.text.expansion.expand_ahead`)."""
        return [spec.text for spec in self.world.training_prompts()]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"ShapesDataset index {index} out of range for size {n}")
        image, spec = self.world.example(index % n)
        return {"image": image_to_tensor(image), "caption": spec.text}
