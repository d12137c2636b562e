"""Atomic, self-checking training checkpoints.

Layout of a run directory::

    run_dir/checkpoints/step-000123/
        model.safetensors     trainable weights only (model names; a trainable LLM's under ``llm.``), float32
        ema.safetensors       EMA of the same weights (absent when EMA is off)
        optimizer.pt          optimizer.state_dict()
        trainer_state.json    step, lr scheduler state, data position, config, metrics, file sizes
        rng.pt                python / numpy / torch CPU / CUDA RNG states and the trainer's torch.Generators
    run_dir/checkpoints/latest      text file naming the newest complete checkpoint ("step-000123")

A checkpoint is written into a hidden temporary sibling directory, every file and the directory are fsynced, then
the directory is renamed into place (atomic on POSIX) and only then is ``latest`` replaced (atomically). A crash at
any point leaves the previous checkpoint and pointer intact. ``trainer_state.json`` records every file's size, so
truncated files are detected on load. Older checkpoints beyond ``keep`` are deleted after the pointer moved.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fusedit.train.errors import CheckpointError

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.json"
RNG_FILE = "rng.pt"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")

PathLike = Union[str, os.PathLike]


@dataclass
class Checkpoint:
    """A loaded checkpoint (all tensors on CPU).

    Attributes:
        path: its directory.
        step: optimiser steps completed.
        model: trainable weights ``{name: tensor}``.
        ema: EMA weights or ``None``.
        optimizer: ``optimizer.state_dict()``.
        state: the rest of ``trainer_state.json`` (``lr_scheduler``, ``data``, ``config``, ``metrics``, ...).
        rng: the RNG states (see :func:`capture_rng_state`).
    """

    path: Path
    step: int
    model: dict[str, torch.Tensor]
    ema: Optional[dict[str, torch.Tensor]]
    optimizer: dict[str, Any]
    state: dict[str, Any]
    rng: dict[str, Any] = field(default_factory=dict)


def checkpoint_dir(run_dir: PathLike) -> Path:
    """``run_dir/checkpoints``."""
    return Path(run_dir) / "checkpoints"


def step_name(step: int) -> str:
    """``step-000123`` (zero-padded to 6 digits; longer numbers are kept whole)."""
    return f"step-{step:06d}"


def list_checkpoints(run_dir: PathLike) -> list[Path]:
    """The complete (renamed-into-place) step directories of ``run_dir``, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


# --------------------------------------------------------------------------------------------------------------------
# RNG state
# --------------------------------------------------------------------------------------------------------------------


def capture_rng_state(generators: Mapping[str, torch.Generator] = {}, cuda_devices: str = "all") -> dict[str, Any]:
    """Python, numpy, torch CPU and CUDA RNG states plus the given generators' states.

    ``cuda_devices``: ``all`` (every visible device, a single-process run) or ``current`` (only the current device:
    under torchrun each process owns one GPU and must not touch the others).
    """
    cuda = None
    if cuda_devices == "all" and torch.cuda.is_available():
        cuda = torch.cuda.get_rng_state_all()
    elif cuda_devices == "current" and torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state()
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "generators": {name: g.get_state() for name, g in generators.items()},
    }


def restore_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] = {}) -> None:
    """Inverse of :func:`capture_rng_state` (either CUDA form); every generator named here must be in ``state``."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):
            torch.cuda.set_rng_state_all(cuda)
        else:
            torch.cuda.set_rng_state(cuda)
    saved = state.get("generators", {})
    missing = sorted(set(generators) - set(saved))
    if missing:
        raise CheckpointError(f"{RNG_FILE}: no state for the trainer's generator(s) {missing}; saved: {sorted(saved)}")
    for name, g in generators.items():
        g.set_state(saved[name])


# --------------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------------


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _cpu_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a fsynced temporary file and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_weights_dir(directory: Path, files: Mapping[str, Any]) -> None:
    """Write ``files`` (name -> content) into ``directory`` atomically (temporary sibling, fsync, rename).

    Content types: a ``dict[str, Tensor]`` for ``*.safetensors``, a string for text files, anything
    ``torch.save``-able for ``*.pt``. An existing ``directory`` is replaced.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, content in files.items():
        target = tmp / name
        if name.endswith(".safetensors"):
            save_file(_cpu_tensors(content), str(target))
        elif name.endswith(".pt"):
            torch.save(content, target)
        elif isinstance(content, str):
            target.write_text(content)
        else:
            raise TypeError(f"write_weights_dir: don't know how to write {name!r} ({type(content).__name__})")
        _fsync_file(target)
    _fsync_dir(tmp)
    old = None
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        os.replace(directory, old)
    os.replace(tmp, directory)
    _fsync_dir(directory.parent)
    if old is not None:
        shutil.rmtree(old)


