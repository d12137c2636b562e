"""The embedded "shapes world": a procedural, seeded text-to-image data set with faithful captions.

Images are ``R × R`` RGB pictures on a plain dark background (:data:`BACKGROUND`) holding 1–4 flat, non-overlapping
objects. An object is a shape (:data:`SHAPES`) in one of the well-separated colors of :data:`PALETTE`, with a size
(``small`` / ``big``) and a position. Every image contains exactly the objects its caption names, nothing else.

Captions follow GenEval's six categories (:data:`CATEGORIES`)::

    single_object   "a circle"                                   (any color)
    two_object      "a circle and a square"                      (any colors)
    counting        "three green triangles"                      (2–4, all of that color and shape)
    colors          "a red circle"
    position        "a red circle to the left of a blue square"  (left of / right of / above / below)
    color_attr      "a red circle and a blue square"             (two shapes, each with its color)

Each prompt string has a structured :class:`PromptSpec` that :mod:`fusedit.eval.shapes_scorer` checks. A seeded,
deterministic fraction of the prompt strings of every category is held out: it never appears in training and serves
as the evaluation prompt set.

Conventions: images are ``np.uint8`` arrays ``(R, R, 3)`` (rendering) or ``float32`` tensors ``(3, R, R)`` in
``[-1, 1]`` (the training data set). Pixel coordinates are ``x`` = column (grows to the right) and ``y`` = row (grows
downwards), so "above" means a smaller ``y``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from fusedit.data.config import CATEGORIES, ShapesWorldConfig

#: The shapes, in a fixed order.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

#: Object colors (RGB), chosen far apart from each other and from the background.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (170, 50, 210),
    "white": (240, 240, 240),
}

#: Colors in a fixed order.
COLORS: tuple[str, ...] = tuple(PALETTE)

#: Background color (RGB).
BACKGROUND: tuple[int, int, int] = (16, 16, 20)

#: Object sizes; their side in pixels is ``SIZE_FRACTIONS[size] * resolution`` (rounded).
SIZES: tuple[str, ...] = ("small", "big")
SIZE_FRACTIONS: dict[str, float] = {"small": 0.22, "big": 0.34}

#: Spatial relations of ``position`` prompts: "A <relation> B".
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
_RELATION_PHRASES = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}

_NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}

#: Where a restatement (:func:`restatement`) puts the subject and the reference object of a relation.
_RELATION_SIDES = {"left of": ("on the left", "on the right"), "right of": ("on the right", "on the left"),
                   "above": ("on top", "at the bottom"), "below": ("at the bottom", "on top")}

#: Texts the tiny LLM can be pretrained on (:meth:`ShapesWorld.llm_corpus`).
LLM_CORPORA: tuple[str, ...] = ("restated", "captions")

#: Smallest supported image side in pixels.
MIN_RESOLUTION = 16

#: Fields of a ``position`` caption's scene read-out (:func:`scene_labels`) and their number of classes, in order: the
#: object on the left (or on top), the object on the right (or at the bottom), and the axis of the relation.
SCENE_FIELDS: tuple[tuple[str, int], ...] = (
    ("first_color", len(COLORS)),
    ("first_shape", len(SHAPES)),
    ("second_color", len(COLORS)),
    ("second_shape", len(SHAPES)),
    ("axis", 2),  # 0: left/right, 1: above/below
)

#: :func:`scene_labels` of a caption that has no spatial relation: no target in any field.
NO_SCENE_TARGET = -100


@dataclass(frozen=True)
class ObjectSpec:
    """A required object of a prompt.

    Attributes:
        shape: one of :data:`SHAPES`.
        color: one of :data:`COLORS`, or ``None`` when the prompt does not constrain the color.
        count: how many such objects the prompt asks for (``counting``: exactly this many; others: 1).
    """

    shape: str
    color: Optional[str] = None
    count: int = 1


@dataclass(frozen=True)
class PromptSpec:
    """A prompt and what an image must show to be correct for it.

    Attributes:
        text: the prompt string.
        category: one of :data:`CATEGORIES`.
        objects: the required objects; for ``position`` ``objects[0]`` is the subject and ``objects[1]`` the
            reference ("objects[0] <relation> objects[1]").
        relation: one of :data:`RELATIONS` for ``position`` prompts, else ``None``.
    """

    text: str
    category: str
    objects: tuple[ObjectSpec, ...]
    relation: Optional[str] = None


# ----------------------------------------------------------------------------------------------------------------
# Prompt universe
# ----------------------------------------------------------------------------------------------------------------


def _phrase(obj: ObjectSpec) -> str:
    """``a red circle`` / ``a circle`` / ``three red circles``."""
    noun = obj.shape if obj.count == 1 else obj.shape + "s"
    words = [_NUMBER_WORDS[obj.count] if obj.count > 1 else "a"]
    if obj.color is not None:
        words.append(obj.color)
    words.append(noun)
    return " ".join(words)


def make_spec(category: str, objects: Sequence[ObjectSpec], relation: Optional[str] = None) -> PromptSpec:
    """Build the :class:`PromptSpec` (and its caption text) of ``objects`` in ``category``."""
    objects = tuple(objects)
    if category == "position":
        if relation not in RELATIONS or len(objects) != 2:
            raise ValueError(f"position prompts need two objects and a relation in {RELATIONS}, got "
                             f"{len(objects)} objects and relation={relation!r}")
        text = f"{_phrase(objects[0])} {_RELATION_PHRASES[relation]} {_phrase(objects[1])}"
    else:
        if relation is not None:
            raise ValueError(f"only position prompts have a relation, got relation={relation!r} for {category}")
        text = " and ".join(_phrase(o) for o in objects)
    return PromptSpec(text=text, category=category, objects=objects, relation=relation)


def enumerate_prompts(category: str, max_objects: int = 4) -> list[PromptSpec]:
    """All prompts of ``category`` whose images need at most ``max_objects`` objects (a fixed, sorted order)."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    specs: list[PromptSpec] = []
    colored = [(c, s) for c in COLORS for s in SHAPES]
    if category == "single_object":
        specs = [make_spec(category, [ObjectSpec(s)]) for s in SHAPES]
    elif category == "colors":
        specs = [make_spec(category, [ObjectSpec(s, c)]) for c, s in colored]
    elif category == "two_object" and max_objects >= 2:
        specs = [make_spec(category, [ObjectSpec(a), ObjectSpec(b)]) for a in SHAPES for b in SHAPES if a != b]
    elif category == "counting":
        specs = [make_spec(category, [ObjectSpec(s, c, n)])
                 for n in range(2, max_objects + 1) for c, s in colored]
    elif category == "position" and max_objects >= 2:
        specs = [make_spec(category, [ObjectSpec(sa, ca), ObjectSpec(sb, cb)], rel)
                 for rel in RELATIONS for ca, sa in colored for cb, sb in colored if (ca, sa) != (cb, sb)]
    elif category == "color_attr" and max_objects >= 2:
        specs = [make_spec(category, [ObjectSpec(sa, ca), ObjectSpec(sb, cb)])
                 for ca, sa in colored for cb, sb in colored if ca != cb and sa != sb]
    return sorted(specs, key=lambda p: p.text)


