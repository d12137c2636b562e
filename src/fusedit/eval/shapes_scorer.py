"""A deterministic object detector for shapes-world images and GenEval-style scoring against :class:`PromptSpec`.

Detection (:func:`detect`):
1. a pixel is foreground when its RGB distance to :data:`~fusedit.data.shapes.BACKGROUND` exceeds
   ``background_threshold``;
2. 8-connected components of the foreground are objects (holes filled, components smaller than ``min_area`` dropped
   as noise);
3. the object's color is the majority vote of its pixels' nearest palette colors;
4. its shape is the template (:func:`~fusedit.data.shapes.shape_mask` stretched to the component's bounding box)
   with the highest IoU with the component; below ``min_shape_iou`` the shape is ``"unknown"``.

Scoring (:func:`score_image`) follows GenEval's rules:
``single_object`` / ``colors``: an object of that shape (and color) is present; ``two_object`` / ``color_attr``: both
objects (with their colors) are present; ``counting``: exactly N objects of that shape (and color); ``position``: both
objects present and the relation holds between the centroids of the largest detection of each, by more than
``position_threshold`` times their mean bounding-box side (GenEval's rule, with ``x`` to the right, ``y`` down).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence, Union

import numpy as np
import torch
from scipy import ndimage

from fusedit.data.shapes import BACKGROUND, CATEGORIES, COLORS, PALETTE, SHAPES, SIZE_FRACTIONS, ObjectSpec, \
    PromptSpec, shape_mask

_PALETTE_RGB = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)  # (K, 3)
_BACKGROUND_RGB = np.array(BACKGROUND, dtype=np.float32)


@dataclass(frozen=True)
class DetectedObject:
    """One detected object.

    Attributes:
        shape: one of :data:`~fusedit.data.shapes.SHAPES` or ``"unknown"``.
        color: one of :data:`~fusedit.data.shapes.COLORS`.
        size: ``small`` or ``big`` (bounding-box side compared with the midpoint of the two rendered sizes).
        bbox: ``(x0, y0, x1, y1)`` in pixels, end-exclusive.
        centroid: ``(x, y)`` mean pixel-centre position (``x`` right, ``y`` down).
        area: number of pixels.
        shape_iou: IoU of the component with the chosen shape template.
    """

    shape: str
    color: str
    size: str
    bbox: tuple[int, int, int, int]
    centroid: tuple[float, float]
    area: int
    shape_iou: float


@dataclass(frozen=True)
class DetectorSettings:
    """Thresholds of :func:`detect` (defaults suit 32–64 px images from the shapes world or a model trained on it).

    Attributes:
        background_threshold: RGB distance to the background above which a pixel is foreground.
        min_area_fraction: components smaller than this fraction of the image (and than 4 pixels) are noise.
        min_shape_iou: below this best template IoU the shape is ``unknown``.
        position_threshold: a relation holds when the centroid offset along its axis exceeds this times the mean
            bounding-box side of the two objects.
    """

    background_threshold: float = 80.0
    min_area_fraction: float = 0.0075
    min_shape_iou: float = 0.55
    position_threshold: float = 0.3


DEFAULT_SETTINGS = DetectorSettings()


def _check_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        got = f"{type(image).__name__} {getattr(image, 'dtype', '')} {getattr(image, 'shape', '')}"
        raise ValueError(f"expected an image as np.uint8 array (H, W, 3), got {got}; "
                         "convert model outputs with as_uint8_images()")
    return image


def detect(image: np.ndarray, settings: DetectorSettings = DEFAULT_SETTINGS) -> list[DetectedObject]:
    """Detect the objects of an ``np.uint8 (H, W, 3)`` image, ordered by position (top-to-bottom, left-to-right)."""
    image = _check_image(image)
    pixels = image.astype(np.float32)
    foreground = np.linalg.norm(pixels - _BACKGROUND_RGB, axis=-1) > settings.background_threshold
    distances = np.linalg.norm(pixels[:, :, None, :] - _PALETTE_RGB, axis=-1)  # (H, W, K)
    nearest = distances.argmin(axis=-1)
    labels, num = ndimage.label(foreground, structure=np.ones((3, 3), dtype=bool))
    height, width = foreground.shape
    min_area = max(4.0, settings.min_area_fraction * height * width)
    size_split = 0.5 * (SIZE_FRACTIONS["small"] + SIZE_FRACTIONS["big"]) * max(height, width)
    found: list[DetectedObject] = []
    for index, slc in enumerate(ndimage.find_objects(labels), start=1):
        if slc is None:
            continue
        component = labels[slc] == index
        if component.sum() < min_area:
            continue
        color_votes = np.bincount(nearest[slc][component], minlength=len(COLORS))
        mask = ndimage.binary_fill_holes(component)
        h, w = mask.shape
        shape, iou = _classify_shape(mask, settings.min_shape_iou)
        ys, xs = np.nonzero(mask)
        y0, x0 = slc[0].start, slc[1].start
        found.append(DetectedObject(
            shape=shape,
            color=COLORS[int(color_votes.argmax())],
            size="big" if max(h, w) > size_split else "small",
            bbox=(x0, y0, x0 + w, y0 + h),
            centroid=(float(x0 + xs.mean() + 0.5), float(y0 + ys.mean() + 0.5)),
            area=int(mask.sum()),
            shape_iou=iou,
        ))
    return found


def _classify_shape(mask: np.ndarray, min_iou: float) -> tuple[str, float]:
    """Best-IoU shape template for a component mask cropped to its bounding box."""
    h, w = mask.shape
    best, best_iou = "unknown", 0.0
    for shape in SHAPES:
        template = shape_mask(shape, h, w)
        iou = float((template & mask).sum() / (template | mask).sum())
        if iou > best_iou:
            best, best_iou = shape, iou
    return (best if best_iou >= min_iou else "unknown"), best_iou


# ----------------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------------


def _matches(obj: DetectedObject, req: ObjectSpec) -> bool:
    return obj.shape == req.shape and (req.color is None or obj.color == req.color)


def _relation_holds(a: DetectedObject, b: DetectedObject, relation: str, threshold: float) -> bool:
    """``a <relation> b`` between centroids, by more than ``threshold`` × the mean bounding-box side."""
    dx = b.centroid[0] - a.centroid[0]  # > 0: a is left of b
    dy = b.centroid[1] - a.centroid[1]  # > 0: a is above b
    sides = [a.bbox[2] - a.bbox[0], a.bbox[3] - a.bbox[1], b.bbox[2] - b.bbox[0], b.bbox[3] - b.bbox[1]]
    margin = threshold * float(np.mean(sides))
    offset = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[relation]
    return offset > margin


def check_objects(objects: Sequence[DetectedObject], spec: PromptSpec,
                  settings: DetectorSettings = DEFAULT_SETTINGS) -> bool:
    """Whether detected ``objects`` satisfy ``spec`` under GenEval's rule for its category."""
    if spec.category not in CATEGORIES:
        raise ValueError(f"unknown category {spec.category!r} in spec {spec.text!r}; expected one of {CATEGORIES}")
    groups = [[o for o in objects if _matches(o, req)] for req in spec.objects]
    if spec.category == "counting":
        return all(len(g) == req.count for g, req in zip(groups, spec.objects))
    if not all(len(g) >= req.count for g, req in zip(groups, spec.objects)):
        return False
    if spec.category == "position":
        if spec.relation is None or len(groups) != 2:
            raise ValueError(f"position spec {spec.text!r} needs two objects and a relation")
        subject = max(groups[0], key=lambda o: o.area)
        reference = max((o for o in groups[1] if o is not subject), key=lambda o: o.area, default=None)
        return reference is not None and _relation_holds(subject, reference, spec.relation,
                                                         settings.position_threshold)
    return True


