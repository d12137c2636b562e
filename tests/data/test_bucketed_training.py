"""The trainer on bucketed data: stopped mid-epoch and resumed, it takes the same batches and ends at the same
weights as the uninterrupted run (a bucketed folder, a bucketed shard stream, a per-bucket latent cache)."""

import json

import pytest
import torch

from fusedit.data.bucket_folder import BucketedImageFolder
from fusedit.data.bucket_stream import BucketBatchStream
from fusedit.data.codec import PixelCodec
from fusedit.data.latents import LatentShardDataset, cache_latents, read_manifest
from fusedit.data.webdataset import WebShardDataset
from fusedit.train.config import TrainConfig
from fusedit.train.logging import read_metrics
from fusedit.train.trainer import Trainer
from tests.train.fakes import FrozenTextEncoder, TinyVelocityModel

from .bucket_data import BUCKETS, write_folder, write_shards

BASE = dict(
    batch_size=4,  # micro-batches of 2
    gradient_accumulation_steps=2,
    lr=1e-2,
    lr_schedule="constant",
    checkpoint_every=3,
    keep_checkpoints=3,
    caption_dropout=0.3,
    log_every=1,
    seed=5,
    mixed_precision="no",
)


class ShapeRecorder(TinyVelocityModel):
    """Records the spatial size of every batch it sees."""

    def __init__(self):
        super().__init__(dropout=0.0)
        self.shapes = []

    def forward(self, x, timestep, context):
        self.shapes.append(tuple(x.shape[-2:]))
        return super().forward(x, timestep, context)


def fit(run_dir, dataset, max_steps, model_seed=0):
    torch.manual_seed(1000)
    encoder = FrozenTextEncoder()
    torch.manual_seed(model_seed)
    model = ShapeRecorder()
    trainer = Trainer(
        TrainConfig(**{**BASE, "max_steps": max_steps}),
        model,
        encoder,
        dataset,
        run_dir=run_dir,
        progress=False,
        tensorboard=False,
    )
    return trainer.fit(), model


def assert_resumes_exactly(tmp_path, make_data, steps=7, stop=3):
    full, full_model = fit(tmp_path / "full", make_data(), steps)
    assert set(full_model.shapes) == set(BUCKETS)  # every bucket trained
    first, _ = fit(tmp_path / "run", make_data(), stop)
    state = json.loads((first.last_checkpoint / "trainer_state.json").read_text())
    resumed, resumed_model = fit(tmp_path / "run", make_data(), steps, model_seed=9)
    assert resumed.start_step == stop and sorted(resumed.losses) == list(range(stop + 1, steps + 1))
    for step in resumed.losses:
        assert resumed.losses[step] == full.losses[step]
    # the same batches (shapes included) and the same final weights
    assert resumed_model.shapes == full_model.shapes[-len(resumed_model.shapes) :]
    for (name, a), (_, b) in zip(full_model.state_dict().items(), resumed_model.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    return state


def test_bucketed_folder_resumes_exactly_mid_epoch(tmp_path):
    root = write_folder(tmp_path / "images", n=13, corrupt=(4,))
    state = assert_resumes_exactly(
        tmp_path, lambda: BucketedImageFolder(root, BUCKETS, center_crop=False, seed=3), steps=7, stop=2
    )
    # stopped at 8 samples of an epoch of 12 readable images (plus fills): mid-epoch; 28 samples in all: 2+ epochs
    assert state["data"]["bucket_batch"] == 2 and state["data"]["samples_seen"] == 8
    assert read_metrics(tmp_path / "full")[-1]["data_skipped"] == 1


def test_bucketed_shard_stream_resumes_exactly_mid_epoch(tmp_path):
    spec = write_shards(tmp_path / "shards", corrupt=(9,))

    def data():
        inner = WebShardDataset(
            spec, resolution=8, image_key="image.png", caption_key="txt", seed=3, shuffle=True, buckets=BUCKETS
        )
        return BucketBatchStream(inner)

    state = assert_resumes_exactly(tmp_path, data, steps=9, stop=4)  # 36 samples: past the first epoch of 23
    assert any(state["data"]["stream"]["buckets"]["pending"].values())  # stopped with samples in the buffers
    assert state["data"]["stream"]["buckets"]["format"] == "fusedit-bucket-stream"
    assert read_metrics(tmp_path / "full")[-1]["data_skipped"] == 1


def test_per_bucket_latent_cache_trains_per_bucket_and_resumes(tmp_path):
    spec = write_shards(tmp_path / "shards", n_shards=2)
    source = WebShardDataset(spec, resolution=8, image_key="image.png", caption_key="txt", epochs=1, buckets=BUCKETS)
    manifest = cache_latents(source, PixelCodec(), tmp_path / "cache", shard_size=3, dtype="float32", per_bucket=True)
    assert {tuple(b["image_size"]) for b in manifest["buckets"]} == set(BUCKETS)
    assert sum(b["count"] for b in manifest["buckets"]) == manifest["count"] == 12
    for bucket in manifest["buckets"]:
        h, w = bucket["image_size"]
        assert all(f.startswith(f"latents-{h}x{w}-") for f in bucket["shards"])
    assert read_manifest(tmp_path / "cache")["buckets"] == manifest["buckets"]

    def data():
        return BucketBatchStream(LatentShardDataset(tmp_path / "cache", codec=PixelCodec(), seed=1, shuffle=True))

    assert_resumes_exactly(tmp_path, data, steps=7, stop=3)


def test_bucket_mode_must_match_on_resume(tmp_path):
    root = write_folder(tmp_path / "images", n=8)
    fit(tmp_path / "run", BucketedImageFolder(root, BUCKETS), 3)
    from fusedit.data.folder import ImageFolderDataset

    with pytest.raises(Exception, match="saved with aspect-ratio buckets"):
        fit(tmp_path / "run", ImageFolderDataset(root, resolution=8), 6)
