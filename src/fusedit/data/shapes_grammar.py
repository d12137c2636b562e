"""The shapes world's caption grammar: prompts, their structured specs, restatements and scene labels.

Captions follow GenEval's six categories (:data:`CATEGORIES`)::

    single_object   "a circle"                                   (any color)
    two_object      "a circle and a square"                      (any colors)
    counting        "three green triangles"                      (2–4, all of that color and shape)
    colors          "a red circle"
    position        "a red circle to the left of a blue square"  (left of / right of / above / below)
    color_attr      "a red circle and a blue square"             (two shapes, each with its color)

Every prompt string has one :class:`PromptSpec` (what an image must show); :func:`parse_prompt` reads any prompt of
the grammar back into its spec. Rendering lives in :mod:`fusedit.data.shapes`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from fusedit.data.config import CATEGORIES  # GenEval's categories, in a fixed order (re-exported)

#: The shapes, in a fixed order.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

#: Object colors, in a fixed order (their RGB values: :data:`fusedit.data.shapes.PALETTE`).
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "white")

#: Spatial relations of ``position`` prompts: "A <relation> B".
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
_RELATION_PHRASES = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}


_NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}

#: Where a restatement (:func:`restatement`) puts the subject and the reference object of a relation.
_RELATION_SIDES = {
    "left of": ("on the left", "on the right"),
    "right of": ("on the right", "on the left"),
    "above": ("on top", "at the bottom"),
    "below": ("at the bottom", "on top"),
}

#: Texts the tiny LLM can be pretrained on (:meth:`ShapesWorld.llm_corpus`).
LLM_CORPORA: tuple[str, ...] = ("restated", "captions")

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

#: Fields of every caption's full scene read-out (:func:`full_scene_labels`) and their number of classes: the first
#: and second object (color, shape, count; the second's shape has a class "none" for captions with one object) and
#: the relation (left/right, above/below, none).
FULL_SCENE_FIELDS: tuple[tuple[str, int], ...] = (
    ("first_color", len(COLORS)),
    ("first_shape", len(SHAPES)),
    ("first_count", 4),  # 1..4 objects
    ("second_color", len(COLORS)),
    ("second_shape", len(SHAPES) + 1),  # the last class: no second object
    ("relation", 3),  # 0: left/right, 1: above/below, 2: none
)

#: Which captions the tiny LLM's scene objective describes: ``position`` captions only (:func:`scene_labels`), or
#: ``all`` of them (:func:`full_scene_labels`).
SCENE_SCOPES: tuple[str, ...] = ("position", "all")


@dataclass(frozen=True)
class ObjectSpec:
    """A required object of a prompt.

    Attributes:
        shape: one of :data:`SHAPES`.
        color: one of :data:`COLORS`, or ``None`` when the prompt does not constrain the color.
        count: how many such objects the prompt asks for (``counting``: exactly this many; others: 1).
    """

    shape: str
    color: str | None = None
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
    relation: str | None = None


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


def make_spec(category: str, objects: Sequence[ObjectSpec], relation: str | None = None) -> PromptSpec:
    """Build the :class:`PromptSpec` (and its caption text) of ``objects`` in ``category``."""
    objects = tuple(objects)
    if category == "position":
        if relation not in RELATIONS or len(objects) != 2:
            raise ValueError(
                f"position prompts need two objects and a relation in {RELATIONS}, got "
                f"{len(objects)} objects and relation={relation!r}"
            )
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
        specs = [make_spec(category, [ObjectSpec(s, c, n)]) for n in range(2, max_objects + 1) for c, s in colored]
    elif category == "position" and max_objects >= 2:
        specs = [
            make_spec(category, [ObjectSpec(sa, ca), ObjectSpec(sb, cb)], rel)
            for rel in RELATIONS
            for ca, sa in colored
            for cb, sb in colored
            if (ca, sa) != (cb, sb)
        ]
    elif category == "color_attr" and max_objects >= 2:
        specs = [
            make_spec(category, [ObjectSpec(sa, ca), ObjectSpec(sb, cb)])
            for ca, sa in colored
            for cb, sb in colored
            if ca != cb and sa != sb
        ]
    return sorted(specs, key=lambda p: p.text)


def restatement(spec: PromptSpec) -> str:
    """The content of ``spec`` said again, attribute by attribute (lower case, words and `` . `` separated).

    ``a red circle to the left of a blue square`` → ``the red circle is on the left . the blue square is on the
    right .``; ``a red circle and a blue square`` → ``the circle is red . the square is blue .``; ``three green
    triangles`` → ``count three . color green . shape triangle .``; ``a circle`` → ``there is one circle .``.
    """
    if spec.category == "position" and spec.relation is not None:
        (subject, reference), (subject_side, reference_side) = spec.objects, _RELATION_SIDES[spec.relation]
        name = lambda o: f"{o.color} {o.shape}" if o.color else o.shape  # noqa: E731
        return f"the {name(subject)} is {subject_side} . the {name(reference)} is {reference_side} ."
    if spec.category == "counting":
        (obj,) = spec.objects
        return f"count {_NUMBER_WORDS[obj.count]} . color {obj.color} . shape {obj.shape} ."
    return " ".join(f"the {o.shape} is {o.color} ." if o.color else f"there is one {o.shape} ." for o in spec.objects)


def full_scene_labels(spec: PromptSpec) -> tuple[int, ...]:
    """What any caption describes, as one class index per field of :data:`FULL_SCENE_FIELDS`.

    ``position`` captions take their objects in spatial order, as :func:`scene_labels` does; the others in caption
    order. A color the caption leaves open has :data:`NO_SCENE_TARGET`: ``a circle`` → ``(-, circle, 1, -, none,
    none)``; ``three green triangles`` → ``(green, triangle, 3, -, none, none)``; ``a red circle and a blue square``
    → ``(red, circle, 1, blue, square, none)``.
    """
    objects = list(spec.objects)
    if spec.category == "position" and spec.relation is not None:
        subject, reference = objects
        objects = [subject, reference] if spec.relation in ("left of", "above") else [reference, subject]
        relation = 0 if spec.relation in ("left of", "right of") else 1
    else:
        relation = 2
    first = objects[0]
    second = objects[1] if len(objects) > 1 else None

    def color(obj: ObjectSpec | None) -> int:
        return COLORS.index(obj.color) if obj is not None and obj.color is not None else NO_SCENE_TARGET

    return (
        color(first),
        SHAPES.index(first.shape),
        first.count - 1,
        color(second),
        SHAPES.index(second.shape) if second is not None else len(SHAPES),
        relation,
    )


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
    return (
        COLORS.index(first.color),
        SHAPES.index(first.shape),
        COLORS.index(second.color),
        SHAPES.index(second.shape),
        axis,
    )


@functools.cache
def _grammar_index() -> dict[str, PromptSpec]:
    """Every prompt of the grammar (up to 4 objects) by its text."""
    return {spec.text: spec for category in CATEGORIES for spec in enumerate_prompts(category, 4)}


def parse_prompt(text: str) -> PromptSpec:
    """The :class:`PromptSpec` of any prompt of the grammar (case and surrounding or repeated spaces are ignored).

    Raises:
        ValueError: ``text`` is not a prompt of the shapes world's grammar.
    """
    if not isinstance(text, str):
        raise ValueError(f"a shapes-world prompt must be a string, got {type(text).__name__}")
    key = " ".join(text.lower().split()).rstrip(".")
    try:
        return _grammar_index()[key]
    except KeyError:
        raise ValueError(
            f"{text!r} is not a prompt of the shapes world's grammar; expected e.g. 'a circle', 'a red "
            "circle', 'three green triangles', 'a circle and a square', 'a red circle and a blue "
            "square' or 'a red circle to the left of a blue square' (2-4 objects, shapes "
            f"{', '.join(SHAPES)}, colors {', '.join(COLORS)})"
        ) from None