def score_image(image: np.ndarray, spec: PromptSpec, settings: DetectorSettings = DEFAULT_SETTINGS) -> bool:
    """Whether ``image`` (``np.uint8 (H, W, 3)``) is correct for ``spec`` (GenEval rules, see the module doc)."""
    return check_objects(detect(image, settings), spec, settings)


def as_uint8_images(images: Union[torch.Tensor, np.ndarray, Iterable[np.ndarray]]) -> list[np.ndarray]:
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
    return [_check_image(np.asarray(im)) for im in images]


def score_images(images: Union[torch.Tensor, np.ndarray, Sequence[np.ndarray]], specs: Sequence[PromptSpec],
                 settings: DetectorSettings = DEFAULT_SETTINGS) -> dict:
    """Score images against their specs (image ``i`` ↔ ``specs[i]``), GenEval style.

    Returns:
        ``{"overall": mean of the per-category accuracies, "accuracy": {category: float},
        "correct": {category: int}, "total": {category: int}, "num_images": int}`` over the categories present.
    """
    images = as_uint8_images(images)
    if len(images) != len(specs):
        raise ValueError(f"score_images: got {len(images)} images but {len(specs)} specs; expected one spec per image")
    correct: Counter = Counter()
    total: Counter = Counter()
    for image, spec in zip(images, specs):
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
