"""Aspect-ratio buckets: which ``(height, width)`` sizes a run trains at, which bucket an image goes to, and the
transform that brings an image to its bucket.

* **Buckets.** Either listed (``data.buckets.sizes``: ``[height, width]`` pairs) or generated: ``count`` aspect ratios
  ``width / height`` spaced evenly in log scale over ``aspect_range`` (an odd count includes 1:1); for each, the
  largest sides that are multiples of ``multiple`` and keep ``height·width`` within the pixel budget. ``multiple`` is
  ``model.patch_size`` × the codec's spatial factor, so every bucket is a whole grid of patches.
* **Assignment.** An image of ``W×H`` pixels goes to the bucket whose aspect ratio is nearest in log scale,
  ``argmin |log(W/H) − log(w_b/h_b)|`` (ties: the first listed bucket).
* **Transform.** Resize (keeping the aspect ratio) to the smallest size that covers the bucket, then crop the
  bucket out of it: centred, or at a random place drawn from the sample's generator.

Positions: 2D RoPE handles any ``h × w`` patch grid; a sin-cos table (``model.pos_embed: ape`` or
``model.absolute_pos_embed``) covers ``pos_embed_max_size`` patches per side, so every bucket's longer side must fit
it (:func:`check_bucket_config` at config load in pixel space, :func:`training_buckets` once a VAE is loaded,
before the first step).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from fusedit.config import ConfigError
from fusedit.data.latents import MANIFEST, read_manifest
from fusedit.data.transforms import _filter, to_rgb, to_tensor

__all__ = [
    "BucketTransform",
    "bucket_multiple",
    "check_bucket_config",
    "check_bucket_sizes",
    "cover_crop",
    "generate_buckets",
    "nearest_bucket",
    "resolve_buckets",
    "training_buckets",
]

Size = tuple[int, int]  # (height, width) in pixels


def generate_buckets(pixel_budget: int, aspect_range: tuple[float, float], count: int, multiple: int) -> list[Size]:
    """``count`` buckets ``(height, width)`` with aspect ratios ``width/height`` evenly spaced in log scale over
    ``aspect_range``, each the largest multiple-of-``multiple`` size within ``pixel_budget`` pixels (duplicates
    merged, order of increasing aspect ratio).

    Raises:
        ConfigError: the budget is too small for one ``multiple``² cell at some aspect ratio.
    """
    low, high = math.log(aspect_range[0]), math.log(aspect_range[1])
    buckets: list[Size] = []
    for k in range(count):
        aspect = math.exp(low + (high - low) * (k / (count - 1) if count > 1 else 0.5))
        best = _best_size(pixel_budget, aspect, multiple)
        if best is None:
            raise ConfigError(
                f"data.buckets.pixel_budget: {pixel_budget} pixels cannot hold a bucket of aspect ratio "
                f"{aspect:.2f} in multiples of {multiple} px; raise the budget or narrow data.buckets.aspect_range"
            )
        if best not in buckets:
            buckets.append(best)
    return buckets


def _best_size(pixel_budget: int, aspect: float, multiple: int) -> Size | None:
    """The multiple-of-``multiple`` size within the budget that best trades aspect error against unused pixels:
    ``argmin |log(w/h / aspect)| + ½·|log(h·w / budget)|`` (``None`` when no size fits)."""
    best, best_score = None, math.inf
    for h in range(multiple, pixel_budget // multiple + 1, multiple):
        widest = (pixel_budget // h) // multiple * multiple
        closest = int(round(h * aspect / multiple)) * multiple
        for w in {widest, min(widest, max(multiple, closest))}:
            if w < multiple:
                continue
            score = abs(math.log(w / h / aspect)) + 0.5 * abs(math.log(h * w / pixel_budget))
            if score < best_score - 1e-12:
                best, best_score = (h, w), score
    return best


def resolve_buckets(cfg: Any, resolution: int, multiple: int) -> list[Size]:
    """The buckets of a :class:`~fusedit.data.config.BucketsConfig`: its ``sizes`` (checked: multiples of ``multiple``,
    no duplicates, within the pixel budget when one is set) or generated ones (budget default: ``resolution²``).

    Raises:
        ConfigError: a listed size breaks a rule (the message names it and what to do).
    """
    multiple = cfg.multiple or multiple
    if not cfg.sizes:
        budget = cfg.pixel_budget or resolution * resolution
        return generate_buckets(budget, (cfg.aspect_range[0], cfg.aspect_range[1]), cfg.count, multiple)
    sizes: list[Size] = []
    for h, w in cfg.sizes:
        if h % multiple or w % multiple:
            raise ConfigError(
                f"data.buckets.sizes: [{h}, {w}] is not a multiple of {multiple} px on both sides (model.patch_size "
                f"× the codec's spatial factor, or data.buckets.multiple); use e.g. "
                f"[{max(multiple, h // multiple * multiple)}, {max(multiple, w // multiple * multiple)}]"
            )
        if cfg.pixel_budget is not None and h * w > cfg.pixel_budget:
            raise ConfigError(
                f"data.buckets.sizes: [{h}, {w}] has {h * w} pixels, over data.buckets.pixel_budget="
                f"{cfg.pixel_budget}; shrink it or raise the budget"
            )
        if (h, w) in sizes:
            raise ConfigError(f"data.buckets.sizes: [{h}, {w}] is listed twice")
        sizes.append((h, w))
    return sizes


def nearest_bucket(width: int, height: int, buckets: list[Size]) -> int:
    """Index of the bucket whose aspect ratio ``w/h`` is nearest the image's ``width/height`` in log scale (the first
    one on a tie)."""
    aspect = math.log(width / height)
    distances = [abs(aspect - math.log(w / h)) for h, w in buckets]
    return min(range(len(buckets)), key=lambda i: (round(distances[i], 12), i))


def cover_crop(
    image: Image.Image,
    size: Size,
    interpolation: str = "bilinear",
    generator: torch.Generator | None = None,
) -> Image.Image:
    """Resize ``image`` (aspect ratio kept) to the smallest size covering ``size = (height, width)`` and crop that
    out of it: centred (``generator=None``) or at a random offset (top drawn first, then left)."""
    h, w = size
    scale = max(w / image.width, h / image.height)
    new_w, new_h = max(w, math.ceil(image.width * scale - 1e-6)), max(h, math.ceil(image.height * scale - 1e-6))
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), resample=_filter(interpolation))
    if generator is None:
        top, left = int(round((new_h - h) / 2.0)), int(round((new_w - w) / 2.0))
    else:
        top = int(torch.randint(0, new_h - h + 1, (1,), generator=generator))
        left = int(torch.randint(0, new_w - w + 1, (1,), generator=generator))
    if (left, top, w, h) != (0, 0, new_w, new_h):
        image = image.crop((left, top, left + w, top + h))
    return image


class BucketTransform:
    """RGB → nearest bucket → cover + crop → ``(3, h, w)`` float32 in [-1, 1] (the bucketed ``ImageTransform``).

    Args:
        buckets: ``(height, width)`` sizes.
        center_crop: centre crop, else a random crop drawn from the generator passed per call.
        interpolation: resize filter.
    """

    def __init__(self, buckets: list[Size], center_crop: bool = True, interpolation: str = "bilinear"):
        if not buckets:
            raise ValueError("BucketTransform: no buckets")
        _filter(interpolation)
        self.buckets = [(int(h), int(w)) for h, w in buckets]
        self.center_crop, self.interpolation = center_crop, interpolation

    def bucket_of(self, width: int, height: int) -> int:
        return nearest_bucket(width, height, self.buckets)

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        """Transform one PIL image to its bucket's size: ``(3, h, w)``."""
        size = self.buckets[self.bucket_of(image.width, image.height)]
        cropped = cover_crop(to_rgb(image), size, self.interpolation, None if self.center_crop else generator)
        return to_tensor(cropped)

    def __repr__(self) -> str:
        return f"BucketTransform({len(self.buckets)} buckets, crop={'center' if self.center_crop else 'random'})"