def publish_checkpoint(tmp: Path, final: Path, keep: Optional[int] = None) -> None:
    """Move a completely written checkpoint directory ``tmp`` to ``final``, point ``latest`` at it, then keep only
    the newest ``keep`` checkpoints (``None``: keep all).

    Re-saving a step (e.g. after resuming from it) moves the old directory aside first, so a crash at any moment
    leaves either the old or the new checkpoint complete; the pointer is written last.
    """
    root = final.parent
    if final.exists():
        old = root / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    write_text_atomic(root / LATEST, final.name + "\n")
    if keep is not None:
        for path in list_checkpoints(root.parent)[:-keep]:
            if path != final:
                shutil.rmtree(path)


def save_checkpoint(
    run_dir: PathLike,
    step: int,
    *,
    model: Mapping[str, torch.Tensor],
    optimizer: Mapping[str, Any],
    state: Mapping[str, Any],
    rng: Mapping[str, Any],
    ema: Optional[Mapping[str, torch.Tensor]] = None,
    keep: Optional[int] = None,
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
    sizes = {name: (tmp / name).stat().st_size for name in (MODEL_FILE, EMA_FILE, OPTIMIZER_FILE, RNG_FILE)
             if (tmp / name).exists()}
    payload = {**state, "step": step, "files": sizes}
    (tmp / STATE_FILE).write_text(json.dumps(payload, indent=2, default=state_json_default))
    for name in list(sizes) + [STATE_FILE]:
        _fsync_file(tmp / name)
    _fsync_dir(tmp)

    publish_checkpoint(tmp, final, keep)
    return final


def remove_stale_temporaries(run_dir: PathLike) -> list[Path]:
    """Delete temporary directories left by crashed checkpoint writes; returns what was removed."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name)]
    for p in stale:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return stale


def state_json_default(value: Any) -> Any:
    """``json.dumps`` fallback for checkpoint state files: tensors, numpy scalars and paths."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{STATE_FILE}: cannot serialise {type(value).__name__}")


# --------------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------------


def find_latest(run_dir: PathLike) -> Optional[Path]:
    """The checkpoint ``run_dir/checkpoints/latest`` names; ``None`` if the run has no checkpoint yet.

    Raises :class:`CheckpointError` if the pointer is unreadable or names a missing directory, or if step
    directories exist without a pointer (then pass the checkpoint explicitly).
    """
    root = checkpoint_dir(run_dir)
    pointer = root / LATEST
    if not pointer.exists():
        existing = list_checkpoints(run_dir)
        if existing:
            raise CheckpointError(
                f"{pointer} is missing but {root} holds {[p.name for p in existing]}; the pointer is written last, "
                f"so the newest directory may be complete but was never confirmed. Resume explicitly from one of "
                f"them (resume_from=...) or remove them")
        return None
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{pointer}: cannot read the latest-checkpoint pointer ({error})") from None
    if not _STEP_DIR.match(name):
        raise CheckpointError(f"{pointer}: expected a checkpoint name like 'step-000123', found {name[:80]!r}")
    target = root / name
    if not target.is_dir():
        raise CheckpointError(f"{pointer} names {name!r}, but {target} does not exist")
    return target


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises many types for truncated/garbled pickles and zips
        raise CheckpointError(f"{path}: cannot be loaded with torch.load ({type(error).__name__}: {error})") from None


def load_checkpoint(path: PathLike) -> Checkpoint:
    """Load and verify a checkpoint directory (see the module docstring). Tensors land on CPU.

    Raises :class:`CheckpointError` naming the file when one is missing, truncated or unreadable.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a directory")
    state_path = path / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"{state_path} is missing; {path} is not a complete checkpoint")
    try:
        state = json.loads(state_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{state_path}: not valid JSON ({error})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or not isinstance(state.get("files"), dict):
        raise CheckpointError(f"{state_path}: expected a JSON object with an integer 'step' and a 'files' table")

    for required in (MODEL_FILE, OPTIMIZER_FILE, RNG_FILE):
        if required not in state["files"]:
            raise CheckpointError(f"{state_path}: its 'files' table lacks {required}")
    for name, size in state["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing (listed in {STATE_FILE} with {size} bytes)")
        actual = file.stat().st_size
        if actual != size:
            raise CheckpointError(f"{file} has {actual} bytes, {STATE_FILE} recorded {size}: the file is truncated "
                                  f"or was overwritten")

    model = _load_safetensors(path / MODEL_FILE)
    ema = _load_safetensors(path / EMA_FILE) if EMA_FILE in state["files"] else None
    optimizer = _torch_load(path / OPTIMIZER_FILE)
    rng = _torch_load(path / RNG_FILE)
    if not isinstance(optimizer, dict) or "state" not in optimizer or "param_groups" not in optimizer:
        raise CheckpointError(f"{path / OPTIMIZER_FILE}: not an optimizer state_dict")
    if not isinstance(rng, dict) or "torch" not in rng:
        raise CheckpointError(f"{path / RNG_FILE}: not an RNG state (expected keys python, numpy, torch, ...)")
    step = state.pop("step")
    return Checkpoint(path=path, step=step, model=model, ema=ema, optimizer=optimizer, state=state, rng=rng)
