"""Writing a latent cache: tar shards written atomically, and the encoder that batches images through the codec
(one shard series per bucket size when the cache is bucketed). Used by :func:`fusedit.data.latents.cache_latents`."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["DTYPES", "LatentEncoder", "TarShardWriter", "npy_bytes"]

DTYPES = {"float16": np.float16, "float32": np.float32}


class TarShardWriter:
    """Writes ``{prefix}-{n:06d}.tar`` shards of at most ``shard_size`` samples (each shard atomically)."""

    def __init__(self, out_dir: Path, prefix: str, shard_size: int):
        self.out_dir, self.prefix, self.shard_size = out_dir, prefix, shard_size
        self.shards: list[dict[str, Any]] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._count = 0

    def _open(self) -> tarfile.TarFile:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tmp = self.out_dir / (name + ".tmp")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self.shards.append({"file": name, "count": 0})
        self._count = 0
        return self._tar

    def write(self, key: str, members: dict[str, bytes]) -> None:
        tar = self._tar if self._tar is not None else self._open()
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self.shards[-1]["count"] = self._count
        if self._count >= self.shard_size:
            self._finish()

    def _finish(self) -> None:
        if self._tar is not None:
            self._tar.close()
            assert self._tmp is not None
            os.replace(self._tmp, self.out_dir / self.shards[-1]["file"])
            self._tar = None

    def close(self) -> None:
        self._finish()


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


class LatentEncoder:
    """Encodes pending ``(image (3, H, W), caption, original caption)`` items in one codec call and writes one sample
    per item; tracks the count and whether latent/image shapes stayed the same (else ``"mixed"``).

    ``per_bucket``: items are queued per image size (a batch never mixes sizes) and each latent size gets its own
    shard series ``{prefix}-{h}x{w}-{n:06d}.tar`` (``buckets`` lists them with their counts); otherwise one series
    ``{prefix}-{n:06d}.tar`` and the queue is encoded whenever the image size changes.
    """

    def __init__(
        self,
        codec: Any,
        writer: TarShardWriter,
        dtype: str,
        tokenizer: Any,
        max_length: int | None,
        generator: torch.Generator | None,
        per_bucket: bool = False,
    ) -> None:
        self.codec, self.writer, self.dtype = codec, writer, dtype
        self.tokenizer, self.max_length, self.generator = tokenizer, max_length, generator
        self.per_bucket = per_bucket
        self.pending: dict[tuple[int, ...], list[tuple[torch.Tensor, str, str | None]]] = {}
        self.writers: dict[tuple[int, ...], TarShardWriter] = {}
        self.counts: dict[tuple[int, ...], int] = {}
        self.image_sizes: dict[tuple[int, ...], list[int]] = {}
        self.count = 0
        self.latent_shape: Any = None
        self.image_size: Any = None

    def add(self, image: torch.Tensor, caption: Any, original: str | None, batch_size: int) -> None:
        """Queue one image; encode its queue when it holds ``batch_size`` images (or, without buckets, when the image
        size changes)."""
        if not isinstance(caption, str):
            raise ValueError(f"cache_latents: caption must be a str, got {type(caption).__name__}")
        key = tuple(image.shape)
        if not self.per_bucket and self.pending and key not in self.pending:
            self.flush()
        queue = self.pending.setdefault(key, [])
        queue.append((image, caption, original))
        if len(queue) >= batch_size:
            self._encode(key)

    def flush(self) -> None:
        """Encode every queue."""
        for key in list(self.pending):
            self._encode(key)

    def close(self) -> None:
        self.writer.close()
        for writer in self.writers.values():
            writer.close()

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.writer.shards + [s for w in self.writers.values() for s in w.shards]

    def buckets(self) -> list[dict[str, Any]] | None:
        """Per latent size: ``{"latent_shape", "image_size", "count", "shards"}`` (``None`` without buckets)."""
        if not self.per_bucket:
            return None
        return [
            {
                "latent_shape": list(shape),
                "image_size": self.image_sizes[shape],
                "count": self.counts[shape],
                "shards": [s["file"] for s in self.writers[shape].shards],
            }
            for shape in sorted(self.writers)
        ]

    def _writer(self, shape: tuple[int, ...]) -> TarShardWriter:
        if not self.per_bucket:
            return self.writer
        if shape not in self.writers:
            w = self.writer
            self.writers[shape] = TarShardWriter(w.out_dir, f"{w.prefix}-{shape[-2]}x{shape[-1]}", w.shard_size)
        return self.writers[shape]

    def _encode(self, key: tuple[int, ...]) -> None:
        pending = self.pending.pop(key, [])
        if not pending:
            return
        images = torch.stack([p[0] for p in pending])
        latents = self.codec.encode(images, generator=self.generator)
        latents = latents.detach().float().cpu().numpy().astype(DTYPES[self.dtype])
        shape = list(latents.shape[1:])
        self.latent_shape = shape if self.latent_shape in (None, shape) else "mixed"
        size = list(images.shape[-2:])
        self.image_size = size if self.image_size in (None, size) else "mixed"
        writer = self._writer(tuple(shape))
        self.counts[tuple(shape)] = self.counts.get(tuple(shape), 0) + len(pending)
        self.image_sizes[tuple(shape)] = size
        for latent, (_, caption, original) in zip(latents, pending, strict=True):
            writer.write(f"{self.count:09d}", self._members(latent, caption, original))
            self.count += 1

    def _members(self, latent: np.ndarray, caption: str, original: str | None) -> dict[str, bytes]:
        members = {"latent.npy": npy_bytes(np.ascontiguousarray(latent)), "caption.txt": caption.encode("utf-8")}
        if original is not None:
            members["original_caption.txt"] = str(original).encode("utf-8")
        if self.tokenizer is not None:
            ids = self.tokenizer(caption, truncation=self.max_length is not None, max_length=self.max_length)[
                "input_ids"
            ]
            members["input_ids.npy"] = npy_bytes(np.asarray(ids, dtype=np.int32))
        return members
