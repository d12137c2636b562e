"""Precomputed VAE latents: write them once (:func:`cache_latents`), train from them (:class:`LatentShardDataset`).

Cache layout (``out_dir``)::

    manifest.json               codec (name, class, channels, spatial_factor, scaling/shift factors, sample mode),
                                latent dtype and shape, image size, count, shards (file, count), tokenizer
    latents-000000.tar          uncompressed tar shards in the webdataset layout, ``shard_size`` samples each:
      000000000.latent.npy        normalised latent ``(C, h, w)`` — ``codec.encode`` output — as float16/float32
      000000000.caption.txt       UTF-8 caption
      000000000.original_caption.txt   (when the source items have ``"original_caption"``)
      000000000.input_ids.npy     (with a tokenizer) int32 token ids, unpadded, truncated to ``max_length``
    latents-32x48-000000.tar    (``per_bucket=True``, aspect-ratio buckets) one shard series per latent size ``h×w``,
                                listed in the manifest's ``buckets``

Stored latents are *normalised* (``(z - shift_factor)·scaling_factor``); the manifest's codec entry says how to
decode them. With ``sample_mode="mean"`` (the default codec mode) the cache is deterministic; with ``"sample"`` it
freezes one posterior draw per image.

:class:`LatentShardDataset` reads the shards with the same resumable, shard-per-rank machinery as
:class:`fusedit.data.webdataset.WebShardDataset` and yields ``{"image": float32 (C, h, w), "caption": str,
"is_latent": True, "stream_pos": ...}`` (``"input_ids"`` too when asked for; they vary in length, so the
trainer then needs its own collate).
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusedit.data.latent_writer import DTYPES, LatentEncoder, TarShardWriter
from fusedit.data.shards import (
    CorruptSampleError,
    ShardStream,
    TarRecord,
    checked_original_caption_rate,
    takes_original_caption,
)
from fusedit.data.transforms import CorruptImageError

__all__ = ["LatentShardDataset", "MANIFEST", "cache_latents", "read_manifest"]

logger = logging.getLogger("fusedit.data")

MANIFEST = "manifest.json"
_FORMAT = "fusedit-latents"
_DTYPES = DTYPES


# --------------------------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------------------------


def _items(data, bad: list[str]) -> Iterable[dict]:
    """Iterate a map-style data set by index (items that raise a corrupt-image error are skipped and recorded in
    ``bad``), anything else as an iterable."""
    if getattr(data, "epochs", 1) is None:
        raise ValueError("cache_latents: the data set repeats forever (epochs=None); build it with epochs=1")
    is_map = (
        hasattr(data, "__getitem__")
        and hasattr(data, "__len__")
        and not isinstance(data, torch.utils.data.IterableDataset)
        and not isinstance(data, (list, tuple))
    )
    if not is_map:
        yield from data
        return
    for index in range(len(data)):
        try:
            item = data[index]
        except (CorruptImageError, FileNotFoundError) as exc:
            bad.append(f"{index}: {exc}")
            logger.warning("cache_latents: skipping item %d: %s", index, exc)
            continue
        yield item


def _unbatch(item: dict) -> Iterable[tuple[torch.Tensor, str, str | None]]:
    if not isinstance(item, dict) or "image" not in item or "caption" not in item:
        raise ValueError(
            f"cache_latents: items must be dicts with 'image' and 'caption', got "
            f"{sorted(item) if isinstance(item, dict) else type(item).__name__}"
        )
    image, caption, original = item["image"], item["caption"], item.get("original_caption")
    if image.dim() == 3:
        yield image, caption, original
    elif image.dim() == 4:  # a collated batch (e.g. from a DataLoader)
        originals = original if original is not None else [None] * image.shape[0]
        for i in range(image.shape[0]):
            yield image[i], caption[i], originals[i]
    else:
        raise ValueError(f"cache_latents: 'image' must be (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}")


def cache_latents(
    data,
    codec,
    out_dir: str | os.PathLike,
    shard_size: int = 1000,
    *,
    batch_size: int = 16,
    tokenizer=None,
    max_length: int | None = None,
    dtype: str = "float16",
    prefix: str = "latents",
    generator: torch.Generator | None = None,
    overwrite: bool = False,
    per_bucket: bool = False,
) -> dict[str, Any]:
    """Encode every image of ``data`` with ``codec`` and write latent shards + ``manifest.json`` into ``out_dir``.

    Args:
        data: a map-style data set (read by index, in order), a finite iterable/``IterableDataset`` (e.g. a
            :class:`~fusedit.data.webdataset.WebShardDataset` with ``epochs=1``) or a DataLoader; items are
            ``{"image": (3, H, W) or (B, 3, H, W) in [-1, 1], "caption": str or list}``. Items of a map-style
            set that raise ``CorruptImageError``/``FileNotFoundError`` (e.g. ``ImageFolderDataset(...,
            on_bad="raise")``) are skipped and counted in the manifest's ``skipped``/``bad_items``; the data
            set's own counter (corrupt samples a stream skipped, or files a folder substituted) goes to
            ``source_skipped``.
        codec: a :class:`~fusedit.data.codec.VAECodec` (or ``PixelCodec``); its ``encode`` output is stored.
        out_dir: output folder (created; must not hold a cache already unless ``overwrite``).
        shard_size: samples per shard.
        batch_size: images per ``codec.encode`` call (consecutive images of the same size are batched).
        tokenizer, max_length: optionally store the caption's token ids (unpadded, truncated to ``max_length``).
        dtype: ``float16`` (default, half the disk) or ``float32`` storage of the latents.
        generator: drives ``codec.encode`` when the codec samples the posterior.
        overwrite: replace an existing cache in ``out_dir``.
        per_bucket: one shard series per latent size (aspect-ratio buckets), listed in the manifest's ``buckets``.

    Returns:
        the manifest (also written to ``out_dir/manifest.json``).
    """
    _check_args(shard_size, batch_size, dtype)
    out = _empty_cache_dir(Path(out_dir), prefix, overwrite)
    writer = TarShardWriter(out, prefix, shard_size)
    encoder = LatentEncoder(codec, writer, dtype, tokenizer, max_length, generator, per_bucket=per_bucket)
    started = time.time()
    bad: list[str] = []
    try:
        for item in _items(data, bad):
            for image, caption, original in _unbatch(item):
                encoder.add(image, caption, original, batch_size)
        encoder.flush()
    finally:
        encoder.close()
    if encoder.count == 0:
        raise ValueError("cache_latents: the data set yielded no images")
    manifest = _manifest(codec, dtype, encoder, writer, bad, data, tokenizer, max_length, time.time() - started)
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / MANIFEST)
    return manifest


def _check_args(shard_size: int, batch_size: int, dtype: str) -> None:
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"cache_latents: shard_size ({shard_size}) and batch_size ({batch_size}) must be >= 1")
    if dtype not in _DTYPES:
        raise ValueError(f"cache_latents: dtype got {dtype!r}, expected one of {sorted(_DTYPES)}")


def _manifest(
    codec: Any,
    dtype: str,
    encoder: LatentEncoder,
    writer: TarShardWriter,
    bad: list[str],
    data: Any,
    tokenizer: Any,
    max_length: int | None,
    seconds: float,
) -> dict[str, Any]:
    """The cache's ``manifest.json``: the codec and its normalisation, shapes, counts, shards, tokenizer."""
    describe = codec.describe()
    return {
        "format": _FORMAT,
        "version": 1,
        "codec": describe,
        "channels": codec.channels,
        "spatial_factor": codec.spatial_factor,
        "normalization": {
            "scaling_factor": describe.get("scaling_factor", 1.0),
            "shift_factor": describe.get("shift_factor", 0.0),
            "formula": "(z - shift_factor) * scaling_factor",
        },
        "dtype": dtype,
        "latent_shape": encoder.latent_shape,
        "image_size": encoder.image_size,
        "count": encoder.count,
        "skipped": len(bad),
        "bad_items": bad[:100],
        "source_skipped": int(getattr(data, "skipped", 0) or 0),
        "shards": encoder.shards,
        "buckets": encoder.buckets(),
        "tokenizer": None
        if tokenizer is None
        else {"name": getattr(tokenizer, "name_or_path", type(tokenizer).__name__), "max_length": max_length},
        "seconds": round(seconds, 3),
    }


