"""Aspect-ratio buckets: generation, nearest-bucket assignment, cover + crop, the bucketed folder, config errors."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fusedit.config import ConfigError
from fusedit.data.bucket_folder import BucketedImageFolder
from fusedit.data.buckets import (
    BucketTransform,
    check_bucket_sizes,
    cover_crop,
    generate_buckets,
    nearest_bucket,
    training_buckets,
)
from fusedit.data.codec import PixelCodec
from fusedit.data.latents import cache_latents
from fusedit.data.webdataset import WebShardDataset
from fusedit.experiment import load_experiment

from .bucket_data import BUCKETS, write_shards


def test_generated_buckets_fit_the_budget_in_whole_cells_and_span_the_aspect_range():
    buckets = generate_buckets(256 * 256, (0.5, 2.0), 7, 16)
    assert len(buckets) == 7 and (256, 256) in buckets
    for h, w in buckets:
        assert h % 16 == 0 and w % 16 == 0 and h * w <= 256 * 256
        assert h * w >= 0.8 * 256 * 256  # no bucket wastes much of the budget
    aspects = [w / h for h, w in buckets]
    assert aspects == sorted(aspects)
    assert math.isclose(aspects[0], 0.5, rel_tol=0.05) and math.isclose(aspects[-1], 2.0, rel_tol=0.05)
    # symmetric range: every bucket has its transpose
    assert sorted((w, h) for h, w in buckets) == sorted(buckets)


def test_too_small_a_budget_is_a_clear_error():
    with pytest.raises(ConfigError, match="pixel_budget: 32 pixels cannot hold"):
        generate_buckets(32, (0.5, 2.0), 3, 8)


@pytest.mark.parametrize(
    "size, expected",
    [
        ((64, 64), 1),
        ((100, 50), 2),
        ((50, 100), 0),
        ((70, 64), 1),
        ((90, 64), 1),
        ((100, 64), 2),
        ((1000, 10), 2),
        ((63, 80), 1),
    ],
)
def test_each_image_goes_to_the_bucket_nearest_its_aspect_ratio(size, expected):
    buckets = [(48, 24), (32, 32), (24, 48)]  # (height, width): tall 0.5, square, wide 2
    assert nearest_bucket(*size, buckets) == expected
    # the oracle: the smallest |log(aspect ratio) difference|
    width, height = size
    distances = [abs(math.log(width / height) - math.log(w / h)) for h, w in buckets]
    assert expected == int(np.argmin(distances))


def test_cover_crop_keeps_the_aspect_ratio_and_centres_the_crop():
    # a 40x20 image of horizontal stripes 0..39 across: columns carry their index
    columns = np.tile(np.arange(40, dtype=np.uint8) * 6, (20, 1))
    image = Image.fromarray(np.stack([columns] * 3, -1))
    out = cover_crop(image, (10, 10), "nearest")
    assert out.size == (10, 10)
    # scaled by 1/2 to 20x10 (nearest: source column 2x+1), then the centre 10 columns 5..14: source 11, 13, ... 29
    assert list(np.asarray(out)[0, :, 0]) == [c * 6 for c in range(11, 31, 2)]
    tall = cover_crop(image, (30, 10), "nearest")  # must grow to cover 30 rows: 60x30, crop 10 columns
    assert tall.size == (10, 30)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert np.array_equal(
        np.asarray(cover_crop(image, (10, 10), generator=g1)), np.asarray(cover_crop(image, (10, 10), generator=g2))
    )


def test_bucket_transform_gives_the_bucket_size():
    transform = BucketTransform([(16, 32), (32, 16), (24, 24)])
    for (w, h), size in {(60, 30): (16, 32), (30, 60): (32, 16), (33, 30): (24, 24)}.items():
        out = transform(Image.new("RGB", (w, h), (255, 0, 0)))
        assert out.shape == (3, *size) and out.dtype == torch.float32
        assert torch.allclose(out[0], torch.ones(size)) and torch.allclose(out[1], -torch.ones(size))


def image_folder(root, sizes, bad=()):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(root / "captions.jsonl", "w") as f:
        for i, (w, h) in enumerate(sizes):
            if i in bad:
                (root / f"{i}.png").write_bytes(b"not a png")
            else:
                Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
            f.write(json.dumps({"file": f"{i}.png", "caption": f"image {i}"}) + "\n")
    return root


def test_bucketed_folder_assigns_from_headers_and_substitutes_within_the_bucket(tmp_path):
    sizes = [(40, 20), (20, 40), (30, 30), (44, 20), (20, 20), (48, 24), (18, 40)]
    root = image_folder(tmp_path / "images", sizes, bad=(3,))
    # image 3's header is unreadable: bucket -1, counted at once
    data = BucketedImageFolder(root, [(16, 32), (32, 16), (24, 24)])
    assert data.item_buckets == [0, 1, 2, -1, 2, 0, 1]
    assert data.skipped == 1 and data.bad_files == ["3.png"]
    assert data.bucket_counts() == {(16, 32): 2, (32, 16): 2, (24, 24): 2}
    for i, bucket in enumerate(data.item_buckets):
        if bucket >= 0:
            assert data[i]["image"].shape == (3, *data.buckets[bucket])
    # a file that breaks after the scan is replaced by the next readable file of its own bucket
    (root / "0.png").write_bytes(b"truncated")
    item = data[0]
    assert item["caption"] == "image 5" and item["image"].shape == (3, 16, 32)


def config_yaml(tmp_path, buckets, model="", vae=""):
    path = tmp_path / "exp.yaml"
    path.write_text(
        "data:\n  source: folder\n  path: images\n  resolution: 32\n"
        + vae
        + "  buckets:\n"
        + "".join(f"    {line}\n" for line in buckets)
        + "model:\n  patch_size: 2\n  sample_size: 32\n"
        + ("" if vae else "  in_channels: 3\n")
        + model
    )
    return path


@pytest.mark.parametrize(
    "buckets, model, message",
    [
        (["enabled: true", "sizes: [[32, 48], [33, 32]]"], "", r"\[33, 32\] is not a multiple of 2 px"),
        (["enabled: true", "sizes: [[32, 48], [32, 48]]"], "", r"\[32, 48\] is listed twice"),
        (["enabled: true", "sizes: [[32, 48]]", "pixel_budget: 1000"], "", "over data.buckets.pixel_budget=1000"),
        (["enabled: true", "sizes: [[32]]"], "", r"expected \[height, width\]"),
        (["enabled: true", "aspect_range: [2.0, 0.5]"], "", "expected \\[low, high\\]"),
        (["enabled: true", "count: 0"], "", "data.buckets.count: got 0"),
        (
            ["enabled: true", "sizes: [[32, 64], [32, 32]]"],
            "  pos_embed: ape\n  pos_embed_max_size: 16\n",
            "largest bucket side is 32 patches.*pos_embed_max_size=16; raise pos_embed_max_size to 32",
        ),
        (
            ["enabled: true", "pixel_budget: 4096", "aspect_range: [0.25, 4.0]", "count: 3"],
            "  pos_embed: 2d-rope\n  absolute_pos_embed: true\n  pos_embed_max_size: 16\n",
            "largest bucket side is 64 patches",
        ),
    ],
)
def test_bad_bucket_configs_are_one_line_errors_at_load(tmp_path, buckets, model, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_experiment(config_yaml(tmp_path, buckets, model))
    assert "\n" not in str(error.value)


def test_buckets_need_a_source_with_aspect_ratios(tmp_path):
    with pytest.raises(ConfigError, match="'shapes' source has no aspect ratios"):
        load_experiment(None, ["data.buckets.enabled=true"])


def test_rope_has_no_table_to_outgrow_and_a_vae_is_checked_once_loaded(tmp_path):
    path = config_yaml(tmp_path, ["enabled: true", "sizes: [[32, 128], [64, 64]]"], "  pos_embed: 2d-rope\n")
    config = load_experiment(path)
    assert check_bucket_sizes(config, 1) == [(32, 128), (64, 64)]
    vae = config_yaml(
        tmp_path,
        ["enabled: true", "sizes: [[40, 120], [64, 64]]"],
        "  pos_embed: ape\n  pos_embed_max_size: 30\n  in_channels: 4\n",
        vae="  vae: some/vae\n",
    )
    config = load_experiment(vae)  # the VAE's factor is not known before it is loaded

    class Codec:
        spatial_factor = 8

    with pytest.raises(ConfigError, match="is not a multiple of 16 px"):
        training_buckets(config, Codec())
    Codec.spatial_factor = 2  # 4 px patches: the 120 px side is 30 patches, what the table holds
    assert training_buckets(config, Codec()) == [(40, 120), (64, 64)]
    Codec.spatial_factor = 1
    with pytest.raises(ConfigError, match="largest bucket side is 60 patches"):
        training_buckets(config, Codec())


def test_a_bucketed_latent_cache_is_checked_against_the_table(tmp_path):
    spec = write_shards(tmp_path / "shards", n_shards=1)
    source = WebShardDataset(spec, resolution=8, image_key="image.png", caption_key="txt", epochs=1, buckets=BUCKETS)
    cache_latents(source, PixelCodec(), tmp_path / "cache", dtype="float32", per_bucket=True)
    base = ["data.source=latents", f"data.path={tmp_path / 'cache'}", "data.buckets.enabled=true", "model.patch_size=2"]
    base.append("model.in_channels=3")
    fits = load_experiment(None, [*base, "model.pos_embed=ape", "model.pos_embed_max_size=8", "model.sample_size=16"])
    assert training_buckets(fits, PixelCodec()) is None  # the 16 px side is 8 patches: held
    small = load_experiment(None, [*base, "model.pos_embed=ape", "model.pos_embed_max_size=6", "model.sample_size=8"])
    with pytest.raises(ConfigError, match="largest bucket is 8 patches per side, but model.pos_embed_max_size=6"):
        training_buckets(small, PixelCodec())
