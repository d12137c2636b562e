"""A geometric object detector for shapes-world images (it never looks at the renderer's masks or positions).

An image is ``np.uint8 (R, R, 3)`` of any square size ``R >= 16``. Detection works in four steps:

1. **Coverage.** Every object color ``c`` of :data:`~fusedit.data.shapes.PALETTE` spans a line in RGB from the
   background ``b``: a pixel ``p`` that is a mix of the two lies on it at ``α = <p - b, c - b> / |c - b|²``. Each pixel
   gets the palette color whose line passes closest (its *residual* is that distance) and its coverage ``α`` of that
   color. Anti-aliased, blurred or compressed edges are partial coverages, not new colors. A pixel is foreground when
   it covers its color by at least one half, or when it is far from the background and from every palette line
   (an off-palette color is still something drawn).
2. **Components.** 8-connected components of the foreground are the candidate objects; components whose coverage
   mass is below :attr:`DetectorSettings.speck_fraction` of the smallest object of the world are specks and are
   ignored (a person would not call them objects).
3. **Color.** The mean color of a component's well-covered pixels, matched to the nearest palette color; it is
   ``None`` (not a color of the world) when that mean is far from every palette color or when fewer than
   :attr:`DetectorSettings.min_color_purity` of its pixels carry that color (a mottled, multi-colored blob).
4. **Shape.** The world draws a shape inside a square box of side ``s``: a square fills it, a circle is the inscribed
   disc, a triangle has its apex at the top centre and its base along the bottom. For each shape the box is fitted to
   the component's coverage (``s`` from the coverage mass and the shape's area fraction, the box from its centroid),
   refined over a few sizes and sub-pixel offsets, and the shape's anti-aliased template is compared with the
   coverage by soft IoU ``Σ min(a, t) / Σ max(a, t)``. The best shape wins when its IoU is at least
   :attr:`DetectorSettings.min_shape_iou` and its side lies in the world's size range; otherwise the component is an
   object of unknown shape. Irregular blobs, stripes, fills and merged objects therefore never pass as shapes.

Coordinates: ``x`` is the column (grows to the right), ``y`` the row (grows downwards).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from fusedit.data.shapes import BACKGROUND, COLORS, MIN_RESOLUTION, PALETTE, SHAPES, SIZE_FRACTIONS

_BACKGROUND = np.array(BACKGROUND, dtype=np.float32)
_PALETTE = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)  # (K, 3)
_DIRECTIONS = _PALETTE - _BACKGROUND  # (K, 3): background → color
_LENGTHS2 = (_DIRECTIONS**2).sum(axis=1)  # (K,)
#: Area of each shape as a fraction of its box (``s²``), and where its centroid lies in the box (fractions of ``s``).
_AREA_FRACTION = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}
_CENTROID = {"square": (0.5, 0.5), "circle": (0.5, 0.5), "triangle": (0.5, 2.0 / 3.0)}
_SUPERSAMPLE = 4
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class DetectorSettings:
    """Thresholds of :func:`detect`, in units of the image side ``R`` or of the world's object sizes.

    Attributes:
        min_coverage: a pixel covering its palette color by at least this much is foreground.
        off_palette_distance: a pixel this far (RGB) from the background and from every palette line is foreground.
        speck_fraction: components with coverage mass below this fraction of the area of the world's smallest
            object (a small triangle) are specks, ignored.
        max_color_distance: the mean color of an object must be within this RGB distance of a palette color.
        min_color_purity: at least this fraction of an object's pixels must carry its color.
        min_shape_iou: soft IoU with the best template needed to call a component that shape.
        min_side, max_side: the fitted box side must lie in ``[min_side, max_side] · R`` (the world draws 0.22 R and
            0.34 R).
        position_margin: a relation holds when the centroid offset along its axis exceeds this times the mean side of
            the two objects, and that axis dominates (the offset across it is not larger).
    """

    min_coverage: float = 0.5
    off_palette_distance: float = 110.0
    speck_fraction: float = 0.3
    max_color_distance: float = 75.0
    min_color_purity: float = 0.7
    min_shape_iou: float = 0.78
    min_side: float = 0.13
    max_side: float = 0.5
    position_margin: float = 0.3


DEFAULT_SETTINGS = DetectorSettings()


@dataclass(frozen=True)
class DetectedObject:
    """One object found in an image.

    Attributes:
        shape: one of :data:`~fusedit.data.shapes.SHAPES`, or ``None`` when no shape fits.
        color: one of :data:`~fusedit.data.shapes.COLORS`, or ``None`` when the object is not one color of the world.
        centroid: ``(x, y)`` coverage-weighted centre in pixels (pixel centres at ``i + 0.5``).
        side: side of the fitted box in pixels (of the best shape, even when it is rejected).
        area: coverage mass in pixels.
        shape_iou: soft IoU of the best shape template.
        bbox: ``(x0, y0, x1, y1)`` of the component's pixels, end-exclusive.
    """

    shape: str | None
    color: str | None
    centroid: tuple[float, float]
    side: float
    area: float
    shape_iou: float
    bbox: tuple[int, int, int, int]

    @property
    def recognised(self) -> bool:
        """Whether the object is a shape of the world in a color of the world."""
        return self.shape is not None and self.color is not None


def check_image(image: np.ndarray) -> np.ndarray:
    """``image`` if it is a square ``np.uint8 (R, R, 3)`` with ``R >= 16``; a clear ``ValueError`` otherwise."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        got = f"{type(image).__name__} {getattr(image, 'dtype', '')} {getattr(image, 'shape', '')}"
        raise ValueError(
            f"expected an image as np.uint8 array (H, W, 3), got {got}; convert model outputs with as_uint8_images()"
        )
    height, width = image.shape[:2]
    if height != width or height < MIN_RESOLUTION:
        raise ValueError(
            f"the shapes detector reads square images of at least {MIN_RESOLUTION} px, got {width}x{height}"
        )
    return image


