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
        if self.source != "shapes":
            require(
                bool(self.path), f"data.path: data.source={self.source} needs data.path (a folder or shard pattern)"
            )
