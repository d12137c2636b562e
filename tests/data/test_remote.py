"""Shards read where they live: http(s) through fsspec against a local server, ``pipe:`` commands, dropped
connections (retried, or skipped and counted), resuming a remote stream mid-shard, missing object-store back-ends."""

import io
import logging
import shlex
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import fusedit.data.remote as remote
from fusedit.data.remote import RemoteShardError, ShardStreamError, iter_tar_records, remote_records
from fusedit.data.webdataset import WebShardDataset

from .shard_server import ShardServer


def png(seed, size=(12, 10)):
    array = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def shard_bytes(shard, per_shard=6, pad=0):
    """A tar of ``per_shard`` samples (PNG image, caption; ``pad`` extra bytes per sample make it long)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(per_shard):
            key = f"s{shard}i{i}"
            members = {"image.png": png(shard * 100 + i), "synthetic_caption.txt": f"syn {key}".encode()}
            if pad:
                members["pad.bin"] = bytes(pad)
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def serve_shards(server, tmp_path, n_shards=3, **kwargs):
    """The same shards on the server and on disk: ``(url spec, local spec)``."""
    for s in range(n_shards):
        data = shard_bytes(s, **kwargs)
        server.files[f"/train-{s:04d}.tar"] = data
        (tmp_path / f"train-{s:04d}.tar").write_bytes(data)
    last = f"{n_shards - 1:04d}"
    return server.url(f"/train-{{0000..{last}}}.tar"), str(tmp_path / f"train-{{0000..{last}}}.tar")


def stream(spec, **kwargs):
    return WebShardDataset(spec, resolution=8, image_key="image.png", seed=4, epochs=1, **kwargs)


def samples(dataset):
    return [(s["caption"], s["image"]) for s in dataset]


def assert_same(a, b):
    assert [c for c, _ in a] == [c for c, _ in b]
    for (_, x), (_, y) in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_http_shards_read_like_local_ones(tmp_path):
    with ShardServer() as server:
        url, local = serve_shards(server, tmp_path)
        assert_same(samples(stream(url)), samples(stream(local)))
        # shuffle permutes the shard order; the samples of a remote shard stay in tar order
        shuffled = [c for c, _ in samples(stream(url, shuffle=True))]
        assert sorted(shuffled) == sorted(c for c, _ in samples(stream(local)))
        for s in range(3):
            mine = [c for c in shuffled if c.startswith(f"syn s{s}")]
            assert mine == [f"syn s{s}i{i}" for i in range(6)]


def test_dropped_connection_is_retried_and_nothing_is_lost_or_repeated(tmp_path, caplog):
    with ShardServer() as server:
        url, local = serve_shards(server, tmp_path, pad=20000)
        size = len(server.files["/train-0001.tar"])
        server.drops["/train-0001.tar"] = [size // 2, 2]  # cut mid-shard, twice
        with caplog.at_level(logging.WARNING, logger="fusedit.data"):
            got = samples(stream(url, remote_retries=2))
        assert_same(got, samples(stream(local)))
        assert server.requests["/train-0001.tar"] == 3
        retries = [r.message for r in caplog.records if "retry" in r.message]
        assert len(retries) == 2
        # the cut came mid-shard, after samples were taken: the retry skipped them (checked above: none repeated)
        assert all("from sample 0" not in m for m in retries)


def test_connection_that_keeps_dropping_skips_the_rest_of_the_shard_and_counts_it(tmp_path):
    with ShardServer() as server:
        url, local = serve_shards(server, tmp_path, pad=20000)
        size = len(server.files["/train-0001.tar"])
        server.drops["/train-0001.tar"] = [size // 2, 100]
        dataset = stream(url, remote_retries=1)
        got = [c for c, _ in samples(dataset)]
        # shards 0 and 2 complete; shard 1 lost after its samples that were read whole, never repeated
        assert [c for c in got if "s1" not in c] == [f"syn s{s}i{i}" for s in (0, 2) for i in range(6)]
        lost = [c for c in got if "s1" in c]
        assert lost == [f"syn s1i{i}" for i in range(len(lost))] and 0 < len(lost) < 6
        assert dataset.skipped == 1
        assert "after 1 retries" in dataset.bad_samples[0] and "train-0001.tar" in dataset.bad_samples[0]
        assert server.requests["/train-0001.tar"] == 2


def test_a_body_cut_without_content_length_is_caught_by_the_missing_end_of_archive(tmp_path):
    with ShardServer() as server:
        server.send_length = False
        url, local = serve_shards(server, tmp_path, n_shards=1)
        data = server.files["/train-0000.tar"]
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            cut = tar.getmembers()[2].offset  # sample 1's first header: tarfile's stream mode sees a clean end here
        server.drops["/train-0000.tar"] = [cut, 5]
        with pytest.raises(RemoteShardError, match="end-of-archive"):
            list(remote_records(server.url("/train-0000.tar"), retries=1))
        server.drops.clear()
        assert [k for _, k, _ in remote_records(server.url("/train-0000.tar"))] == [f"s0i{i}" for i in range(6)]
        assert len(data) > cut


def test_resuming_a_remote_stream_mid_shard_skips_by_headers(tmp_path, monkeypatch):
    with ShardServer() as server:
        url, _ = serve_shards(server, tmp_path)
        full = samples(stream(url))
        first = stream(url)
        it = iter(first)
        head = [next(it) for _ in range(8)]  # shard 0 whole, 2 samples of shard 1
        state = first.state_dict()
        decoded = []
        monkeypatch.setattr(
            "fusedit.data.webdataset.decode_image",
            lambda data, name: decoded.append(name) or Image.open(io.BytesIO(data)),
        )
        resumed = stream(url)
        resumed.load_state_dict(state)
        rest = samples(resumed)
        assert_same([(s["caption"], s["image"]) for s in head] + rest, full)
        # nothing before the position was decoded again
        assert decoded[0].startswith("s1i2.") and len(decoded) == len(rest)


def test_pipe_cat_reads_a_local_shard(tmp_path):
    data = shard_bytes(0)
    path = tmp_path / "a b.tar"
    path.write_bytes(data)
    local = tmp_path / "local.tar"
    local.write_bytes(data)
    assert_same(samples(stream(f"pipe:cat {shlex.quote(str(path))}")), samples(stream(str(local))))


def test_a_failing_pipe_is_skipped_and_counted(tmp_path):
    dataset = stream(["pipe:cat /nonexistent/shard.tar", f"pipe:cat {tmp_path / 'x.tar'}"], remote_retries=0)
    (tmp_path / "x.tar").write_bytes(shard_bytes(5, per_shard=2))
    assert [c for c, _ in samples(dataset)] == ["syn s5i0", "syn s5i1"]
    assert dataset.skipped == 1 and "nonexistent" in dataset.bad_samples[0]


def test_tar_stream_parser_needs_the_end_of_archive_block():
    data = shard_bytes(0, per_shard=2)
    assert [k for k, _ in iter_tar_records(io.BytesIO(data))] == ["s0i0", "s0i1"]
    end = data.rindex(b"syn s0i1") + 512  # the last member's data block, without the zero blocks after it
    with pytest.raises(ShardStreamError, match="end-of-archive"):
        list(iter_tar_records(io.BytesIO(data[: (end // 512) * 512])))
    with pytest.raises(ShardStreamError, match="inside member"):
        list(iter_tar_records(io.BytesIO(data[:700])))


@pytest.mark.parametrize("url, package", [("s3://bucket/train-0000.tar", "s3fs"), ("gs://b/train.tar", "gcsfs")])
def test_object_storage_without_its_backend_is_a_clear_error(url, package, monkeypatch):
    real = remote.importlib.util.find_spec
    monkeypatch.setattr(
        remote.importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a)
    )
    with pytest.raises(ImportError, match=f"pip install {package}"):
        remote.open_stream(url)
    dataset = stream(url)
    with pytest.raises(ImportError, match=f"pip install {package}"):
        next(iter(dataset))
