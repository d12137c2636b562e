"""Image file IO for evaluation: listing image folders, loading, resizing, grids, atomic saves.

Everything here works on PIL images and plain ``uint8`` tensors; no torchvision.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

#: File suffixes (lower case) treated as images when listing a folder.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ImageLoadError(ValueError):
    """An image file exists but cannot be decoded."""


def list_images(folder: str | os.PathLike, *, recursive: bool = True) -> list[Path]:
    """Sorted image files under ``folder`` (suffixes in :data:`IMAGE_SUFFIXES`, case-insensitive).

    Hidden files and folders (names starting with ``.``) are skipped.

    Raises:
        FileNotFoundError: ``folder`` does not exist.
        NotADirectoryError: ``folder`` is a file.
        ValueError: ``folder`` holds no image files.
    """
    root = Path(folder)
    if not root.exists():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"image folder {str(root)!r} is not a directory")
    candidates = root.rglob("*") if recursive else root.iterdir()
    paths = sorted(
        p
        for p in candidates
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not paths:
        where = "under" if recursive else "in"
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) {where} {str(root)!r}")
    return paths


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image file and convert it to RGB (fully decoded, file closed).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ImageLoadError: the file cannot be decoded as an image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {str(path)!r} does not exist")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:  # PIL raises these for bad data
        raise ImageLoadError(f"cannot read image {str(path)!r}: {error}") from error


def resize_square(image: Image.Image, size: int) -> Image.Image:
    """Resize (no crop) to ``size``×``size`` with PIL bicubic (antialiased), as clean-fid does."""
    if image.size == (size, size):
        return image
    return image.resize((size, size), resample=Image.Resampling.BICUBIC)


def to_uint8_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """Stack same-sized RGB PIL images into a ``uint8`` tensor of shape ``(B, 3, H, W)``."""
    import torch

    if not images:
        raise ValueError("to_uint8_tensor needs at least one image")
    sizes = {im.size for im in images}
    if len(sizes) != 1:
        raise ValueError(f"images must share one size to be batched, got sizes {sorted(sizes)}")
    arrays = [np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def iter_uint8_batches(
    paths: Sequence[str | os.PathLike], *, batch_size: int, image_size: int
) -> Iterator[torch.Tensor]:
    """Load ``paths`` in order, resize each to ``image_size`` square, yield ``(B, 3, S, S)`` uint8 batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch: list[Image.Image] = []
    for path in paths:
        batch.append(resize_square(load_rgb(path), image_size))
        if len(batch) == batch_size:
            yield to_uint8_tensor(batch)
            batch = []
    if batch:
        yield to_uint8_tensor(batch)


def image_grid(images: Sequence[Image.Image], *, rows: int, cols: int) -> Image.Image:
    """Paste equally sized images row-major into a ``rows``×``cols`` grid.

    Image ``i`` goes to column ``i % cols`` and row ``i // cols`` (DPG-Bench's crop order).
    """
    if len(images) != rows * cols:
        raise ValueError(f"a {rows}x{cols} grid needs {rows * cols} images, got {len(images)}")
    width, height = images[0].size
    if any(im.size != (width, height) for im in images):
        raise ValueError(f"grid images must share one size, got {[im.size for im in images]}")
    grid = Image.new("RGB", (cols * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((i % cols) * width, (i // cols) * height))
    return grid


def save_image_atomic(image: Image.Image, path: str | os.PathLike, **save_kwargs) -> None:
    """Save ``image`` to ``path`` via a temporary file and a rename.

    An interrupted run never leaves a truncated file at ``path``, so "the file exists" safely
    means "this sample is done" when sampling resumes. The format follows ``path``'s suffix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"unknown image suffix {path.suffix!r} for {str(path)!r}")
    image.save(tmp, format=fmt, **save_kwargs)
    os.replace(tmp, path)


def sampled_pairs(folder: Path) -> list[tuple[Path, str]]:
    """(image, prompt) pairs of a folder written by a benchmark sampler (GenEval layout or a prompt list with a
    ``prompts.jsonl``), or a folder of ``NAME.png`` + ``NAME.txt`` pairs."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist")
    pairs: list[tuple[Path, str]] = []
    geneval = sorted(p for p in folder.iterdir() if (p / "metadata.jsonl").is_file())
    if geneval:
        for sub in geneval:
            prompt = json.loads((sub / "metadata.jsonl").read_text().splitlines()[0])["prompt"]
            pairs += [(image, prompt) for image in list_images(sub / "samples")]
        return pairs
    for image in list_images(folder):
        text = image.with_suffix(".txt")
        if not text.is_file():
            raise ValueError(f"{image} has no prompt: expected {text} next to it (or a GenEval-layout folder)")
        pairs.append((image, text.read_text(encoding="utf-8").strip()))
    return pairs
