"""The checkpoint format of single-process runs: plain files, readable without torch.distributed.

::

    run_dir/checkpoints/step-000123/
        model.safetensors     trainable weights only (model names; a trainable LLM's under ``llm.``), float32
        ema.safetensors       EMA of the same weights (absent when EMA is off)
        optimizer.pt          optimizer.state_dict() (parameters numbered in the order of the trainable weights)
        trainer_state.json    step, lr scheduler state, data position, config, metrics, file sizes
        rng.pt                python / numpy / torch CPU / CUDA RNG states and the trainer's torch.Generators

Written atomically (see :mod:`fusedit.checkpoint.layout`); every file's size is recorded and checked on load.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fusedit.atomic import fsync_dir, fsync_file
from fusedit.checkpoint.errors import CheckpointError
from fusedit.checkpoint.layout import (
    STATE_FILE,
    PathLike,
    checkpoint_dir,
    publish_checkpoint,
    read_state,
    step_name,
    verify_file_sizes,
    write_state,
)
from fusedit.checkpoint.safe_pickle import load_torch_file
from fusedit.checkpoint.verify import check_finite, check_safetensors_file

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"


@dataclass
class Checkpoint:
    """A loaded single-process checkpoint (all tensors on CPU).

    Attributes:
        path: its directory.
        step: optimiser steps completed.
        model: trainable weights ``{name: tensor}``.
        ema: EMA weights or ``None``.
        optimizer: ``optimizer.state_dict()``.
        state: the rest of ``trainer_state.json`` (``lr_scheduler``, ``data``, ``config``, ``metrics``, ...).
        rng: the RNG states (see :func:`fusedit.checkpoint.rng.capture_rng_state`).
    """

    path: Path
    step: int
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    optimizer: dict[str, Any]
    state: dict[str, Any]
    rng: dict[str, Any] = field(default_factory=dict)


def _cpu_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def save_checkpoint(
    run_dir: PathLike,
    step: int,
    *,
    model: Mapping[str, torch.Tensor],
    optimizer: Mapping[str, Any],
    state: Mapping[str, Any],
    rng: Mapping[str, Any],
    ema: Mapping[str, torch.Tensor] | None = None,
    keep: int | None = None,
) -> Path:
    """Write checkpoint ``step`` of ``run_dir`` atomically, point ``latest`` at it, prune to the newest ``keep``.

    ``state`` must be JSON-serialisable; ``step`` and the file sizes are added to it. Returns the directory.
    """
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_name(step)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    save_file(_cpu_tensors(model), str(tmp / MODEL_FILE))
    if ema is not None:
        save_file(_cpu_tensors(ema), str(tmp / EMA_FILE))
    torch.save(optimizer, tmp / OPTIMIZER_FILE)
    torch.save(dict(rng), tmp / RNG_FILE)
    names = (MODEL_FILE, EMA_FILE, OPTIMIZER_FILE, RNG_FILE)
    sizes = {name: (tmp / name).stat().st_size for name in names if (tmp / name).exists()}
    write_state(tmp, {**state, "step": step, "files": sizes})
    for name in [*sizes, STATE_FILE]:
        fsync_file(tmp / name)
    fsync_dir(tmp)

    publish_checkpoint(tmp, final, keep)
    return final


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, verified (:mod:`fusedit.checkpoint.verify`: size against the header, no
    NaN/inf); :class:`CheckpointError` naming the file when it is missing or corrupt."""
    check_safetensors_file(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error}); the file is corrupt") from None
    check_finite(tensors, str(path))
    return tensors


def load_checkpoint(path: PathLike) -> Checkpoint:
    """Load and verify a single-process checkpoint directory (see the module docstring). Tensors land on CPU.

    Raises :class:`CheckpointError` naming the file when one is missing, truncated or unreadable.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a directory")
    state = read_state(path)
    if state is None:
        raise CheckpointError(f"{path / STATE_FILE} is missing; {path} is not a complete checkpoint")
    if not isinstance(state.get("step"), int) or not isinstance(state.get("files"), dict):
        raise CheckpointError(f"{path / STATE_FILE}: expected a JSON object with an integer 'step' and a 'files' table")
    for required in (MODEL_FILE, OPTIMIZER_FILE, RNG_FILE):
        if required not in state["files"]:
            raise CheckpointError(f"{path / STATE_FILE}: its 'files' table lacks {required}")
    verify_file_sizes(path, state["files"])

    model = read_safetensors(path / MODEL_FILE)
    ema = read_safetensors(path / EMA_FILE) if EMA_FILE in state["files"] else None
    optimizer = load_torch_file(path / OPTIMIZER_FILE)
    rng = load_torch_file(path / RNG_FILE)
    if not isinstance(optimizer, dict) or "state" not in optimizer or "param_groups" not in optimizer:
        raise CheckpointError(f"{path / OPTIMIZER_FILE}: not an optimizer state_dict")
    if not isinstance(rng, dict) or "torch" not in rng:
        raise CheckpointError(f"{path / RNG_FILE}: not an RNG state (expected keys python, numpy, torch, ...)")
    step = state.pop("step")
    return Checkpoint(path=path, step=step, model=model, ema=ema, optimizer=optimizer, state=state, rng=rng)