def pixel_coverage(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-pixel palette color index ``(R, R)`` int, its coverage ``α`` ``(R, R)`` in ``[0, 1]`` and the RGB
    residual ``(R, R)`` of the pixel from that color's background line (step 1 of the module docstring)."""
    offset = image.astype(np.float32) - _BACKGROUND  # (R, R, 3)
    dots = offset @ _DIRECTIONS.T  # (R, R, K)
    alpha = np.clip(dots / _LENGTHS2, 0.0, 1.0)
    # |offset - α·dir|² = |offset|² - 2α<offset, dir> + α²|dir|²
    squared = (offset**2).sum(axis=-1, keepdims=True) - 2 * alpha * dots + alpha**2 * _LENGTHS2
    index = squared.argmin(axis=-1)
    pick = np.take_along_axis
    residual = np.sqrt(np.maximum(pick(squared, index[..., None], -1)[..., 0], 0.0))
    return index, pick(alpha, index[..., None], -1)[..., 0], residual


def foreground_mask(image: np.ndarray, settings: DetectorSettings = DEFAULT_SETTINGS) -> np.ndarray:
    """Boolean ``(R, R)``: pixels that are drawn (step 1 of the module docstring)."""
    return _PixelAnalysis(check_image(image), settings).foreground


def smallest_object_area(resolution: int) -> float:
    """Pixel area of the world's smallest object (a small triangle) at ``resolution``."""
    return 0.5 * (SIZE_FRACTIONS["small"] * resolution) ** 2


class _PixelAnalysis:
    """Steps 1–2 of the module docstring for one image: coverage, foreground and its components."""

    def __init__(self, image: np.ndarray, settings: DetectorSettings):
        self.image, self.settings = image, settings
        self.index, self.alpha, self.residual = pixel_coverage(image)
        distance = np.linalg.norm(image.astype(np.float32) - _BACKGROUND, axis=-1)
        self.foreground = (self.alpha >= settings.min_coverage) | (
            (distance >= settings.off_palette_distance) & (self.residual >= settings.off_palette_distance)
        )
        self.labels, _ = ndimage.label(self.foreground, structure=_EIGHT_CONNECTED)


@dataclass(frozen=True)
class Detection:
    """What :func:`analyse` finds in an image.

    Attributes:
        objects: the objects, in reading order (rows of the centroid, then columns); specks are left out.
        background_error: how clean the background is: the mean absolute difference (RGB, 0–255 units) between the
            background color and every pixel more than 2 px away from an object (specks count as background: they
            are what makes it unclean). 0 for the world's renders; NaN when objects leave no background.
    """

    objects: list[DetectedObject]
    background_error: float


def analyse(image: np.ndarray, settings: DetectorSettings = DEFAULT_SETTINGS) -> Detection:
    """Objects and background cleanliness of ``image`` (``np.uint8 (R, R, 3)``, square, ``R >= 16``)."""
    pixels = _PixelAnalysis(check_image(image), settings)
    min_mass = settings.speck_fraction * smallest_object_area(image.shape[0])
    found, object_pixels = [], np.zeros(image.shape[:2], dtype=bool)
    for label, box in enumerate(ndimage.find_objects(pixels.labels), start=1):
        if box is None:
            continue
        found_object = _describe_component(pixels, label, box, min_mass)
        if found_object is not None:
            found.append(found_object)
            object_pixels[box] |= pixels.labels[box] == label
    background = ~ndimage.binary_dilation(object_pixels, structure=_EIGHT_CONNECTED, iterations=2)
    error = (
        float(np.abs(image[background].astype(np.float32) - _BACKGROUND).mean()) if background.any() else float("nan")
    )
    return Detection(sorted(found, key=lambda o: (round(o.centroid[1]), o.centroid[0])), error)


def detect(image: np.ndarray, settings: DetectorSettings = DEFAULT_SETTINGS) -> list[DetectedObject]:
    """Every object of ``image`` (``np.uint8 (R, R, 3)``, square, ``R >= 16``) in reading order (by rows of the
    centroid, then columns); specks are left out. See the module docstring."""
    return analyse(image, settings).objects


def background_error(image: np.ndarray, settings: DetectorSettings = DEFAULT_SETTINGS) -> float:
    """:attr:`Detection.background_error` of ``image``."""
    return analyse(image, settings).background_error


def _describe_component(pixels: _PixelAnalysis, label: int, box, min_mass: float) -> DetectedObject | None:
    """A :class:`DetectedObject` for component ``label`` (bounding slices ``box``), or None for a speck."""
    image, settings = pixels.image, pixels.settings
    resolution = image.shape[0]
    # a margin of 2 pixels: the rim of partial coverage, and room for templates slightly larger than the component
    y0, y1 = max(0, box[0].start - 2), min(resolution, box[0].stop + 2)
    x0, x1 = max(0, box[1].start - 2), min(resolution, box[1].stop + 2)
    region = pixels.labels[y0:y1, x0:x1]
    alpha = pixels.alpha[y0:y1, x0:x1]
    own = region == label
    # partial-coverage rim pixels next to the component belong to it too (not those of other components)
    rim = ndimage.binary_dilation(own, structure=_EIGHT_CONNECTED) & (region == 0)
    # coverage, sharpened around one half: compression ringing and mild blur fade away, true edges stay partial
    sharpened = np.clip((alpha - 0.2) / 0.6, 0.0, 1.0)
    coverage = np.where(own, np.maximum(sharpened, 0.5), np.where(rim, sharpened, 0.0)).astype(np.float32)
    mass = float(coverage.sum())
    if mass < min_mass:
        return None
    color = _component_color(
        image[y0:y1, x0:x1][own],
        pixels.index[y0:y1, x0:x1][own],
        alpha[own],
        pixels.residual[y0:y1, x0:x1][own],
        settings,
    )
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    cx, cy = float((coverage * xs).sum() / mass), float((coverage * ys).sum() / mass)
    extent = max(box[0].stop - box[0].start, box[1].stop - box[1].start)
    if extent > 1.5 * settings.max_side * resolution:  # far larger than any object: no template can fit
        shape, side, iou = None, float(extent), 0.0
    else:
        shape, side, iou = _fit_shape(coverage, xs, ys, mass, (cx, cy), resolution, settings)
    return DetectedObject(
        shape=shape,
        color=color,
        centroid=(cx, cy),
        side=side,
        area=mass,
        shape_iou=iou,
        bbox=(box[1].start, box[0].start, box[1].stop, box[0].stop),
    )


def _component_color(pixels, index, alpha, residual, settings: DetectorSettings) -> str | None:
    """Step 3 of the module docstring: the palette color of a component's pixels, or None."""
    core = alpha >= 0.75
    if core.sum() < 3:
        core = np.ones_like(alpha, dtype=bool)
    mean = pixels[core].astype(np.float32).mean(axis=0)
    distances = np.linalg.norm(_PALETTE - mean, axis=1)
    k = int(distances.argmin())
    purity = float(((index[core] == k) & (residual[core] < settings.max_color_distance)).mean())
    if distances[k] > settings.max_color_distance or purity < settings.min_color_purity:
        return None
    return COLORS[k]


def shape_template(
    shape: str, xs: np.ndarray, ys: np.ndarray, left: np.ndarray, top: np.ndarray, side: np.ndarray
) -> np.ndarray:
    """Anti-aliased coverage of ``shape`` in boxes ``(left, top, side)`` over a pixel grid.

    Args:
        xs, ys: pixel-centre coordinates of a grid, shape ``(h, w)`` (``xs`` constant down columns, ``ys`` along
            rows, as :func:`numpy.mgrid` gives them).
        left, top, side: box parameters, shape ``(M,)`` (one template per box).

    Returns:
        ``(M, h, w)`` coverage in ``[0, 1]``: the mean over ``4 × 4`` sub-pixel samples.
    """
    n = _SUPERSAMPLE
    offsets = (np.arange(n, dtype=np.float32) + 0.5) / n - 0.5
    sub_x = (xs[0, :, None] + offsets).reshape(-1)  # (w·n,)
    sub_y = (ys[:, 0, None] + offsets).reshape(-1)  # (h·n,)
    u = (sub_x[None, None, :] - left[:, None, None]) / side[:, None, None]  # (M, 1, w·n)
    v = (sub_y[None, :, None] - top[:, None, None]) / side[:, None, None]  # (M, h·n, 1)
    if shape == "square":
        inside = ((u >= 0) & (u <= 1)) & ((v >= 0) & (v <= 1))
    elif shape == "circle":
        inside = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    elif shape == "triangle":
        inside = (v >= 0) & (v <= 1) & (np.abs(u - 0.5) <= v / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    h, w = xs.shape
    return inside.reshape(len(side), h, n, w, n).sum(axis=(2, 4), dtype=np.float32) * np.float32(1.0 / (n * n))


_SCALES = np.array([0.9, 1.0, 1.1], dtype=np.float32)
_SHIFTS = np.array([-0.4, 0.0, 0.4], dtype=np.float32)
_OFFSETS = np.stack(np.meshgrid(_SHIFTS, _SHIFTS, indexing="ij"), -1).reshape(-1, 2)  # (9, 2): (dx, dy)


def _best_fit(shape, coverage, xs, ys, centroid, sides, offsets) -> tuple[float, float, np.ndarray]:
    """Best soft IoU of ``shape`` over boxes of ``sides`` (M,) centred by ``offsets`` (M, 2); (iou, side, offset)."""
    fx, fy = _CENTROID[shape]
    left = centroid[0] - fx * sides + offsets[:, 0]
    top = centroid[1] - fy * sides + offsets[:, 1]
    templates = shape_template(shape, xs, ys, left, top, sides)  # (M, h, w)
    inter = np.minimum(templates, coverage).sum(axis=(1, 2))
    union = np.maximum(templates, coverage).sum(axis=(1, 2))
    iou = inter / np.maximum(union, 1e-6)
    m = int(iou.argmax())
    return float(iou[m]), float(sides[m]), offsets[m]


def _fit_shape(
    coverage, xs, ys, mass, centroid, resolution, settings: DetectorSettings
) -> tuple[str | None, float, float]:
    """Step 4 of the module docstring: ``(shape or None, fitted side, best soft IoU)``.

    Coarse to fine: every shape is fitted over three sizes at the centroid, then the two best shapes are refined over
    sub-pixel offsets at their best size.
    """
    coarse = []
    for shape in SHAPES:
        side0 = np.sqrt(mass / _AREA_FRACTION[shape])
        iou, side, _ = _best_fit(shape, coverage, xs, ys, centroid, side0 * _SCALES, np.zeros((3, 2), np.float32))
        coarse.append((iou, shape, side))
    refined = []
    for _, shape, side in sorted(coarse, reverse=True)[:2]:
        iou, side, _ = _best_fit(shape, coverage, xs, ys, centroid, np.full(len(_OFFSETS), side, np.float32), _OFFSETS)
        refined.append((iou, shape, side))
    best_iou, best_shape, best_side = max(refined)
    size_ok = settings.min_side * resolution <= best_side <= settings.max_side * resolution
    return (best_shape if best_iou >= settings.min_shape_iou and size_ok else None), best_side, best_iou
