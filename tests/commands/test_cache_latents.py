"""``fusedit cache-latents`` (fusedit.data.latents.main): folder mode and config mode."""

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from fusedit.cli import main as cli_main
from fusedit.data.latents import read_manifest


def main(argv):
    return cli_main(["cache-latents", *argv])


def tiny_vae(path):
    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
    ).save_pretrained(path / "vae")
    return path


def image_folder(root, n=5, bad=(1,)):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(root / "captions.jsonl", "w") as f:
        for i in range(n):
            if i in bad:
                (root / f"{i}.png").write_bytes(b"broken")
            else:
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / f"{i}.png")
            f.write(json.dumps({"file": f"{i}.png", "caption": f"caption {i}"}) + "\n")
    return root


def test_folder_mode_prints_manifest_and_counts(tmp_path, capsys):
    vae = tiny_vae(tmp_path / "pipe")
    folder = image_folder(tmp_path / "images")
    assert (
        main(
            [
                "--folder",
                str(folder),
                "--vae",
                str(vae),
                "--subfolder",
                "vae",
                "--resolution",
                "16",
                "--out",
                str(tmp_path / "cache"),
                "--shard-size",
                "3",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert out[0] == str(tmp_path / "cache" / "manifest.json")
    assert "4 latents in 2 shard(s); skipped 1 unreadable" in out[1]
    manifest = read_manifest(tmp_path / "cache")
    assert manifest["count"] == 4 and manifest["latent_shape"] == [4, 8, 8]


def test_config_mode_with_overrides(tmp_path, capsys):
    vae = tiny_vae(tmp_path / "pipe")
    folder = image_folder(tmp_path / "images", bad=())
    config = tmp_path / "exp.yaml"
    config.write_text(
        f"data:\n  source: folder\n  path: {folder}\n  vae: {vae}\n  vae_subfolder: vae\n"
        f"  resolution: 32\nmodel:\n  in_channels: 4\n"
    )
    assert (
        main(
            [
                "--config",
                str(config),
                "data.resolution=16",
                "--out",
                str(tmp_path / "cache"),
                "--dtype",
                "float32",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert "5 latents in 1 shard(s)" in capsys.readouterr().out
    assert read_manifest(tmp_path / "cache")["dtype"] == "float32"


def test_usage_errors(tmp_path):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path)])  # neither --config nor --folder/--vae/--resolution
    with pytest.raises(SystemExit):
        main(["--folder", str(tmp_path), "x=1", "--out", str(tmp_path)])


@pytest.mark.slow
def test_config_with_buckets_writes_one_shard_series_per_bucket(tmp_path, capsys):
    vae = tiny_vae(tmp_path / "pipe")  # spatial factor 2: with patch size 2, bucket sides are multiples of 4
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    sizes = [(40, 20), (20, 40), (24, 24), (44, 20), (20, 20)]  # (width, height): wide, tall, square, wide, square
    with open(root / "captions.jsonl", "w") as f:
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
            f.write(json.dumps({"file": f"{i}.png", "caption": f"caption {i}"}) + "\n")
    config = tmp_path / "exp.yaml"
    config.write_text(
        f"data:\n  source: folder\n  path: {root}\n  vae: {vae}\n  vae_subfolder: vae\n  resolution: 16\n"
        "  buckets:\n    enabled: true\n    sizes: [[12, 24], [24, 12], [16, 16]]\n"
        "model:\n  in_channels: 4\n  patch_size: 2\n"
    )
    argv = ["--config", str(config), "--out", str(tmp_path / "cache"), "--device", "cpu", "--shard-size", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "bucket 12x24: 2 latent(s) of shape [4, 6, 12]" in out and "bucket 24x12: 1 latent(s)" in out
    manifest = read_manifest(tmp_path / "cache")
    assert manifest["latent_shape"] == "mixed" and manifest["count"] == 5
    by_size = {tuple(b["image_size"]): b for b in manifest["buckets"]}
    assert by_size[(16, 16)]["shards"] == ["latents-8x8-000000.tar"] and by_size[(16, 16)]["count"] == 2
    assert sorted(s["file"] for s in manifest["shards"]) == sorted(f for b in manifest["buckets"] for f in b["shards"])
    # a bucket that is not a whole number of patches of the loaded VAE: one line, exit 2
    bad = tmp_path / "bad.yaml"
    bad.write_text(config.read_text().replace("[16, 16]]", "[18, 16]]"))
    assert main(["--config", str(bad), "--out", str(tmp_path / "cache2"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: data.buckets.sizes: [18, 16] is not a multiple of 4 px on both sides (model.patch_size × the codec's "
        "spatial factor, or data.buckets.multiple); use e.g. [16, 16]"
    ]
    assert not (tmp_path / "cache2" / "manifest.json").exists()