def restatement(spec: PromptSpec) -> str:
    """The content of ``spec`` said again, attribute by attribute (lower case, words and `` . `` separated).

    ``a red circle to the left of a blue square`` → ``the red circle is on the left . the blue square is on the
    right .``; ``a red circle and a blue square`` → ``the circle is red . the square is blue .``; ``three green
    triangles`` → ``count three . color green . shape triangle .``; ``a circle`` → ``there is one circle .``.
    """
    if spec.category == "position":
        (subject, reference), (subject_side, reference_side) = spec.objects, _RELATION_SIDES[spec.relation]
        name = lambda o: f"{o.color} {o.shape}" if o.color else o.shape  # noqa: E731
        return f"the {name(subject)} is {subject_side} . the {name(reference)} is {reference_side} ."
    if spec.category == "counting":
        (obj,) = spec.objects
        return f"count {_NUMBER_WORDS[obj.count]} . color {obj.color} . shape {obj.shape} ."
    return " ".join(f"the {o.shape} is {o.color} ." if o.color else f"there is one {o.shape} ." for o in spec.objects)


def scene_labels(spec: PromptSpec) -> tuple[int, ...]:
    """Where the objects of a ``position`` caption go, as one class index per field of :data:`SCENE_FIELDS`.

    The tiny LLM's scene objective (:class:`fusedit.text.tiny_llm.SceneObjective`) asks its values at a caption's
    last token to predict these, so that the frozen LLM hands the DiT which object goes where. The objects are
    taken in spatial order (left or top one first): ``a red circle to the right of a blue square`` →
    ``(blue, square, red, circle, left/right)``, the same as ``a blue square to the left of a red circle``.
    Captions of the other categories name no place and get :data:`NO_SCENE_TARGET` in every field.
    """
    if spec.category != "position":
        return (NO_SCENE_TARGET,) * len(SCENE_FIELDS)
    subject, reference = spec.objects
    first, second = (subject, reference) if spec.relation in ("left of", "above") else (reference, subject)
    axis = 0 if spec.relation in ("left of", "right of") else 1
    return (COLORS.index(first.color), SHAPES.index(first.shape), COLORS.index(second.color),
            SHAPES.index(second.shape), axis)


# ----------------------------------------------------------------------------------------------------------------
# Rasterisation
# ----------------------------------------------------------------------------------------------------------------


