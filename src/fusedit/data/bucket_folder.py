"""An image folder read in aspect-ratio buckets: :class:`ImageFolderDataset` whose items come at their bucket's size.

At construction every image's header is read (its size; nothing is decoded) to assign it the bucket nearest its
aspect ratio (:func:`fusedit.data.buckets.nearest_bucket`); ``item_buckets[i]`` is that bucket, or ``-1`` for a file
whose header cannot be read (marked bad and counted in ``skipped`` at once). A file that fails to decode later is
replaced by the next readable file *of the same bucket*, so a batch drawn from one bucket keeps one size. The
training order that draws batches within one bucket is :class:`~fusedit.train.data_order.BucketBatchSampler`.
"""

from __future__ import annotations

import logging
import os

from PIL import Image

from fusedit.data.buckets import BucketTransform
from fusedit.data.folder import ImageFolderDataset

__all__ = ["BucketedImageFolder"]

logger = logging.getLogger("fusedit.data")


class BucketedImageFolder(ImageFolderDataset):
    """Images + captions from a folder, each item ``{"image": (3, h, w), "caption": str}`` at its bucket's size.

    Args:
        root, center_crop, captions, interpolation, seed, on_bad: see :class:`ImageFolderDataset`.
        buckets: ``[(height, width), ...]`` in pixels.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        buckets: list[tuple[int, int]],
        center_crop: bool = True,
        captions: str | os.PathLike | None = None,
        interpolation: str = "bilinear",
        seed: int = 0,
        on_bad: str = "substitute",
    ):
        super().__init__(
            root,
            resolution=1,
            center_crop=center_crop,
            captions=captions,
            interpolation=interpolation,
            seed=seed,
            on_bad=on_bad,
        )
        self.bucket_transform = BucketTransform(buckets, center_crop, interpolation)
        self.transform = self.bucket_transform  # type: ignore[assignment]  # what _item applies
        self.buckets = self.bucket_transform.buckets
        self.item_buckets = [self._bucket_from_header(i) for i in range(len(self.files))]
        self._members: dict[int, list[int]] = {}
        self._slot: list[int] = []  # index -> its place in its bucket's member list
        for index, bucket in enumerate(self.item_buckets):
            self._slot.append(len(self._members.setdefault(bucket, [])))
            self._members[bucket].append(index)

    def _bucket_from_header(self, index: int) -> int:
        try:
            with Image.open(self.path(index)) as image:
                width, height = image.size
        except (OSError, ValueError, SyntaxError) as exc:
            self._bad[index] = True
            self._logged.add(index)
            logger.warning("skipping unreadable image %s: %s", self.files[index], exc)
            return -1
        if width <= 0 or height <= 0:
            self._bad[index] = True
            return -1
        return self.bucket_transform.bucket_of(width, height)

    def bucket_counts(self) -> dict[tuple[int, int], int]:
        """Images per bucket size (unreadable headers left out)."""
        return {self.buckets[b]: len(m) for b, m in sorted(self._members.items()) if b >= 0}

    def __getitem__(self, index: int) -> dict:
        """``{"image": (3, h, w), "caption": str}`` of ``index`` or of the next readable file of its bucket."""
        n = len(self.files)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        bucket = self.item_buckets[index]
        if self.on_bad == "raise" or bucket < 0:
            return super().__getitem__(index)
        members = self._members[bucket]
        start = self._slot[index]
        for step in range(len(members)):
            j = members[(start + step) % len(members)]
            image = self._try_load(j)
            if image is not None:
                return self._item(j, image)
        raise RuntimeError(f"no readable image of bucket {self.buckets[bucket]} in {self.root}")
