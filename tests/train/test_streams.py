"""The trainer on resumable shard streams, latent caches, and map-style data with set_epoch."""

import json

import pytest
import torch

from fusedit.data.codec import PixelCodec
from fusedit.data.latents import LatentShardDataset, cache_latents
from fusedit.data.webdataset import WebShardDataset
from fusedit.train.config import TrainConfig
from fusedit.train.data_order import ResumableBatchSampler, epoch_permutation
from fusedit.train.logging import read_metrics
from fusedit.train.trainer import Trainer

from .fakes import EpochRecordingDataset, FrozenTextEncoder, TinyVelocityModel, write_image_shards

BASE = dict(
    batch_size=4,
    gradient_accumulation_steps=2,
    lr=1e-2,
    lr_schedule="constant",
    checkpoint_every=3,
    keep_checkpoints=3,
    ema_every=2,
    ema_decay=0.9,
    caption_dropout=0.3,
    log_every=1,
    seed=5,
    mixed_precision="no",
)


def trainer_for(run_dir, dataset, max_steps, codec=None, model_seed=0):
    torch.manual_seed(1000)
    encoder = FrozenTextEncoder()
    torch.manual_seed(model_seed)
    return Trainer(
        TrainConfig(**{**BASE, "max_steps": max_steps}),
        TinyVelocityModel(),
        encoder,
        dataset,
        run_dir=run_dir,
        codec=codec,
        progress=False,
        tensorboard=False,
    )


def shards_stream(root, **kwargs):
    return WebShardDataset(
        str(root / "train-{0000..0003}.tar"), resolution=8, seed=3, shuffle=True, image_key="image.png", **kwargs
    )


def test_shard_stream_interrupted_and_resumed_equals_the_uninterrupted_run(tmp_path):
    write_image_shards(tmp_path / "shards", corrupt=(7,))
    full = trainer_for(tmp_path / "full", shards_stream(tmp_path / "shards"), 7).fit()
    first = trainer_for(tmp_path / "run", shards_stream(tmp_path / "shards"), 3).fit()
    state = json.loads((first.last_checkpoint / "trainer_state.json").read_text())
    assert state["data"]["kind"] == "stream" and state["data"]["samples_seen"] == 12
    assert state["data"]["stream"]["format"] == "fusedit-shard-stream"
    # a fresh data set object and a different initialisation: everything comes from the checkpoint
    resumed = trainer_for(tmp_path / "run", shards_stream(tmp_path / "shards"), 7, model_seed=9).fit()
    assert resumed.start_step == 3 and sorted(resumed.losses) == [4, 5, 6, 7]
    for step in (4, 5, 6, 7):  # 28 samples: past the first epoch of 19 readable samples
        assert resumed.losses[step] == full.losses[step]
    # the corrupt sample was skipped and counted in the metrics
    assert read_metrics(tmp_path / "full")[-1]["data_skipped"] == 1
    assert "epoch" not in read_metrics(tmp_path / "full")[-1]


def test_stream_state_must_match(tmp_path):
    write_image_shards(tmp_path / "shards")
    trainer_for(tmp_path / "run", shards_stream(tmp_path / "shards"), 3).fit()
    other = WebShardDataset(
        str(tmp_path / "shards" / "train-{0000..0003}.tar"), resolution=8, seed=4, shuffle=True, image_key="image.png"
    )
    with pytest.raises(Exception, match="data-stream position"):
        trainer_for(tmp_path / "run", other, 6).fit()


class ExplodingCodec(PixelCodec):
    def encode(self, images, generator=None):
        raise AssertionError("latent batches must not be encoded again")


def test_latent_cache_batches_skip_the_codec(tmp_path):
    write_image_shards(tmp_path / "shards", n_shards=2)
    source = WebShardDataset(str(tmp_path / "shards"), resolution=8, epochs=1, image_key="image.png")
    cache_latents(source, PixelCodec(), tmp_path / "cache", shard_size=4, dtype="float32")
    data = LatentShardDataset(tmp_path / "cache", codec=PixelCodec(), seed=1, shuffle=True)
    summary = trainer_for(tmp_path / "run", data, 4, codec=ExplodingCodec()).fit()
    assert sorted(summary.losses) == [1, 2, 3, 4]


def test_endless_stream_required(tmp_path):
    write_image_shards(tmp_path / "shards", n_shards=1, per_shard=3)
    finite = WebShardDataset(str(tmp_path / "shards"), resolution=8, epochs=1, image_key="image.png")
    with pytest.raises(RuntimeError, match="ended before train.max_steps"):
        trainer_for(tmp_path / "run", finite, 4).fit()


def test_untracked_iterable_is_refused(tmp_path):
    class Plain(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield {"image": torch.zeros(3, 8, 8), "caption": "x"}

    with pytest.raises(TypeError, match="resumable stream"):
        trainer_for(tmp_path, Plain(), 2)


def test_set_epoch_is_called_with_each_items_epoch(tmp_path):
    data = EpochRecordingDataset(n=5)
    trainer_for(tmp_path, data, 3).fit()  # 12 samples over epochs 0, 1, 2
    order = [(e, i.item()) for e in range(3) for i in epoch_permutation(5, 5, e)][:12]
    assert data.seen == order


def test_rank_slices_of_the_sampler_tile_the_global_stream():
    single = iter(ResumableBatchSampler(5, 4, seed=1, start=3))
    ranks = [
        iter(ResumableBatchSampler(5, 4, seed=1, start=3, rank=r, world_size=2, with_epoch=True)) for r in range(2)
    ]
    for _ in range(4):
        expected = next(single)
        pairs = next(ranks[0]) + next(ranks[1])
        assert [i for _, i in pairs] == expected
    with pytest.raises(ValueError, match="split"):
        ResumableBatchSampler(5, 3, seed=1, world_size=2)
