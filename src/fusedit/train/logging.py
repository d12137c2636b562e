"""Training logs: console progress (a bar on a terminal, a line every few percent when piped), TensorBoard
scalars, ``metrics.jsonl`` and PNG sample grids.

Files in a run directory:

* ``run_dir/metrics.jsonl``: one JSON object per logged step, ``{"step", "loss", "lr", "grad_norm", "img_per_s",
  ...}`` — the format plots and studies read (see :func:`read_metrics`). On resume, lines after the resumed step
  (written by the interrupted run after its last checkpoint) are dropped, so each step appears once.
* ``run_dir/logs/``: TensorBoard event files (scalars under ``train/<name>``).
* ``run_dir/samples/step-000123.png``: sample grids (:func:`save_image_grid`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fusedit.atomic import write_text_atomic
from fusedit.progress import progress_bar

METRICS_FILE = "metrics.jsonl"
logger = logging.getLogger("fusedit.train")


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl`` in order (empty if the file does not exist)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not a JSON line ({error})") from None
    return records


def truncate_metrics(run_dir: str | os.PathLike, after_step: int) -> int:
    """Drop the records of ``metrics.jsonl`` with ``step > after_step`` (atomically); returns how many were dropped.

    A partially written last line (a crash mid-write) is dropped too.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if record.get("step", 0) > after_step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        write_text_atomic(path, "".join(line + "\n" for line in kept))
    return dropped


def image_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> Image.Image:
    """Tile ``images`` ``(N, 3, H, W)`` (or ``(N, 1, H, W)``) with values in ``[-1, 1]`` into one RGB PIL image.

    ``nrow``: images per row (default ``ceil(sqrt(N))``); ``padding``: black pixels between tiles.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"image_grid expects images of shape (N, 3, H, W) or (N, 1, H, W), got {tuple(images.shape)}")
    n, c, h, w = images.shape
    if n == 0:
        raise ValueError("image_grid: no images")
    if not torch.isfinite(images).all():
        raise ValueError("image_grid: images contain NaN or inf")
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if c == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    grid = np.zeros((rows * h + (rows + 1) * padding, nrow * w + (nrow + 1) * padding, 3), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y : y + h, x : x + w] = pixels[i].permute(1, 2, 0).numpy()
    return Image.fromarray(grid)


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None) -> Path:
    """Save :func:`image_grid` of ``images`` ``(N, 3, H, W)`` in ``[-1, 1]`` as a PNG at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, nrow).save(path, format="PNG")
    return path


class TrainLogger:
    """Console progress bar + TensorBoard + ``metrics.jsonl`` for one training run.

    Args:
        run_dir: the run directory.
        max_steps: total optimiser steps (for the bar and its ETA).
        initial_step: steps already done (on resume).
        progress: show progress (loss and img/s in its postfix, with an ETA; see :func:`fusedit.progress.progress_bar`).
        tensorboard: write TensorBoard scalars to ``run_dir/logs``.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        max_steps: int,
        initial_step: int = 0,
        *,
        progress: bool = True,
        tensorboard: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        dropped = truncate_metrics(self.run_dir, initial_step)
        if dropped:
            self.info(f"dropped {dropped} metrics.jsonl record(s) after step {initial_step} (from an interrupted run)")
        self._metrics = open(self.run_dir / METRICS_FILE, "a")
        self._bar = progress_bar(max_steps, initial=initial_step, desc="train", unit="step") if progress else None
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.run_dir / "logs"), purge_step=initial_step + 1)

    def info(self, message: str) -> None:
        """A human-readable line: above the progress bar when there is one, else through the ``fusedit.train``
        logger (never both, so a configured logging handler does not print it twice)."""
        bar = getattr(self, "_bar", None)
        if bar is not None:
            bar.write(message)
        else:
            logger.info(message)

    def advance(self, steps: int = 1) -> None:
        """Move the progress bar."""
        if self._bar is not None:
            self._bar.update(steps)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record ``metrics`` of ``step`` in ``metrics.jsonl``, TensorBoard and the bar's postfix."""
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if self._writer is not None:
            for name, value in metrics.items():
                self._writer.add_scalar(f"train/{name}", float(value), step)
        if self._bar is not None:
            shown = {k: f"{float(metrics[k]):.4g}" for k in ("loss", "img_per_s") if k in metrics}
            self._bar.set_postfix(shown, refresh=False)

    def log_image(self, step: int, tag: str, images: torch.Tensor) -> Path:
        """Save a PNG grid of ``images`` ``(N, 3, H, W)`` in [-1, 1] to ``run_dir/samples/step-XXXXXX.png``."""
        path = save_image_grid(images, self.run_dir / "samples" / f"step-{step:06d}.png")
        if self._writer is not None:
            self._writer.add_image(f"samples/{tag}", np.asarray(Image.open(path)), step, dataformats="HWC")
        return path

    def close(self) -> None:
        """Flush and close every sink."""
        if not self._metrics.closed:
            self._metrics.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class SilentLog:
    """The logger of ranks other than 0: records nothing."""

    def info(self, message: str) -> None:
        pass

    def advance(self, steps: int = 1) -> None:
        pass

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        pass

    def log_image(self, step: int, tag: str, images: torch.Tensor) -> None:
        pass

    def close(self) -> None:
        pass
