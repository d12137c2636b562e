import io
import itertools
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import fusedit.data.webdataset as wdmod
from fusedit.data.errors import NoUsableDataError
from fusedit.data.webdataset import STREAM_POS_KEY, WebShardDataset, expand_shards, index_tar


def jpeg(seed, size=(24, 20)):
    array = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG")
    return buf.getvalue()


def write_shard(path, samples):
    """samples: list of (key, {ext: bytes})."""
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def make_shards(root, n_shards=3, per_shard=4, corrupt=True):
    """Shards of ``per_shard`` samples; shard 1 sample 1 has bad image bytes, shard 2 sample 2 has no caption."""
    root.mkdir(parents=True, exist_ok=True)
    good = []
    for s in range(n_shards):
        samples = []
        for i in range(per_shard):
            key = f"s{s}i{i}"
            members = {
                "image.jpg": jpeg(s * 100 + i),
                "synthetic_caption.txt": f"syn {key}".encode(),
                "original_caption.txt": f"orig {key}".encode(),
            }
            if corrupt and (s, i) == (1, 1):
                members["image.jpg"] = b"\xff\xd8 this is not a jpeg"
            elif corrupt and (s, i) == (2, 2):
                del members["synthetic_caption.txt"]
            else:
                good.append(f"syn {key}")
            samples.append((key, members))
        write_shard(root / f"train-{s:04d}.tar", samples)
    return str(root / f"train-{{0000..{n_shards - 1:04d}}}.tar"), good


def captions(stream):
    return [s["caption"] for s in stream]


def test_order_and_skip_counts(tmp_path):
    spec, good = make_shards(tmp_path)
    ds = WebShardDataset(spec, resolution=8, epochs=1)
    samples = list(ds)
    assert captions(samples) == good
    assert samples[0]["image"].shape == (3, 8, 8) and samples[0]["image"].dtype == torch.float32
    assert samples[0]["image"].min() >= -1 and samples[0]["image"].max() <= 1
    assert ds.skipped == 2
    assert any("s1i1" in b and "decode" in b for b in ds.bad_samples)
    assert any("s2i2" in b and "synthetic_caption.txt" in b for b in ds.bad_samples)
    assert samples[-1][STREAM_POS_KEY].tolist() == [0, 1, 0, 2, 4, 2]


def test_index_reads_headers(tmp_path):
    make_shards(tmp_path, n_shards=1)
    records = index_tar(str(tmp_path / "train-0000.tar"))
    assert [r.key for r in records] == ["s0i0", "s0i1", "s0i2", "s0i3"]
    assert set(records[0].members) == {"image.jpg", "synthetic_caption.txt", "original_caption.txt"}


def test_shard_per_rank_covers_everything_once(tmp_path):
    spec, good = make_shards(tmp_path, n_shards=5)
    per_rank = [captions(WebShardDataset(spec, 8, rank=r, world_size=2, epochs=1)) for r in range(2)]
    assert sorted(per_rank[0] + per_rank[1]) == sorted(good)
    assert {c.split()[1][:2] for c in per_rank[0]} == {"s0", "s2", "s4"}
    assert {c.split()[1][:2] for c in per_rank[1]} == {"s1", "s3"}
    # shuffled shard order: still a partition
    shuffled = [
        captions(WebShardDataset(spec, 8, rank=r, world_size=2, epochs=1, shuffle=True, seed=7)) for r in range(2)
    ]
    assert sorted(shuffled[0] + shuffled[1]) == sorted(good)
    assert shuffled[0] + shuffled[1] != per_rank[0] + per_rank[1]


