"""Image/caption tar shards in the reference's webdataset layout (``image.jpg``, ``synthetic_caption.txt``,
``original_caption.txt``), read by the resumable shard-per-rank stream of :mod:`fusedit.data.shards`."""

from __future__ import annotations

from typing import Any

import torch

from fusedit.data.buckets import BucketTransform
from fusedit.data.shards import (
    STREAM_POS_KEY,
    CorruptSampleError,
    ShardStream,
    TarRecord,
    checked_original_caption_rate,
    expand_shards,
    index_tar,
    takes_original_caption,
)
from fusedit.data.transforms import ImageTransform, decode_image

__all__ = ["STREAM_POS_KEY", "WebShardDataset", "expand_shards", "index_tar"]


# --------------------------------------------------------------------------------------------------------------------
# image + caption shards (the reference's layout)
# --------------------------------------------------------------------------------------------------------------------


def _alternatives(key: str) -> list[str]:
    return [k.strip() for k in key.split(";") if k.strip()]


def _text(data: bytes, ext: str) -> str:
    """A caption member as stripped text; bytes that are not UTF-8 make the sample corrupt (skipped and counted)."""
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise CorruptSampleError(
            f"caption member {ext} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None


class WebShardDataset(ShardStream):
    """Image/caption shards in the reference's layout → ``{"image": (3, r, r) float32 in [-1, 1], "caption": str,
    "stream_pos": int64 (6,)}``.

    Args:
        shards: shard spec (see :func:`expand_shards`).
        resolution, center_crop, interpolation: the image transform (resize short side, centre/random crop).
        image_key, caption_key, original_caption_key: member extensions (``;`` separates alternatives, e.g.
            ``"jpg;png"``).
        original_caption_rate: probability of taking the original caption instead of the synthetic one (when the
            sample has a non-empty original caption).
        seed, rank, world_size, shuffle, epochs, remote_retries: see :class:`ShardStream`.
        buckets: aspect-ratio buckets ``[(height, width), ...]``: each image goes to its nearest bucket (cover +
            crop, :class:`~fusedit.data.buckets.BucketTransform`) instead of a ``resolution``² square; batch them
            with :class:`~fusedit.data.bucket_stream.BucketBatchStream`.
    """

    def __init__(
        self,
        shards,
        resolution: int,
        center_crop: bool = True,
        *,
        image_key: str = "image.jpg",
        caption_key: str = "synthetic_caption.txt",
        original_caption_key: str = "original_caption.txt",
        original_caption_rate: float = 0.0,
        interpolation: str = "bilinear",
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle: bool = False,
        epochs: int | None = None,
        remote_retries: int = 3,
        buckets: list[tuple[int, int]] | None = None,
    ):
        super().__init__(
            shards,
            seed=seed,
            rank=rank,
            world_size=world_size,
            shuffle=shuffle,
            epochs=epochs,
            remote_retries=remote_retries,
        )
        self.transform: ImageTransform | BucketTransform = (
            ImageTransform(resolution, center_crop, interpolation)
            if buckets is None
            else BucketTransform(buckets, center_crop, interpolation)
        )
        self.image_keys = _alternatives(image_key)
        self.caption_keys = _alternatives(caption_key)
        self.original_caption_keys = _alternatives(original_caption_key)
        self.original_caption_rate = checked_original_caption_rate(original_caption_rate)

    @classmethod
    def from_config(
        cls,
        cfg,
        *,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        epochs: int | None = None,
        buckets: list[tuple[int, int]] | None = None,
    ) -> WebShardDataset:
        """Build from a :class:`fusedit.data.config.DataConfig` (``source: webdataset``), bucketed when ``buckets``
        are given."""
        return cls(
            cfg.path,
            cfg.resolution,
            cfg.center_crop,
            image_key=cfg.image_key,
            caption_key=cfg.caption_key,
            original_caption_key=cfg.original_caption_key,
            original_caption_rate=cfg.original_caption_rate,
            interpolation=getattr(cfg, "interpolation", "bilinear"),
            seed=seed,
            rank=rank,
            world_size=world_size,
            shuffle=getattr(cfg, "shuffle", False),
            epochs=epochs,
            remote_retries=getattr(cfg, "remote_retries", 3),
            buckets=buckets,
        )

    @staticmethod
    def _first(record: TarRecord, keys: list[str]) -> str | None:
        return next((k for k in keys if record.has(k)), None)

    def decode(self, record: TarRecord, read, generator: torch.Generator) -> dict[str, Any]:
        image_ext = self._first(record, self.image_keys)
        if image_ext is None:
            raise CorruptSampleError(f"no image member ({' or '.join(self.image_keys)})")
        caption_ext = self._first(record, self.caption_keys)
        if caption_ext is None:
            raise CorruptSampleError(f"no caption member ({' or '.join(self.caption_keys)})")
        caption = _text(read(caption_ext), caption_ext)
        if not caption:
            raise CorruptSampleError(f"empty caption ({caption_ext})")
        use_original = takes_original_caption(generator, self.original_caption_rate)
        original_ext = self._first(record, self.original_caption_keys)
        if use_original and original_ext is not None:
            original = _text(read(original_ext), original_ext)
            caption = original or caption
        image = decode_image(read(image_ext), name=f"{record.key}.{image_ext}")
        return {"image": self.transform(image, generator), "caption": caption}
