"""build_dataset with aspect-ratio buckets: the folder, webdataset and latents sources, from a config."""

import pytest

from fusedit.config import ConfigError
from fusedit.data.bucket_folder import BucketedImageFolder
from fusedit.data.bucket_stream import BucketBatchStream
from fusedit.data.buckets import training_buckets
from fusedit.data.codec import PixelCodec
from fusedit.data.config import DataConfig
from fusedit.data.factory import build_dataset
from fusedit.data.latents import LatentShardDataset, cache_latents
from fusedit.data.webdataset import WebShardDataset
from fusedit.experiment import load_experiment

from .bucket_data import BUCKETS, write_folder, write_shards


def test_bucketed_sources(tmp_path):
    folder = write_folder(tmp_path / "images", n=7)
    config = DataConfig(source="folder", path=str(folder))
    config.buckets.enabled = True
    data = build_dataset(config, buckets=BUCKETS)
    assert isinstance(data, BucketedImageFolder) and data.buckets == BUCKETS
    with pytest.raises(ConfigError, match="needs the bucket sizes"):
        build_dataset(config)

    spec = write_shards(tmp_path / "shards", n_shards=2)
    config = DataConfig(source="webdataset", path=spec, image_key="image.png", caption_key="txt", remote_retries=5)
    config.buckets.enabled = True
    stream = build_dataset(config, buckets=BUCKETS, rank=1, world_size=2)
    assert isinstance(stream, BucketBatchStream) and isinstance(stream.stream, WebShardDataset)
    assert (stream.rank, stream.world_size, stream.stream.remote_retries) == (1, 2, 5)

    source = WebShardDataset(spec, resolution=8, image_key="image.png", caption_key="txt", epochs=1, buckets=BUCKETS)
    cache_latents(source, PixelCodec(), tmp_path / "cache", dtype="float32", per_bucket=True)
    config = DataConfig(source="latents", path=str(tmp_path / "cache"))
    config.buckets.enabled = True
    latents = build_dataset(config, codec=PixelCodec())
    assert isinstance(latents, BucketBatchStream) and isinstance(latents.stream, LatentShardDataset)


def test_a_bucketed_config_builds_the_checked_buckets(tmp_path):
    folder = write_folder(tmp_path / "images", n=7)
    config = load_experiment(
        None,
        [
            "data.source=folder",
            f"data.path={folder}",
            "data.resolution=16",
            "data.buckets.enabled=true",
            "data.buckets.count=3",
            "model.patch_size=4",
            "model.in_channels=3",
        ],
    )
    buckets = training_buckets(config, PixelCodec())
    assert buckets == [(20, 12), (16, 16), (12, 20)]  # within 16² pixels, sides multiples of 4
    data = build_dataset(config.data, buckets=buckets)
    assert {tuple(item["image"].shape[-2:]) for item in (data[i] for i in range(7))} <= set(buckets)