@pytest.mark.parametrize("shuffle", [False, True])
def test_resume_mid_shard_yields_exactly_the_rest(tmp_path, shuffle):
    spec, _ = make_shards(tmp_path)
    kwargs = dict(resolution=8, center_crop=False, original_caption_rate=0.5, seed=3, shuffle=shuffle, epochs=2)
    full = list(WebShardDataset(spec, **kwargs))
    first = WebShardDataset(spec, **kwargs)
    head = list(itertools.islice(iter(first), 5))  # stops in the middle of a shard
    state = first.state_dict()
    assert state["workers"]["0"]["offset"] not in (0, 4)

    resumed = WebShardDataset(spec, **kwargs)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert captions(head + rest) == captions(full)
    for a, b in zip(head + rest, full, strict=False):
        assert torch.equal(a["image"], b["image"])  # same random crops after resuming
    assert resumed.skipped == 2 * 2  # 2 corrupt samples per epoch, none counted twice


def test_resume_does_not_decode_skipped_images(tmp_path, monkeypatch):
    spec, good = make_shards(tmp_path)
    ds = WebShardDataset(spec, 8, epochs=1)
    state = ds.state_dict()
    state["workers"] = {"0": {"epoch": 0, "cursor": 2, "offset": 3, "skipped": 1}}
    state["num_workers"] = 1
    calls = []
    real = wdmod.decode_image
    monkeypatch.setattr(wdmod, "decode_image", lambda data, name="": calls.append(name) or real(data, name))
    ds.load_state_dict(state)
    assert captions(ds) == ["syn s2i3"]
    assert calls == ["s2i3.image.jpg"]


def test_resume_with_dataloader_workers(tmp_path):
    spec, good = make_shards(tmp_path, n_shards=4)

    def loader(ds):
        return torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)

    full = [c for b in loader(WebShardDataset(spec, 8, epochs=1)) for c in b["caption"]]
    assert sorted(full) == sorted(good)

    ds = WebShardDataset(spec, 8, epochs=1)
    it = iter(loader(ds))
    head = []
    for _ in range(2):
        batch = next(it)
        assert batch[STREAM_POS_KEY].shape == (2, 6)
        ds.mark_consumed(batch)
        head += batch["caption"]
    del it
    state = ds.state_dict()
    assert state["num_workers"] == 2 and set(state["workers"]) == {"0", "1"}

    resumed = WebShardDataset(spec, 8, epochs=1)
    resumed.load_state_dict(state)
    rest = [c for b in loader(resumed) for c in b["caption"]]
    assert head + rest == full

    wrong = WebShardDataset(spec, 8, epochs=1)
    wrong.load_state_dict(state)
    with pytest.raises(ValueError, match="worker"):
        list(wrong)  # resumed without workers


