"""Batches within one bucket: the map-style sampler and the stream batcher, sharding over ranks, exact resume."""

import itertools

import pytest
import torch
from torch.utils.data import DataLoader

from fusedit.data.bucket_stream import BucketBatchStream
from fusedit.data.webdataset import WebShardDataset
from fusedit.train.data_order import BucketBatchSampler, bucket_epoch_batches, collate_batch_item

from .bucket_data import BUCKETS, write_shards

ITEM_BUCKETS = [0, 1, 2, 0, 0, -1, 1, 2, 2, 2, 0, 1, 0, 2, 1, 0, 0]


def test_epoch_batches_stay_in_one_bucket_and_cover_every_item():
    for epoch in range(3):
        batches = bucket_epoch_batches(ITEM_BUCKETS, 4, seed=7, epoch=epoch)
        for batch in batches:
            assert len(batch) == 4 and len({ITEM_BUCKETS[i] for i in batch}) == 1
        seen = [i for batch in batches for i in batch]
        readable = {i for i, b in enumerate(ITEM_BUCKETS) if b >= 0}
        assert set(seen) == readable  # every readable item, item 5 (bucket -1) never
        # only the last, completed batch of a bucket repeats items
        assert len(seen) - len(readable) == sum(-ITEM_BUCKETS.count(b) % 4 for b in (0, 1, 2))
    assert bucket_epoch_batches(ITEM_BUCKETS, 4, 7, 0) != bucket_epoch_batches(ITEM_BUCKETS, 4, 7, 1)


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_rank_slices_are_disjoint_and_tile_the_global_batches():
    full = take(BucketBatchSampler(ITEM_BUCKETS, 4, 3, with_epoch=True), 12)
    ranks = [take(BucketBatchSampler(ITEM_BUCKETS, 4, 3, rank=r, world_size=2, with_epoch=True), 12) for r in (0, 1)]
    for step in range(12):
        a, b = ranks[0][step], ranks[1][step]
        assert a + b == full[step] and len(a) == len(b) == 2
        assert len({ITEM_BUCKETS[i] for _, i in a + b}) == 1  # both ranks in the same bucket: same shapes
    epoch0 = [i for step in full for e, i in step if e == 0]
    assert set(epoch0) == {i for i, b in enumerate(ITEM_BUCKETS) if b >= 0}


def test_sampler_resumes_after_any_number_of_batches():
    full = take(BucketBatchSampler(ITEM_BUCKETS, 4, 3, with_epoch=True), 20)  # past two epochs of 6-7 batches
    for start in (0, 1, 5, 6, 7, 13):
        assert take(BucketBatchSampler(ITEM_BUCKETS, 4, 3, start, with_epoch=True), 20 - start) == full[start:]


def bucket_stream(spec, batch_size=2, **kwargs):
    inner = WebShardDataset(spec, resolution=8, image_key="image.png", caption_key="txt", buckets=BUCKETS, **kwargs)
    return BucketBatchStream(inner, batch_size)


def test_stream_batches_stay_in_one_bucket_and_each_rank_reads_its_own_shards(tmp_path):
    spec = write_shards(tmp_path / "shards", corrupt=(9,))
    everything = []
    for rank in (0, 1):
        batches = list(bucket_stream(spec, 3, seed=2, shuffle=True, rank=rank, world_size=2, epochs=1))
        captions = []
        for batch in batches:
            assert batch["image"].shape[0] == len(batch["caption"]) <= 3
            assert tuple(batch["image"].shape[-2:]) in BUCKETS
        full = [b for b in batches if len(b["caption"]) == 3]
        assert len(full) >= len(batches) - len(BUCKETS)  # only the end of a finite stream has partial batches
        captions = [c for b in batches for c in b["caption"]]
        assert len(captions) == len(set(captions))
        everything.append(set(captions))
    assert not everything[0] & everything[1]
    assert len(everything[0] | everything[1]) == 23  # 24 samples, one corrupt


def consume(stream, n, num_workers=0):
    """The first ``n`` batches through a DataLoader, each marked consumed."""
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers, collate_fn=collate_batch_item)
    out = []
    for batch in itertools.islice(loader, n):
        stream.mark_consumed({"stream_pos": batch.stream_pos, "pending": batch.pending})
        out.append((batch.captions, batch.images))
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stream_resumes_exactly_mid_epoch_with_its_buffers(tmp_path, num_workers):
    spec = write_shards(tmp_path / "shards", corrupt=(9,))
    full = consume(bucket_stream(spec, seed=2, shuffle=True), 20, num_workers)  # 23 samples an epoch: > 1.5 epochs
    first = bucket_stream(spec, seed=2, shuffle=True)
    head = consume(first, 6, num_workers)  # the loader takes from its workers in turn: stop at a multiple
    state = first.state_dict()
    assert any(state["buckets"]["pending"].values())  # samples were waiting in partial buckets
    resumed = bucket_stream(spec, seed=2, shuffle=True)
    resumed.load_state_dict(state)
    rest = consume(resumed, 14, num_workers)
    assert [c for c, _ in head + rest] == [c for c, _ in full]
    for (_, a), (_, b) in zip(head + rest, full, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_stream_state_checks_the_batch_size(tmp_path):
    spec = write_shards(tmp_path / "shards")
    first = bucket_stream(spec, seed=2)
    consume(first, 3)
    other = bucket_stream(spec, 4, seed=2)
    with pytest.raises(ValueError, match="saved with 2 samples per batch"):
        other.load_state_dict(first.state_dict())
    plain = WebShardDataset(spec, resolution=8, image_key="image.png", caption_key="txt")
    with pytest.raises(ValueError, match="not a bucketed stream state"):
        bucket_stream(spec).load_state_dict(plain.state_dict())
