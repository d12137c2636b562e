import io

import numpy as np
import pytest
import torch
from PIL import Image

from fusedit.data.transforms import (
    CorruptImageError,
    ImageTransform,
    center_crop_box,
    decode_image,
    load_image,
    resize_short_side,
    to_rgb,
    to_tensor,
)


def _jpeg_bytes(w=40, h=30, color=(200, 10, 30)):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="JPEG")
    return buf.getvalue()


def test_output_shape_range_and_values():
    image = Image.new("RGB", (50, 30), (255, 0, 128))
    x = ImageTransform(16)(image)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.ones(16, 16))
    assert torch.allclose(x[1], -torch.ones(16, 16))
    assert torch.allclose(x[2], torch.full((16, 16), 128 / 255 * 2 - 1), atol=1e-6)


def test_to_tensor_exact_mapping():
    array = np.arange(0, 256, dtype=np.uint8).reshape(16, 16)
    image = Image.fromarray(np.stack([array] * 3, -1))
    x = to_tensor(image)
    expected = torch.from_numpy(array).float() / 255 * 2 - 1
    assert torch.equal(x[0], expected)
    assert x.min() == -1 and x.max() == 1


def test_resize_short_side_torchvision_rounding():
    assert resize_short_side(Image.new("RGB", (100, 30)), 16).size == (53, 16)  # int(16*100/30) = 53
    assert resize_short_side(Image.new("RGB", (30, 100)), 16).size == (16, 53)
    assert resize_short_side(Image.new("RGB", (7, 7)), 16).size == (16, 16)  # upscaling too


def test_center_crop_is_centered():
    # a 48x16 image whose middle third is white: the centre crop must be all white
    array = np.zeros((16, 48, 3), dtype=np.uint8)
    array[:, 16:32] = 255
    x = ImageTransform(16, center_crop=True)(Image.fromarray(array))
    assert torch.all(x == 1)
    assert center_crop_box(21, 16, 16) == (2, 0, 18, 16)  # round(2.5) = 2 like torchvision


def test_random_crop_is_seeded_and_varies():
    array = np.random.default_rng(0).integers(0, 255, (16, 64, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    t = ImageTransform(16, center_crop=False)
    a = t(image, torch.Generator().manual_seed(1))
    b = t(image, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    crops = {t(image, torch.Generator().manual_seed(s)).sum().item() for s in range(20)}
    assert len(crops) > 1


@pytest.mark.parametrize("mode", ["L", "1", "P", "RGBA", "LA", "CMYK", "I;16", "I", "F", "YCbCr"])
def test_any_mode_becomes_rgb(mode):
    image = Image.new("RGB", (20, 24), (10, 200, 30)).convert(mode)
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (20, 24)
    x = ImageTransform(8)(image)
    assert x.shape == (3, 8, 8) and x.min() >= -1 and x.max() <= 1


def test_transparent_pixels_composite_on_white():
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert np.asarray(to_rgb(image)).min() == 255


def test_sixteen_bit_is_scaled():
    array = np.full((4, 4), 65535, dtype=np.uint16)
    image = Image.fromarray(array)
    assert image.mode.startswith("I")
    assert np.asarray(to_rgb(image)).min() == 255


def test_decode_errors():
    data = _jpeg_bytes()
    assert decode_image(data).size == (40, 30)
    with pytest.raises(CorruptImageError, match="empty"):
        decode_image(b"")
    with pytest.raises(CorruptImageError, match="cannot decode"):
        decode_image(b"not an image at all")
    with pytest.raises(CorruptImageError):
        decode_image(data[: len(data) // 2])  # truncated


def test_load_image_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(tmp_path / "nope.png")


def test_bad_arguments():
    with pytest.raises(ValueError, match="resolution"):
        ImageTransform(0)
    with pytest.raises(ValueError, match="interpolation"):
        ImageTransform(8, interpolation="cubic-ish")
