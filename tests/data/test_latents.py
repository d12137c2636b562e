import io
import itertools
import json
import tarfile

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from fusedit.data.codec import PixelCodec, VAECodec
from fusedit.data.folder import ImageFolderDataset
from fusedit.data.latents import LatentShardDataset, cache_latents, read_manifest


def tiny_codec():
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=1.5305,
        shift_factor=0.0609,
    )
    return VAECodec(vae, name="tiny-vae")


def make_folder(root, n=7, bad=(2,)):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(root / "captions.jsonl", "w") as f:
        for i in range(n):
            name = f"img{i}.png"
            if i in bad:
                (root / name).write_bytes(b"not a png")
            else:
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / name)
            f.write(json.dumps({"file": name, "caption": f"caption {i}"}) + "\n")


class FakeTokenizer:
    name_or_path = "fake-tok"

    def __call__(self, text, truncation=False, max_length=None):
        ids = [ord(c) for c in text]
        return {"input_ids": ids[:max_length] if truncation else ids}


@pytest.fixture
def cached(tmp_path):
    make_folder(tmp_path / "images")
    data = ImageFolderDataset(tmp_path / "images", resolution=16, on_bad="raise")
    codec = tiny_codec()
    manifest = cache_latents(
        data,
        codec,
        tmp_path / "cache",
        shard_size=4,
        batch_size=3,
        dtype="float32",
        tokenizer=FakeTokenizer(),
        max_length=5,
    )
    return tmp_path, data, codec, manifest


def test_round_trip_equals_codec_encode(cached):
    tmp_path, data, codec, manifest = cached
    good = [i for i in range(7) if i != 2]
    expected = codec.encode(torch.stack([data[i]["image"] for i in good]))
    ds = LatentShardDataset(tmp_path / "cache", codec=codec, epochs=1)
    samples = list(ds)
    assert [s["caption"] for s in samples] == [f"caption {i}" for i in good]
    got = torch.stack([s["image"] for s in samples])
    assert got.shape == (6, 4, 8, 8) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert all(s["is_latent"] is True for s in samples)
    # decoding the cache gives images in [-1, 1] of the source size
    images = codec.decode(got[:2])
    assert images.shape == (2, 3, 16, 16) and images.min() >= -1 and images.max() <= 1


def test_manifest(cached):
    tmp_path, _, codec, manifest = cached
    on_disk = read_manifest(tmp_path / "cache")
    assert on_disk == json.loads(json.dumps(manifest))
    assert manifest["count"] == 6 and manifest["skipped"] == 1 and "img2.png" in manifest["bad_items"][0]
    assert manifest["source_skipped"] == 1  # the folder's own counter, the same file
    assert [s["count"] for s in manifest["shards"]] == [4, 2]
    assert manifest["channels"] == 4 and manifest["spatial_factor"] == 2
    assert manifest["normalization"]["shift_factor"] == pytest.approx(0.0609)
    assert manifest["normalization"]["scaling_factor"] == pytest.approx(1.5305)
    assert manifest["codec"]["name"] == "tiny-vae" and manifest["latent_shape"] == [4, 8, 8]
    assert manifest["image_size"] == [16, 16] and manifest["tokenizer"] == {"name": "fake-tok", "max_length": 5}
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_token_ids(cached):
    tmp_path = cached[0]
    sample = next(iter(LatentShardDataset(tmp_path / "cache", return_token_ids=True, epochs=1)))
    assert sample["input_ids"].tolist() == [ord(c) for c in "capti"]
    assert "input_ids" not in next(iter(LatentShardDataset(tmp_path / "cache", epochs=1)))


def test_float16_storage(tmp_path):
    make_folder(tmp_path / "images", n=3, bad=())
    data = ImageFolderDataset(tmp_path / "images", resolution=16)
    codec = tiny_codec()
    cache_latents(data, codec, tmp_path / "cache", shard_size=10)
    with tarfile.open(tmp_path / "cache" / "latents-000000.tar") as tf:
        latent = np.load(io.BytesIO(tf.extractfile("000000000.latent.npy").read()))
    assert latent.dtype == np.float16
    got = next(iter(LatentShardDataset(tmp_path / "cache", epochs=1)))["image"]
    torch.testing.assert_close(got, codec.encode(data[0]["image"][None])[0], rtol=1e-2, atol=1e-2)


def test_resume_and_rank_split(cached):
    tmp_path = cached[0]
    path = tmp_path / "cache"
    full = [s["caption"] for s in LatentShardDataset(path, epochs=2, shuffle=True, seed=1)]
    first = LatentShardDataset(path, epochs=2, shuffle=True, seed=1)
    head = [s["caption"] for s in itertools.islice(iter(first), 3)]
    resumed = LatentShardDataset(path, epochs=2, shuffle=True, seed=1)
    resumed.load_state_dict(first.state_dict())
    assert head + [s["caption"] for s in resumed] == full
    ranks = [[s["caption"] for s in LatentShardDataset(path, rank=r, world_size=2, epochs=1)] for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == sorted(f"caption {i}" for i in range(7) if i != 2)
    assert not set(ranks[0]) & set(ranks[1])


def test_cache_from_shards_and_batches(tmp_path):
    make_folder(tmp_path / "images", n=4, bad=())
    folder = ImageFolderDataset(tmp_path / "images", resolution=16)
    loader = torch.utils.data.DataLoader(folder, batch_size=3)
    manifest = cache_latents(loader, PixelCodec(), tmp_path / "pix", shard_size=2, dtype="float32")
    assert manifest["count"] == 4 and manifest["spatial_factor"] == 1
    got = [s["image"] for s in LatentShardDataset(tmp_path / "pix", epochs=1)]
    assert torch.equal(got[3], folder[3]["image"])
    # an infinite stream is refused
    with pytest.raises(ValueError, match="forever"):
        cache_latents(LatentShardDataset(tmp_path / "pix"), PixelCodec(), tmp_path / "again")


def test_errors(cached):
    tmp_path, data, codec, _ = cached
    with pytest.raises(FileExistsError, match="overwrite"):
        cache_latents(data, codec, tmp_path / "cache")
    with pytest.raises(ValueError, match="different codec.*channels 4 \\(cache\\) vs 3"):
        LatentShardDataset(tmp_path / "cache", codec=PixelCodec())
    with pytest.raises(FileNotFoundError, match="manifest"):
        read_manifest(tmp_path / "images")
    with pytest.raises(ValueError, match="dtype"):
        cache_latents(data, codec, tmp_path / "c2", dtype="bfloat16")
    # shards read by pattern work without the folder form; a corrupt latent member is skipped and counted
    with tarfile.open(tmp_path / "cache" / "latents-000001.tar", "a") as tf:
        info = tarfile.TarInfo("zzz.latent.npy")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"bad"))
    ds = LatentShardDataset(str(tmp_path / "cache" / "latents-*.tar"), epochs=1)
    assert len(list(ds)) == 6 and ds.skipped == 1
