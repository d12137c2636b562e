import json

import pytest
import torch
from diffusers import AutoencoderKL

from fusedit.data.codec import Codec, PixelCodec, VAECodec, load_codec, resolve_dtype


def tiny_vae(shift=0.0609, scale=1.5305, blocks=(8, 16), seed=0):
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        block_out_channels=blocks,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=scale,
        shift_factor=shift,
    )


@pytest.fixture
def saved_vae(tmp_path):
    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    return tmp_path / "pipe", vae


def test_pixel_codec():
    codec = load_codec(None)
    assert isinstance(codec, PixelCodec) and isinstance(codec, Codec)
    assert codec.channels == 3 and codec.spatial_factor == 1
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(codec.encode(x), x)
    assert torch.equal(codec.decode(x * 3), (x * 3).clamp(-1, 1))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        codec.encode(torch.zeros(3, 8, 8))


def test_load_from_local_subfolder_matches_original(saved_vae):
    root, vae = saved_vae
    codec = load_codec(str(root), subfolder="vae")
    assert isinstance(codec, VAECodec) and isinstance(codec, Codec)
    assert codec.channels == 4 and codec.spatial_factor == 2
    assert codec.shift_factor == pytest.approx(0.0609) and codec.scaling_factor == pytest.approx(1.5305)
    assert not any(p.requires_grad for p in codec.vae.parameters())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = codec.encode(x)
    assert z.shape == (2, 4, 8, 8) and z.dtype == torch.float32
    with torch.no_grad():
        raw = vae.encode(x).latent_dist.mode()
    torch.testing.assert_close(z, (raw - 0.0609) * 1.5305, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(codec.denormalize(z), raw, rtol=1e-5, atol=1e-5)
    # decode un-normalises before calling the VAE
    with torch.no_grad():
        expected = vae.decode(raw).sample.clamp(-1, 1)
    torch.testing.assert_close(codec.decode(z), expected, rtol=1e-4, atol=1e-4)
    assert codec.describe()["spatial_factor"] == 2 and json.dumps(codec.describe())


def test_normalisation_round_trip_and_no_shift():
    codec = VAECodec(tiny_vae(shift=None, scale=0.5))
    assert codec.shift_factor == 0.0
    z = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(codec.normalize(codec.denormalize(z)), z)
    torch.testing.assert_close(codec.normalize(z), z * 0.5)


def test_spatial_factor_from_depth():
    assert VAECodec(tiny_vae(blocks=(8, 8, 8, 8))).spatial_factor == 8
    assert VAECodec(tiny_vae(blocks=(8,))).spatial_factor == 1


def test_sample_mode():
    codec = VAECodec(tiny_vae(), sample_mode="sample")
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    a = codec.encode(x, generator=torch.Generator().manual_seed(0))
    b = codec.encode(x, generator=torch.Generator().manual_seed(0))
    c = codec.encode(x, generator=torch.Generator().manual_seed(1))
    mean = codec.encode(x, sample_mode="mean")
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, mean)
    with pytest.raises(ValueError, match="sample_mode"):
        VAECodec(tiny_vae(), sample_mode="mode")


def test_dtype_and_indivisible_size(saved_vae):
    root, _ = saved_vae
    codec = load_codec(root, subfolder="vae", dtype="bf16")
    assert codec.dtype == torch.bfloat16
    assert codec.encode(torch.zeros(1, 3, 8, 8)).dtype == torch.float32
    with pytest.raises(ValueError, match="divisible"):
        codec.encode(torch.zeros(1, 3, 9, 8))
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("float8")


def test_missing_paths(tmp_path, saved_vae):
    root, _ = saved_vae
    with pytest.raises(FileNotFoundError, match="VAE folder not found"):
        load_codec(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError, match="subfolder 'decoder' not found.*vae"):
        load_codec(root, subfolder="decoder")
    with pytest.raises(FileNotFoundError, match="vae_subfolder"):
        load_codec(root)  # forgot the subfolder