def shape_mask(shape: str, height: int, width: int) -> np.ndarray:
    """Boolean mask ``(height, width)`` of ``shape`` filling that box (pixel-centre sampling, no anti-aliasing).

    ``circle``: the inscribed ellipse; ``square``: the whole box; ``triangle``: apex at the top centre, base along the
    bottom edge. The scorer uses the same masks as templates.
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
    """An object of a rendered scene: its shape, color, size and top-left corner ``(x, y)`` (pixels)."""

    shape: str
    color: str
    size: str
    x: int
    y: int


def object_side(size: str, resolution: int) -> int:
    """Side in pixels of an object of ``size`` in an image of ``resolution`` pixels."""
    return max(3, int(round(SIZE_FRACTIONS[size] * resolution)))


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
            raise ValueError(f"ShapesWorld: resolution must be an integer >= {MIN_RESOLUTION} pixels, got {resolution!r}")
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
            raise ValueError(f"data.shapes.category_weights: {config.category_weights} gives every category of this "
                             f"world ({self.categories}) weight 0; expected at least one positive weight")
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

    def _check_category(self, category: Optional[str]) -> None:
        if category is not None and category not in self._prompts:
            raise ValueError(f"category {category!r} is not in this shapes world; available: {self.categories}"
                             + ("" if category in CATEGORIES else f" (GenEval categories: {CATEGORIES})"))

    def _select(self, table: dict[str, list[PromptSpec]], category: Optional[str]) -> list[PromptSpec]:
        self._check_category(category)
        if category is not None:
            return list(table[category])
        return [s for c in self.categories for s in table[c]]

    def all_prompts(self, category: Optional[str] = None) -> list[PromptSpec]:
        """Every prompt (training and held-out), optionally of one category."""
        return self._select(self._prompts, category)

    def training_prompts(self, category: Optional[str] = None) -> list[PromptSpec]:
        """Prompts that appear in training, optionally of one category."""
        return self._select(self._training, category)

    def held_out_prompts(self, category: Optional[str] = None) -> list[PromptSpec]:
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

    def llm_scene_labels(self) -> tuple[list[str], list[tuple[int, ...]]]:
        """The training captions and their :func:`scene_labels`, in the order of :meth:`llm_corpus`'s lines (each
        line starts with its caption)."""
        specs = self.training_prompts()
        return [s.text for s in specs], [scene_labels(s) for s in specs]

    def spec(self, text: str) -> PromptSpec:
        """The :class:`PromptSpec` of a prompt string of this world."""
        try:
            return self._by_text[text]
        except KeyError:
            raise KeyError(f"{text!r} is not a prompt of this shapes world (see ShapesWorld.all_prompts())") from None

    # -- rendering -----------------------------------------------------------------------------------------------

    def scene(self, spec: PromptSpec, rng: np.random.Generator) -> list[PlacedObject]:
        """Sample the objects of an image faithful to ``spec``: colors left open are drawn, sizes and positions too."""
        items: list[tuple[str, str, str]] = []
        for obj in spec.objects:
            for _ in range(obj.count):
                color = obj.color if obj.color is not None else COLORS[rng.integers(len(COLORS))]
                items.append((obj.shape, color, SIZES[rng.integers(len(SIZES))]))
        if len(items) > self.config.max_objects:
            raise ValueError(f"prompt {spec.text!r} needs {len(items)} objects but max_objects is "
                             f"{self.config.max_objects}")
        for attempt in range(3):
            boxes = self._place(items, spec.relation, rng)
            if boxes is not None:
                return [PlacedObject(s, c, z, x, y) for (s, c, z), (x, y) in zip(items, boxes)]
            items = [(s, c, "small") for s, c, _ in items]  # shrink and retry: always feasible at >= 16 px
        raise RuntimeError(f"could not lay out {spec.text!r} at {self.resolution} px")  # pragma: no cover

    def _place(self, items: list[tuple[str, str, str]], relation: Optional[str],
               rng: np.random.Generator) -> Optional[list[tuple[int, int]]]:
        """Top-left corners of non-overlapping boxes for ``items`` (a relation constrains items 0 and 1)."""
        sides = [object_side(z, self.resolution) for _, _, z in items]
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
                return [(x, y) for x, y, _ in boxes]
        return None

    def _relation_ok(self, a: tuple[int, int, int], b: tuple[int, int, int], relation: str) -> bool:
        """``a <relation> b`` with the boxes separated along the relation's axis and that axis dominant."""
        dx = (b[0] + b[2] / 2) - (a[0] + a[2] / 2)  # > 0: a is left of b
        dy = (b[1] + b[2] / 2) - (a[1] + a[2] / 2)  # > 0: a is above b
        main, perp = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
        return main >= (a[2] + b[2]) / 2 + self._gap and abs(perp) <= 0.5 * main

    def draw(self, objects: Sequence[PlacedObject]) -> np.ndarray:
        """Rasterise placed objects onto the background: ``np.uint8 (R, R, 3)``."""
        image = np.empty((self.resolution, self.resolution, 3), dtype=np.uint8)
        image[:] = BACKGROUND
        for obj in objects:
            side = object_side(obj.size, self.resolution)
            mask = shape_mask(obj.shape, side, side)
            region = image[obj.y:obj.y + side, obj.x:obj.x + side]
            if region.shape[:2] != mask.shape:
                raise ValueError(f"object {obj} does not fit in a {self.resolution} px image")
            region[mask] = PALETTE[obj.color]
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

    def train_dataset(self) -> "ShapesDataset":
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

    def __getitem__(self, index: int) -> dict[str, Union[torch.Tensor, str]]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"ShapesDataset index {index} out of range for size {n}")
        image, spec = self.world.example(index % n)
        return {"image": image_to_tensor(image), "caption": spec.text}