# --------------------------------------------------------------------------------------------------------------------
# checks against the model
# --------------------------------------------------------------------------------------------------------------------


def bucket_multiple(config: Any, codec_factor: int) -> int:
    """Sides of every bucket are multiples of this: ``data.buckets.multiple`` or patch size × codec factor."""
    return config.data.buckets.multiple or config.model.patch_size * codec_factor


def check_bucket_sizes(config: Any, codec_factor: int) -> list[Size]:
    """The run's buckets, checked against the model: whole patch grids (multiples of patch size × ``codec_factor``)
    that the sin-cos position table covers (when the model has one).

    Raises:
        ConfigError: a bucket breaks a rule (one line: which bucket, what limit, what to change).
    """
    data, model = config.data, config.model
    patch = model.patch_size * codec_factor
    buckets = resolve_buckets(data.buckets, data.resolution, bucket_multiple(config, codec_factor))
    for h, w in buckets:
        if h % patch or w % patch:
            raise ConfigError(
                f"data.buckets: bucket {h}x{w} is not a multiple of {patch} px (model.patch_size "
                f"{model.patch_size} × the codec's spatial factor {codec_factor}); fix data.buckets.multiple or sizes"
            )
    largest = max(max(h, w) for h, w in buckets) // patch
    if not model.sincos_table_covers(largest):
        raise ConfigError(
            f"data.buckets: the largest bucket side is {largest} patches, but the sin-cos position table "
            f"(model.pos_embed={model.pos_embed}, absolute_pos_embed={model.absolute_pos_embed}) covers "
            f"model.pos_embed_max_size={model.pos_embed_max_size}; raise pos_embed_max_size to {largest} or "
            f"shrink the buckets"
        )
    return buckets


