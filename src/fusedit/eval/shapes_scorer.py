"""Scoring shapes-world images against their prompts (:class:`~fusedit.data.shapes.PromptSpec`).

Objects are found by the geometric detector of :mod:`fusedit.eval.shapes_detector`. The shapes world draws exactly
the objects a caption names and nothing else, so an image is correct when its objects are **exactly** the prompt's:

* ``single_object`` ("a circle"): one object, that shape (any color of the world);
* ``two_object`` ("a circle and a square"): two objects, those two shapes;
* ``counting`` ("three green triangles"): that many objects, all of that shape and color;
* ``colors`` ("a red circle"): one object of that shape and color;
* ``color_attr`` ("a red circle and a blue square"): two objects, each shape in its color;
* ``position`` ("a red circle to the left of a blue square"): the two objects, and the subject's centroid lies on
  the named side of the reference's by more than :attr:`~fusedit.eval.shapes_detector.DetectorSettings.position_margin`
  times their mean side, along the dominant axis.

An object of no known shape or color, and any object the prompt does not name, makes the image wrong (GenEval checks
what a prompt names; in a closed world we can also check that nothing else was drawn). Specks are ignored.

:func:`diagnose` names why a wrong image is wrong (:data:`FAILURES`): a drawing problem (unknown shapes), a binding
problem (the prompt's shapes and colors, not paired as asked) or a layout problem (the relation).

Color following (:func:`color_following`) compares the set of colors of the detected objects with the prompt's
colors: precision, recall and their F1, never recall alone (noise "draws" every color).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from fusedit.data.shapes import CATEGORIES, ObjectSpec, PromptSpec
from fusedit.eval.shapes_detector import DEFAULT_SETTINGS, DetectedObject, DetectorSettings, check_image, detect

__all__ = [
    "DEFAULT_SETTINGS",
    "DetectedObject",
    "DetectorSettings",
    "as_uint8_images",
    "check_objects",
    "color_following",
    "detect",
    "diagnose",
    "score_image",
    "score_images",
]


def _matches(obj: DetectedObject, req: ObjectSpec) -> bool:
    return obj.shape == req.shape and (req.color is None or obj.color == req.color)


def _assign(objects: Sequence[DetectedObject], required: Sequence[ObjectSpec]) -> list[DetectedObject] | None:
    """A one-to-one assignment of ``objects`` to ``required`` (expanded by count), or None when there is none.

    Requirements are few (at most 4), so a depth-first search is exact and cheap.
    """
    if len(objects) != len(required):
        return None

    def search(i: int, used: frozenset) -> list[DetectedObject] | None:
        if i == len(required):
            return []
        for j, obj in enumerate(objects):
            if j not in used and _matches(obj, required[i]):
                rest = search(i + 1, used | {j})
                if rest is not None:
                    return [obj] + rest
        return None

    return search(0, frozenset())


def _relation_holds(subject: DetectedObject, reference: DetectedObject, relation: str, margin: float) -> bool:
    """``subject <relation> reference``: the centroid offset along the relation's axis exceeds ``margin`` × the mean
    side and is not smaller than the offset across it."""
    dx = reference.centroid[0] - subject.centroid[0]  # > 0: subject is left of reference
    dy = reference.centroid[1] - subject.centroid[1]  # > 0: subject is above reference
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along > margin * 0.5 * (subject.side + reference.side) and abs(across) <= along


def check_objects(
    objects: Sequence[DetectedObject], spec: PromptSpec, settings: DetectorSettings = DEFAULT_SETTINGS
) -> bool:
    """Whether detected ``objects`` are exactly what ``spec`` asks for (see the module docstring)."""
    if spec.category not in CATEGORIES:
        raise ValueError(f"unknown category {spec.category!r} in spec {spec.text!r}; expected one of {CATEGORIES}")
    required = [req for req in spec.objects for _ in range(req.count)]
    assigned = _assign(objects, required)
    if assigned is None:
        return False
    if spec.category == "position":
        if spec.relation is None or len(assigned) != 2:
            raise ValueError(f"position spec {spec.text!r} needs two objects and a relation")
        return _relation_holds(assigned[0], assigned[1], spec.relation, settings.position_margin)
    return True


#: Why an image fails, in the order :func:`diagnose` checks: the wrong number of objects; an object of no known shape;
#: an object of no known color (prompts that name colors only); the wrong shapes (as a multiset); the right shapes but
#: not each in its color; the right objects in the wrong relation.
FAILURES: tuple[str, ...] = ("count", "unknown_shape", "unknown_color", "shape", "color", "relation")


def diagnose(
    objects: Sequence[DetectedObject], spec: PromptSpec, settings: DetectorSettings = DEFAULT_SETTINGS
) -> str | None:
    """``None`` when ``objects`` are right for ``spec`` (:func:`check_objects`), else the first reason of
    :data:`FAILURES` that applies."""
    if check_objects(objects, spec, settings):
        return None
    required = [req for req in spec.objects for _ in range(req.count)]
    if len(objects) != len(required):
        return "count"
    if any(obj.shape is None for obj in objects):
        return "unknown_shape"
    if any(req.color is not None for req in required) and any(obj.color is None for obj in objects):
        return "unknown_color"
    if Counter(obj.shape for obj in objects) != Counter(req.shape for req in required):
        return "shape"
    if _assign(objects, required) is None:
        return "color"
    return "relation"


def score_image(image: np.ndarray, spec: PromptSpec, settings: DetectorSettings = DEFAULT_SETTINGS) -> bool:
    """Whether ``image`` (``np.uint8 (R, R, 3)``) is correct for ``spec``."""
    return check_objects(detect(image, settings), spec, settings)


def color_following(objects: Sequence[DetectedObject], spec: PromptSpec) -> tuple[float, float] | None:
    """``(recall, precision)`` of the prompt's colors among the colors of the detected objects (any shape); ``None``
    for prompts that name no color. Precision is 0 when nothing of a world color is drawn."""
    wanted = {obj.color for obj in spec.objects if obj.color is not None}
    if not wanted:
        return None
    drawn = {obj.color for obj in objects if obj.color is not None}
    hit = len(wanted & drawn)
    return hit / len(wanted), (hit / len(drawn) if drawn else 0.0)


def as_uint8_images(images: torch.Tensor | np.ndarray | Iterable[np.ndarray]) -> list[np.ndarray]:
    """Images as a list of ``np.uint8 (H, W, 3)``.

    Accepts a float tensor/array ``(B, 3, H, W)`` in ``[-1, 1]`` (model outputs; clamped and rounded), a uint8
    array ``(B, H, W, 3)``, or an iterable of uint8 ``(H, W, 3)`` arrays.
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().numpy()
    if isinstance(images, np.ndarray) and images.dtype != np.uint8:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"float images must be (B, 3, H, W) in [-1, 1], got shape {images.shape}")
        scaled = np.clip((images.astype(np.float32) + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
        return list(scaled.transpose(0, 2, 3, 1))
    return [check_image(np.asarray(im)) for im in images]


def score_images(
    images: torch.Tensor | np.ndarray | Sequence[np.ndarray],
    specs: Sequence[PromptSpec],
    settings: DetectorSettings = DEFAULT_SETTINGS,
) -> dict:
    """Score images against their specs (image ``i`` ↔ ``specs[i]``).

    Returns:
        ``{"overall": mean of the per-category accuracies, "accuracy": {category: float},
        "correct": {category: int}, "total": {category: int}, "num_images": int}`` over the categories present.
    """
    images = as_uint8_images(images)
    if len(images) != len(specs):
        raise ValueError(f"score_images: got {len(images)} images but {len(specs)} specs; expected one spec per image")
    correct: Counter = Counter()
    total: Counter = Counter()
    for image, spec in zip(images, specs, strict=False):
        total[spec.category] += 1
        correct[spec.category] += int(score_image(image, spec, settings))
    present = [c for c in CATEGORIES if total[c]]
    accuracy = {c: correct[c] / total[c] for c in present}
    return {
        "overall": float(np.mean(list(accuracy.values()))) if accuracy else float("nan"),
        "accuracy": accuracy,
        "correct": {c: correct[c] for c in present},
        "total": {c: total[c] for c in present},
        "num_images": len(images),
    }