def test_state_mismatch_errors(tmp_path):
    spec, _ = make_shards(tmp_path, n_shards=4)
    state = WebShardDataset(spec, 8, rank=0, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size"):
        WebShardDataset(spec, 8, rank=0, world_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        WebShardDataset(spec, 8, rank=0, world_size=2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="format"):
        WebShardDataset(spec, 8).load_state_dict({"epoch": 3})


def test_original_caption_rate(tmp_path):
    spec, good = make_shards(tmp_path, corrupt=False)
    always = captions(WebShardDataset(spec, 8, original_caption_rate=1.0, epochs=1))
    assert always == [c.replace("syn", "orig") for c in good]
    mixed = captions(WebShardDataset(spec, 8, original_caption_rate=0.5, epochs=1))
    assert any(c.startswith("orig") for c in mixed) and any(c.startswith("syn") for c in mixed)


def test_forever_repeats_epochs(tmp_path):
    spec, good = make_shards(tmp_path, n_shards=2)
    ds = WebShardDataset(spec, 8)
    stream = captions(itertools.islice(iter(ds), 2 * len(good) + 1))
    assert stream[: len(good)] == good and stream[len(good) : 2 * len(good)] == good
    assert ds.state_dict()["workers"]["0"]["epoch"] == 2


def test_spec_errors(tmp_path):
    spec, _ = make_shards(tmp_path, n_shards=2)
    assert len(expand_shards(spec)) == 2
    assert len(expand_shards(tmp_path)) == 2
    assert len(expand_shards(str(tmp_path / "*.tar"))) == 2
    with pytest.raises(FileNotFoundError, match="shard not found"):
        expand_shards(str(tmp_path / "train-{0000..0002}.tar"))
    with pytest.raises(ValueError, match="at least 3 shards"):
        WebShardDataset(spec, 8, rank=0, world_size=3)
    import gzip

    (tmp_path / "z.tar").write_bytes(gzip.compress(b"x" * 100))
    with pytest.raises(ValueError, match="compressed"):
        index_tar(str(tmp_path / "z.tar"))


def test_all_corrupt_forever_raises(tmp_path):
    write_shard(tmp_path / "bad.tar", [("k", {"image.jpg": b"nope", "synthetic_caption.txt": b"x"})])
    with pytest.raises(NoUsableDataError, match="no usable sample in 1 shard"):
        next(iter(WebShardDataset(str(tmp_path / "bad.tar"), 8)))


def test_from_config(tmp_path):
    from fusedit.config import ConfigError, from_dict
    from fusedit.data.config import DataConfig

    spec, good = make_shards(tmp_path)
    cfg = from_dict(
        DataConfig,
        {"source": "webdataset", "path": spec, "resolution": 8, "shuffle": False, "interpolation": "bicubic"},
    )
    ds = WebShardDataset.from_config(cfg, epochs=1)
    assert ds.transform.interpolation == "bicubic" and captions(ds) == good
    assert from_dict(DataConfig, {}).shuffle is True
    with pytest.raises(ConfigError, match="interpolation"):
        from_dict(DataConfig, {"interpolation": "cubic"})
    with pytest.raises(ConfigError, match="vae_sample_mode"):
        from_dict(DataConfig, {"vae_sample_mode": "mode"})


def test_reads_shards_written_by_the_webdataset_library(tmp_path):
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "w-0.tar")) as sink:
        for i in range(3):
            sink.write({"__key__": f"sample{i:03d}", "image.jpg": jpeg(i), "synthetic_caption.txt": f"cap {i}"})
    ds = WebShardDataset(str(tmp_path / "w-0.tar"), 8, epochs=1)
    samples = list(ds)
    assert captions(samples) == ["cap 0", "cap 1", "cap 2"]
    ds2 = WebShardDataset(str(tmp_path / "w-0.tar"), 8, epochs=1)
    ds2.mark_consumed([samples[0]])  # per-sample form
    assert captions(ds2) == ["cap 1", "cap 2"]


def test_shard_with_no_readable_sample_is_counted_once(tmp_path):
    """Issue 17, item 10: a shard with no readable sample counts in ``skipped`` (``data_skipped``), once per epoch,
    also across a resume."""
    spec, good = make_shards(tmp_path, n_shards=2, corrupt=False)
    (tmp_path / "train-0002.tar").write_bytes(b"this is not a tar archive" * 40)
    ds = WebShardDataset(str(tmp_path / "train-{0000..0002}.tar"), resolution=8, epochs=1, shuffle=False)
    assert captions(ds) == good
    assert ds.skipped == 1 and any("no readable sample" in b for b in ds.bad_samples)
    resumed = WebShardDataset(str(tmp_path / "train-{0000..0002}.tar"), resolution=8, epochs=1, shuffle=False)
    resumed.load_state_dict(ds.state_dict())
    assert list(resumed) == [] and resumed.skipped == 1


def test_a_caption_that_is_not_utf8_is_skipped_with_its_reason(tmp_path):
    write_shard(
        tmp_path / "s.tar",
        [
            ("bad", {"image.jpg": jpeg(1), "synthetic_caption.txt": b"caf\xe9"}),
            ("good", {"image.jpg": jpeg(2), "synthetic_caption.txt": b"a red circle"}),
        ],
    )
    ds = WebShardDataset(str(tmp_path / "s.tar"), 8, epochs=1)
    assert captions(ds) == ["a red circle"]
    assert ds.skipped == 1
    assert ds.bad_samples == [
        f"{tmp_path / 's.tar'}:bad: caption member synthetic_caption.txt is not UTF-8 text (byte 0xe9 at offset 3)"
    ]