def check_bucket_config(config: Any) -> None:
    """Config-load check of an ExperimentConfig's buckets where the codec's spatial factor is known without loading
    it: pixel space (factor 1). With a VAE the same check runs once it is loaded, before training starts
    (:func:`training_buckets`); a latent cache's buckets are its stored sizes."""
    data = config.data
    if data.buckets.enabled and data.source != "latents" and data.vae is None:
        check_bucket_sizes(config, 1)


def training_buckets(config: Any, codec: Any) -> list[Size] | None:
    """The checked buckets of a run with its loaded ``codec`` (``None``: not bucketed, or a latent cache, whose
    buckets are its stored sizes: those are checked against the sin-cos table here)."""
    if not config.data.buckets.enabled:
        return None
    if config.data.source == "latents":
        _check_latent_buckets(config)
        return None
    return check_bucket_sizes(config, codec.spatial_factor)


def _check_latent_buckets(config: Any) -> None:
    """The latent sizes a bucketed cache lists (its manifest's ``buckets``) must be whole patch grids the sin-cos
    table covers."""
    path = Path(config.data.path or "")
    if not (path / MANIFEST).is_file():
        return  # a bare shard pattern: nothing listed to check
    model = config.model
    for bucket in read_manifest(path).get("buckets") or []:
        h, w = bucket["latent_shape"][-2:]
        if h % model.patch_size or w % model.patch_size:
            raise ConfigError(
                f"data.path: the cache's {h}x{w} latents are not a multiple of model.patch_size={model.patch_size}"
            )
        if not model.sincos_table_covers(max(h, w) // model.patch_size):
            raise ConfigError(
                f"data.path: the cache's largest bucket is {max(h, w) // model.patch_size} patches per side, but "
                f"model.pos_embed_max_size={model.pos_embed_max_size}; raise it or cache smaller buckets"
            )
