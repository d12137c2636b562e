"""Configuration of training data: the embedded shapes world, image folders, webdataset shards, latent caches."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fusedit.config import require

#: GenEval's categories, in a fixed order: the caption kinds of the shapes world (:mod:`fusedit.data.shapes`).
CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


@dataclass
class ShapesWorldConfig:
    """The procedural "shapes world" (see :mod:`fusedit.data.shapes`).

    Attributes:
        seed: seed of the world (which prompts are held out) and of the images.
        size: number of training examples (images are generated on the fly from their index).
        max_objects: at most this many objects per image (1..4).
        held_out_fraction: fraction of attribute combinations never shown in training (evaluation prompts).
        category_weights: relative frequency of each GenEval category in training (``{}``: all equal; a category
            left out of a non-empty mapping weighs 1), e.g. ``{position: 3, color_attr: 2}`` to show more of the
            scenes where colors must be bound to objects and places.
    """

    seed: int = 0
    size: int = 50000
    max_objects: int = 4
    held_out_fraction: float = 0.1
    category_weights: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        require(self.size > 0, f"data.shapes.size: got {self.size}, expected a positive integer")
        require(1 <= self.max_objects <= 4, f"data.shapes.max_objects: got {self.max_objects}, expected 1..4")
        require(
            0.0 <= self.held_out_fraction < 1.0,
            f"data.shapes.held_out_fraction: got {self.held_out_fraction}, expected in [0, 1)",
        )
        for category, weight in self.category_weights.items():
            require(
                category in CATEGORIES,
                f"data.shapes.category_weights: unknown category {category!r}; expected some of {CATEGORIES}",
            )
            require(
                isinstance(weight, (int, float)) and weight >= 0,
                f"data.shapes.category_weights.{category}: got {weight!r}, expected a number >= 0",
            )


@dataclass
class BucketsConfig:
    """Aspect-ratio buckets (:mod:`fusedit.data.buckets`): each image goes to the bucket nearest its aspect ratio
    (resize to cover, centre crop) and every micro-batch is drawn from one bucket.

    Attributes:
        enabled: bucket the images (else every image is a ``resolution``² square crop).
        sizes: explicit buckets as ``[height, width]`` pixel pairs; empty: generate ``count`` buckets.
        pixel_budget: most pixels of a bucket (``height·width``); ``null``: ``data.resolution²``.
        aspect_range: ``[lowest, highest]`` width/height ratio of generated buckets.
        count: number of generated buckets (aspect ratios spaced evenly in log scale; odd counts include 1:1).
        multiple: bucket sides are multiples of this; ``null``: ``model.patch_size`` × the codec's spatial factor
            (1 in pixel space; a VAE's own factor, read when it is loaded).
    """

    enabled: bool = False
    sizes: list[list[int]] = field(default_factory=list)
    pixel_budget: int | None = None
    aspect_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    count: int = 7
    multiple: int | None = None

    def validate(self) -> None:
        for pair in self.sizes:
            require(
                isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, int) and v > 0 for v in pair),
                f"data.buckets.sizes: got {pair!r}, expected [height, width] with positive integers",
            )
        require(
            self.pixel_budget is None or self.pixel_budget > 0,
            f"data.buckets.pixel_budget: got {self.pixel_budget}, expected a positive integer or null",
        )
        require(
            len(self.aspect_range) == 2 and 0 < self.aspect_range[0] <= self.aspect_range[1],
            f"data.buckets.aspect_range: got {self.aspect_range}, expected [low, high] with 0 < low <= high",
        )
        require(self.count >= 1, f"data.buckets.count: got {self.count}, expected a positive integer")
        require(
            self.multiple is None or self.multiple > 0,
            f"data.buckets.multiple: got {self.multiple}, expected a positive integer or null",
        )


@dataclass
class DataConfig:
    """Where training images and captions come from.

    Attributes:
        source: ``shapes`` (embedded default, pixel space), ``folder`` (images + captions.jsonl/csv),
            ``webdataset`` (shards in the reference's layout) or ``latents`` (shards written by
            ``fusedit cache-latents``).
        path: folder / shard pattern (e.g. ``data/train-{0000..0099}.tar``) / latent shard pattern.
        resolution: training image side in pixels.
        center_crop: centre crop after resizing the short side (else random crop).
        image_key, caption_key, original_caption_key: webdataset sample keys (the reference's layout).
        original_caption_rate: probability of using the original instead of the synthetic caption.
        vae: path or hub id of a diffusers VAE (``null``: pixel space, no VAE).
        vae_subfolder: subfolder of the VAE inside ``vae`` (e.g. ``vae`` for a pipeline repo).
        num_workers: DataLoader workers.
        shapes: the shapes world's settings (``source: shapes``).
        interpolation: resize filter: ``bilinear`` (the reference), ``bicubic``, ``lanczos`` or ``nearest``.
        shuffle: for shard sources (``webdataset``, ``latents``): permute the shard order and the samples inside
            each shard every epoch (deterministic in the seed and epoch; resumable without replay).
        vae_sample_mode: latent of an image: the VAE posterior's ``mean`` or a ``sample`` from it.
        buckets: aspect-ratio buckets (``folder``, ``webdataset`` and ``latents`` sources).
        remote_retries: how many times a remote shard (``https://``, ``s3://``, ``gs://``, ``pipe:``) is reopened
            after its connection fails mid-shard before the rest of the shard is skipped and counted.
    """

    source: Literal["shapes", "folder", "webdataset", "latents"] = "shapes"
    path: str | None = None
    resolution: int = 32
    center_crop: bool = True
    image_key: str = "image.jpg"
    caption_key: str = "synthetic_caption.txt"
    original_caption_key: str = "original_caption.txt"
    original_caption_rate: float = 0.0
    vae: str | None = None
    vae_subfolder: str | None = None
    num_workers: int = 0
    shapes: ShapesWorldConfig = field(default_factory=ShapesWorldConfig)
    interpolation: Literal["nearest", "bilinear", "bicubic", "lanczos"] = "bilinear"
    shuffle: bool = True
    vae_sample_mode: Literal["mean", "sample"] = "mean"
    buckets: BucketsConfig = field(default_factory=BucketsConfig)
    remote_retries: int = 3

    def validate(self) -> None:
        require(self.resolution > 0, f"data.resolution: got {self.resolution}, expected a positive integer")
        require(
            0.0 <= self.original_caption_rate <= 1.0,
            f"data.original_caption_rate: got {self.original_caption_rate}, expected 0..1",
        )
        require(self.num_workers >= 0, f"data.num_workers: got {self.num_workers}, expected >= 0")
        interpolations = ("nearest", "bilinear", "bicubic", "lanczos")
        require(
            self.interpolation in interpolations,
            f"data.interpolation: got {self.interpolation!r}, expected one of {', '.join(interpolations)}",
        )
        require(
            self.vae_sample_mode in ("mean", "sample"),
            f"data.vae_sample_mode: got {self.vae_sample_mode!r}, expected 'mean' or 'sample'",
        )
        require(self.remote_retries >= 0, f"data.remote_retries: got {self.remote_retries}, expected >= 0")
        if self.buckets.enabled:
            require(
                self.source in ("folder", "webdataset", "latents"),
                f"data.buckets.enabled: the {self.source!r} source has no aspect ratios; use a folder, webdataset "
                f"or latents source, or set data.buckets.enabled=false",
            )
        if self.source != "shapes":
            require(
                bool(self.path), f"data.path: data.source={self.source} needs data.path (a folder or shard pattern)"
            )
