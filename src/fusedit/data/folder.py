"""A map-style data set over a folder of images with a captions file.

Layout::

    root/
      captions.jsonl      {"file": "a.jpg", "caption": "a red cube"}   (keys "image"/"text" also accepted)
      (or captions.csv    header "file,caption" — or "image,text")
      a.jpg  sub/b.png ...  (paths in the captions file are relative to ``root``; absolute paths also work)

Each item is ``{"image": float32 (3, r, r) in [-1, 1], "caption": str}``.

Unreadable images (missing, truncated, not an image) — policy:
    Images are validated lazily, when an index is read. A bad file is logged once (``fusedit.data`` logger,
    WARNING, with the reason), marked in a shared-memory mask (so the mark is visible across DataLoader workers and
    in the main process), and the item is replaced by the next good index ``(i + 1) % len``, ``(i + 2) % len``... —
    deterministic: the substitute is always the first readable file at or after ``i``. Files already marked bad
    are not retried. ``skipped`` is the number of distinct bad files found so far and ``bad_files`` their paths;
    the trainer can log both. ``prescan=True`` decodes every image at construction instead, so the counts are
    complete before training starts (slow for large folders). ``on_bad="raise"`` raises the
    :class:`~fusedit.data.transforms.CorruptImageError` / ``FileNotFoundError`` instead of substituting (still
    marking and counting): :func:`fusedit.data.latents.cache_latents` uses that to skip bad files without
    caching duplicates.

Random crops are drawn from a generator seeded by ``(seed, epoch, index)`` — call :meth:`set_epoch` each epoch —
so an item's crop does not depend on worker assignment or on resuming.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from fusedit.data.errors import NoUsableDataError
from fusedit.data.transforms import CorruptImageError, ImageTransform, load_image

__all__ = ["ImageFolderDataset", "read_captions", "CAPTION_FILES"]

logger = logging.getLogger("fusedit.data")

#: Captions files looked for, in this order, when ``captions`` is not given.
CAPTION_FILES = ("captions.jsonl", "captions.csv")
_FILE_KEYS = ("file", "image")
_CAPTION_KEYS = ("caption", "text")


def _pick(row: dict, keys: tuple[str, ...]):
    for key in keys:
        if key in row:
            return row[key]
    return None


def _read_utf8(path: Path) -> str:
    """The text of ``path``; bytes that are not UTF-8 raise ``ValueError`` naming the file, line and byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ValueError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at column {column}); save the captions "
            f"file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def read_captions(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Read ``(file, caption)`` pairs from a ``.jsonl`` or ``.csv`` captions file, in file order.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unknown format, text that is not UTF-8, invalid JSON, missing ``file``/``caption`` columns or
            keys (with the line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path}")
    suffix = path.suffix.lower()
    pairs: list[tuple[str, str]] = []
    if suffix in (".jsonl", ".json"):
        for lineno, line in enumerate(_read_utf8(path).split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            file, caption = _pick(row, _FILE_KEYS), _pick(row, _CAPTION_KEYS)
            if file is None or caption is None:
                raise ValueError(
                    f"{path}:{lineno}: needs keys 'file' (or 'image') and 'caption' (or 'text'); got {sorted(row)}"
                )
            pairs.append((str(file), str(caption)))
    elif suffix == ".csv":
        with io.StringIO(_read_utf8(path), newline="") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            reader.fieldnames = columns
            file_col = next((k for k in _FILE_KEYS if k in columns), None)
            caption_col = next((k for k in _CAPTION_KEYS if k in columns), None)
            if file_col is None or caption_col is None:
                raise ValueError(
                    f"{path}: header needs columns 'file' (or 'image') and 'caption' (or 'text'); got {columns}"
                )
            for lineno, row in enumerate(reader, 2):
                file, caption = row.get(file_col), row.get(caption_col)
                if not file:
                    raise ValueError(f"{path}:{lineno}: empty '{file_col}' value")
                pairs.append((file, caption or ""))
    else:
        raise ValueError(f"captions file {path}: unknown format {suffix!r}, expected .jsonl or .csv")
    return pairs


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images + captions from a folder (see the module docstring for the layout and the bad-file policy).

    Args:
        root: the folder.
        resolution: output side ``r``; images are resized (short side) and cropped to ``r``×``r``.
        center_crop: centre crop, else a random crop seeded by ``(seed, epoch, index)``.
        captions: captions file name (relative to ``root``) or path; default: ``captions.jsonl`` then
            ``captions.csv``.
        interpolation: resize filter (``bilinear`` as in the reference).
        seed: seed of the random crops.
        prescan: decode every image now and mark the bad ones (else lazily).
        on_bad: ``"substitute"`` (next readable file; training) or ``"raise"`` (caching, inspection).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        resolution: int,
        center_crop: bool = True,
        captions: str | os.PathLike | None = None,
        interpolation: str = "bilinear",
        seed: int = 0,
        prescan: bool = False,
        on_bad: str = "substitute",
    ):
        if on_bad not in ("substitute", "raise"):
            raise ValueError(f"on_bad: got {on_bad!r}, expected 'substitute' or 'raise'")
        self.on_bad = on_bad
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.captions_path = self._find_captions(captions)
        pairs = read_captions(self.captions_path)
        if not pairs:
            raise ValueError(f"captions file {self.captions_path} lists no images")
        self.files = [p for p, _ in pairs]
        self.captions = [c for _, c in pairs]
        self.transform = ImageTransform(resolution, center_crop, interpolation)
        self.seed = int(seed)
        self.epoch = 0
        # shared memory, so marks made in DataLoader workers are seen by the main process and the other workers
        self._bad = torch.zeros(len(self.files), dtype=torch.bool).share_memory_()
        self._logged: set[int] = set()
        if prescan:
            for index in range(len(self.files)):
                self._try_load(index)

    def _find_captions(self, captions) -> Path:
        if captions is not None:
            path = Path(captions)
            path = path if path.is_absolute() else self.root / path
            if not path.is_file():
                raise FileNotFoundError(f"captions file not found: {path}")
            return path
        for name in CAPTION_FILES:
            if (self.root / name).is_file():
                return self.root / name
        raise FileNotFoundError(f"no captions file in {self.root} (expected one of {', '.join(CAPTION_FILES)})")

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        """Select the random crops of this epoch (no effect with centre crops)."""
        self.epoch = int(epoch)

    @property
    def skipped(self) -> int:
        """Number of distinct unreadable image files found so far (in any worker)."""
        return int(self._bad.sum())

    @property
    def bad_files(self) -> list[str]:
        """Paths (as written in the captions file) of the unreadable images found so far."""
        return [self.files[i] for i in torch.nonzero(self._bad).flatten().tolist()]

    def path(self, index: int) -> Path:
        file = Path(self.files[index])
        return file if file.is_absolute() else self.root / file

    def _try_load(self, index: int, reraise: bool = False):
        if self._bad[index] and not reraise:
            return None
        try:
            return load_image(self.path(index))
        except (FileNotFoundError, CorruptImageError, OSError) as exc:
            self._bad[index] = True
            if index not in self._logged:
                self._logged.add(index)
                logger.warning("skipping unreadable image %s: %s", self.files[index], exc)
            if reraise:
                if isinstance(exc, (FileNotFoundError, CorruptImageError)):
                    raise
                raise CorruptImageError(f"{self.path(index)}: {exc}") from exc
            return None

    def __getitem__(self, index: int) -> dict:
        """``{"image": (3, r, r) float32 in [-1, 1], "caption": str}`` of ``index`` or of the next readable file."""
        n = len(self.files)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        if self.on_bad == "raise":
            return self._item(index, self._try_load(index, reraise=True))
        for step in range(n):
            j = (index + step) % n
            image = self._try_load(j)
            if image is not None:
                return self._item(j, image)
        raise NoUsableDataError(
            f"no readable image in {self.root}: all {n} image(s) listed in {self.captions_path.name} are missing or "
            f"unreadable (e.g. {self.files[index]}: see the warnings above); fix or replace the images"
        )

    def _item(self, index: int, image) -> dict:
        seed = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(2, dtype=np.uint64)[0]
        generator = torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
        return {"image": self.transform(image, generator), "caption": self.captions[index]}

    def __repr__(self) -> str:
        return f"ImageFolderDataset({str(self.root)!r}, {len(self)} images, {self.transform}, skipped={self.skipped})"