def _empty_cache_dir(out: Path, prefix: str, overwrite: bool) -> Path:
    """``out``, created; an existing cache in it is an error unless ``overwrite`` (then it is removed)."""
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob(f"{prefix}-*.tar")) + ([out / MANIFEST] if (out / MANIFEST).exists() else [])
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds a latent cache ({existing[0].name}...); pass overwrite=True")
    for path in existing:
        path.unlink()
    return out


# --------------------------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------------------------


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Read a cache's ``manifest.json`` (``path`` is the cache folder or the file).

    Raises:
        FileNotFoundError: no manifest there.
        ValueError: not a fusedit latent manifest.
    """
    path = Path(path)
    file = path / MANIFEST if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no latent-cache manifest at {file} (write one with cache_latents)")
    manifest = json.loads(file.read_text())
    if manifest.get("format") != _FORMAT:
        raise ValueError(f"{file} is not a fusedit latent-cache manifest (format={manifest.get('format')!r})")
    return manifest


def _check_codec(manifest: dict, codec, where: str) -> None:
    norm = manifest["normalization"]
    mine = {
        "channels": codec.channels,
        "spatial_factor": codec.spatial_factor,
        "scaling_factor": codec.describe().get("scaling_factor", 1.0),
        "shift_factor": codec.describe().get("shift_factor", 0.0),
    }
    theirs = {
        "channels": manifest["channels"],
        "spatial_factor": manifest["spatial_factor"],
        "scaling_factor": norm["scaling_factor"],
        "shift_factor": norm["shift_factor"],
    }
    diff = [k for k in mine if not np.isclose(float(mine[k]), float(theirs[k]))]
    if diff:
        raise ValueError(
            f"latent cache {where} was written with a different codec: "
            + ", ".join(f"{k} {theirs[k]} (cache) vs {mine[k]} (codec)" for k in diff)
        )


class LatentShardDataset(ShardStream):
    """Latent shards written by :func:`cache_latents` → ``{"image": float32 (C, h, w), "caption": str,
    "is_latent": True, "stream_pos": int64 (6,)}``.

    Args:
        path: the cache folder (its manifest lists the shards) or a shard spec (a manifest next to the shards is
            read when present).
        codec: if given, must match the manifest's channels, spatial factor and normalisation.
        original_caption_rate: probability of using the stored original caption (when there is one).
        return_token_ids: add ``"input_ids"`` (int64, variable length) when the cache has them.
        seed, rank, world_size, shuffle, epochs: see :class:`~fusedit.data.shards.ShardStream`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        codec=None,
        original_caption_rate: float = 0.0,
        return_token_ids: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle: bool = False,
        epochs: int | None = None,
        remote_retries: int = 3,
    ):
        root = Path(path)
        shards: str | os.PathLike | list[str]
        self.manifest: dict[str, Any] | None
        if root.is_dir() and (root / MANIFEST).is_file():
            self.manifest = read_manifest(root)
            shards = [str(root / s["file"]) for s in self.manifest["shards"]]
        else:
            shards = path
            candidate = Path(str(path)).parent / MANIFEST
            self.manifest = read_manifest(candidate) if candidate.is_file() else None
        super().__init__(
            shards,
            seed=seed,
            rank=rank,
            world_size=world_size,
            shuffle=shuffle,
            epochs=epochs,
            remote_retries=remote_retries,
        )
        if codec is not None:
            if self.manifest is None:
                raise ValueError(f"cannot check the codec of {path}: no {MANIFEST} next to the shards")
            _check_codec(self.manifest, codec, str(path))
        self.channels = None if self.manifest is None else int(self.manifest["channels"])
        self.original_caption_rate = checked_original_caption_rate(original_caption_rate)
        self.return_token_ids = return_token_ids

    @classmethod
    def from_config(
        cls,
        cfg,
        *,
        codec=None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        epochs: int | None = None,
    ) -> LatentShardDataset:
        """Build from a :class:`fusedit.data.config.DataConfig` (``source: latents``)."""
        return cls(
            cfg.path,
            codec=codec,
            original_caption_rate=cfg.original_caption_rate,
            seed=seed,
            rank=rank,
            world_size=world_size,
            shuffle=getattr(cfg, "shuffle", False),
            epochs=epochs,
            remote_retries=getattr(cfg, "remote_retries", 3),
        )

    def decode(self, record: TarRecord, read, generator: torch.Generator) -> dict[str, Any]:
        try:
            latent = np.load(io.BytesIO(read("latent.npy")), allow_pickle=False)
        except (ValueError, EOFError) as exc:
            raise CorruptSampleError(f"unreadable latent.npy ({exc})") from None
        if latent.ndim != 3 or (self.channels is not None and latent.shape[0] != self.channels):
            raise CorruptSampleError(f"latent of shape {latent.shape}, expected ({self.channels}, h, w)")
        caption = read("caption.txt").decode("utf-8")
        use_original = takes_original_caption(generator, self.original_caption_rate)
        if use_original and record.has("original_caption.txt"):
            caption = read("original_caption.txt").decode("utf-8") or caption
        sample = {"image": torch.from_numpy(latent.astype(np.float32)), "caption": caption, "is_latent": True}
        if self.return_token_ids and record.has("input_ids.npy"):
            sample["input_ids"] = torch.from_numpy(np.load(io.BytesIO(read("input_ids.npy"))).astype(np.int64))
        return sample
