"""Image decoding and the training transform: any PIL mode → RGB → resize short side → crop → tensor in [-1, 1].

This reproduces the reference's torchvision pipeline (``Resize(r, BILINEAR)`` on a PIL image, ``CenterCrop(r)`` or
``RandomCrop(r)``, ``ToTensor()``, ``Normalize([0.5], [0.5])``) with PIL, numpy and torch only:

* resize: the short side becomes ``resolution``, the long side ``int(resolution * long / short)`` (torchvision's
  rounding); PIL's filters are antialiased when downscaling, as torchvision's are for PIL input;
* centre crop: top/left ``int(round((size - resolution) / 2))`` (torchvision's rounding);
* random crop: top/left drawn with ``torch.randint`` from the given generator (seed it per sample for
  reproducible, resumable streams);
* values: ``uint8 / 255 * 2 - 1``, float32, shape ``(3, resolution, resolution)``.

Decoding is strict: truncated or otherwise unreadable bytes raise :class:`CorruptImageError` (the reference sets
``ImageFile.LOAD_TRUNCATED_IMAGES = True`` and silently trains on grey-filled images; we skip and count them).
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
import torch
from PIL import Image

__all__ = [
    "CorruptImageError",
    "INTERPOLATIONS",
    "ImageTransform",
    "center_crop_box",
    "decode_image",
    "load_image",
    "random_crop_box",
    "resize_short_side",
    "to_rgb",
    "to_tensor",
]

#: Names accepted for ``interpolation`` and the PIL filters they map to.
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

#: Exceptions PIL raises for unreadable, truncated or hostile image data.
_DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)


class CorruptImageError(ValueError):
    """Image bytes or an image file could not be decoded (the message says which and why)."""


def decode_image(data: bytes | bytearray | memoryview, name: str = "<bytes>") -> Image.Image:
    """Decode image bytes fully (not just the header) into a PIL image of its original mode.

    Raises:
        CorruptImageError: empty, truncated or undecodable data, or a decompression bomb.
    """
    if not data:
        raise CorruptImageError(f"{name}: empty image data")
    return _open(io.BytesIO(bytes(data)), name)


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image file.

    Raises:
        FileNotFoundError: the file does not exist.
        CorruptImageError: it exists but cannot be decoded.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    with open(path, "rb") as f:
        return decode_image(f.read(), name=path)


def _open(fp: io.BytesIO, name: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(fp)
            image.load()  # force the full decode: truncated data fails here, not later in a worker
    except _DECODE_ERRORS as exc:
        raise CorruptImageError(f"{name}: cannot decode image ({type(exc).__name__}: {exc})") from exc
    if image.width <= 0 or image.height <= 0:
        raise CorruptImageError(f"{name}: image has no pixels ({image.width}x{image.height})")
    return image


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB.

    * modes with transparency (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent colour) are composited over
      ``background`` (white by default) instead of having their alpha dropped;
    * 16/32-bit integer modes (``I``, ``I;16*``) are scaled from 0..65535 to 0..255 (``I`` images whose values all
      fit 0..255 are kept as is); float ``F`` images are read as 0..1 when their maximum is <= 1, else 0..255;
    * everything else (``1``, ``L``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``...) goes through PIL's ``convert``.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    if mode.startswith("I") or mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16"):
            values = values / 257.0
        elif mode.startswith("I"):
            if values.size and values.max() > 255:
                values = values / 257.0
        else:  # "F"
            if values.size and np.nanmax(values) <= 1.0:
                values = values * 255.0
        grey = np.clip(np.nan_to_num(np.rint(values)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return image.convert("RGB")


def resize_short_side(image: Image.Image, size: int, interpolation: str = "bilinear") -> Image.Image:
    """Resize so the short side is ``size``; the long side becomes ``int(size * long / short)`` (torchvision's rule)."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return image
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return image.resize((new_w, new_h), resample=_filter(interpolation))


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of the centred ``size``×``size`` crop (torchvision's rounding)."""
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return left, top, left + size, top + size


def random_crop_box(
    width: int, height: int, size: int, generator: torch.Generator | None = None
) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of a uniformly random ``size``×``size`` crop (top drawn first, then left)."""
    if width < size or height < size:
        raise ValueError(f"cannot crop {size}x{size} out of a {width}x{height} image")
    top = int(torch.randint(0, height - size + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - size + 1, (1,), generator=generator))
    return left, top, left + size, top + size


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image → float32 tensor ``(3, H, W)`` with values ``uint8 / 255 * 2 - 1`` in [-1, 1]."""
    array = np.asarray(to_rgb(image), dtype=np.uint8)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float()
    return tensor.div_(255.0).mul_(2.0).sub_(1.0)


def _filter(interpolation: str) -> Image.Resampling:
    try:
        return INTERPOLATIONS[interpolation]
    except KeyError:
        raise ValueError(f"interpolation: got {interpolation!r}, expected one of {sorted(INTERPOLATIONS)}") from None


class ImageTransform:
    """The training transform: RGB → resize short side → centre/random crop → ``(3, r, r)`` float32 in [-1, 1].

    Args:
        resolution: output side ``r`` in pixels.
        center_crop: centre crop (the reference's default) or a random crop drawn from ``generator``.
        interpolation: ``bilinear`` (reference), ``bicubic``, ``lanczos`` or ``nearest``.
    """

    def __init__(self, resolution: int, center_crop: bool = True, interpolation: str = "bilinear"):
        if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution <= 0:
            raise ValueError(f"resolution: got {resolution!r}, expected a positive integer")
        _filter(interpolation)
        self.resolution = resolution
        self.center_crop = center_crop
        self.interpolation = interpolation

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        """Transform one PIL image; ``generator`` drives the random crop (ignored for centre crops)."""
        image = resize_short_side(to_rgb(image), self.resolution, self.interpolation)
        w, h = image.size
        if self.center_crop:
            box = center_crop_box(w, h, self.resolution)
        else:
            box = random_crop_box(w, h, self.resolution, generator)
        if box != (0, 0, w, h):
            image = image.crop(box)
        return to_tensor(image)

    def __repr__(self) -> str:
        crop = "center" if self.center_crop else "random"
        return f"ImageTransform(resolution={self.resolution}, crop={crop}, interpolation={self.interpolation})"
