"""Build the training data set named by a config's ``data`` section."""

from __future__ import annotations

from typing import Any

from fusedit.config import ConfigError
from fusedit.data.bucket_folder import BucketedImageFolder
from fusedit.data.bucket_stream import BucketBatchStream
from fusedit.data.config import DataConfig
from fusedit.data.folder import ImageFolderDataset
from fusedit.data.latents import LatentShardDataset
from fusedit.data.shapes import ShapesWorld
from fusedit.data.webdataset import WebShardDataset
from fusedit.dist.env import current_env


def _data_parallel_split(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``(rank, world_size)``: the given values, else the process group's, else ``(0, 1)``."""
    env = current_env()
    return (env.rank if rank is None else rank), (env.world_size if world_size is None else world_size)


def _folder(config: DataConfig, seed: int, buckets: list[tuple[int, int]] | None) -> ImageFolderDataset:
    assert config.path is not None  # DataConfig.validate requires it
    if buckets is not None:
        return BucketedImageFolder(
            config.path, buckets, center_crop=config.center_crop, interpolation=config.interpolation, seed=seed
        )
    return ImageFolderDataset(
        config.path,
        resolution=config.resolution,
        center_crop=config.center_crop,
        interpolation=config.interpolation,
        seed=seed,
    )


def build_dataset(
    config: DataConfig,
    *,
    seed: int = 0,
    codec: Any = None,
    rank: int | None = None,
    world_size: int | None = None,
    buckets: list[tuple[int, int]] | None = None,
):
    """The training data set for ``config.source``.

    * ``shapes``: the embedded shapes world, map-style (its ``sample_prompts`` are held-out prompts for sample
      grids);
    * ``folder``: :class:`~fusedit.data.folder.ImageFolderDataset` (map-style; random crops seeded by ``seed``);
    * ``webdataset``: :class:`~fusedit.data.webdataset.WebShardDataset`, a resumable shard stream repeating forever;
    * ``latents``: :class:`~fusedit.data.latents.LatentShardDataset` over a cache written by
      ``fusedit cache-latents`` (checked against ``codec`` when given).

    Shard streams are split shard-per-rank: ``rank``/``world_size`` default to the process group's (0 and 1
    without one). ``seed`` drives the shard/sample order and per-sample randomness of streams.

    With ``config.buckets.enabled`` (aspect-ratio buckets, :mod:`fusedit.data.buckets`): a folder becomes a
    :class:`~fusedit.data.bucket_folder.BucketedImageFolder` (each item at the size of ``buckets`` nearest its
    aspect ratio), a shard stream a :class:`~fusedit.data.bucket_stream.BucketBatchStream` of same-size batches
    (a latent cache is bucketed by its stored sizes). ``buckets`` is the checked bucket list
    (:func:`fusedit.data.buckets.check_bucket_sizes`), required for the folder and webdataset sources.
    """
    bucketed = config.buckets.enabled
    if bucketed and buckets is None and config.source in ("folder", "webdataset"):
        raise ConfigError("data.buckets.enabled: build_dataset needs the bucket sizes (check_bucket_sizes)")
    if config.source == "shapes":
        world = ShapesWorld(config.shapes, config.resolution)
        dataset: Any = world.train_dataset()
        held_out = world.held_out_prompts()
        step = max(len(held_out) // 8, 1)
        dataset.sample_prompts = [spec.text for spec in held_out[::step][:8]]
        return dataset
    if config.source == "folder":
        return _folder(config, seed, buckets if bucketed else None)
    if config.source == "webdataset":
        rank, world_size = _data_parallel_split(rank, world_size)
        stream = WebShardDataset.from_config(
            config, seed=seed, rank=rank, world_size=world_size, epochs=None, buckets=buckets if bucketed else None
        )
        return BucketBatchStream(stream) if bucketed else stream
    if config.source == "latents":
        rank, world_size = _data_parallel_split(rank, world_size)
        latents = LatentShardDataset.from_config(
            config, codec=codec, seed=seed, rank=rank, world_size=world_size, epochs=None
        )
        return BucketBatchStream(latents) if bucketed else latents
    raise ConfigError(f"data.source={config.source!r}: expected shapes, folder, webdataset or latents")
