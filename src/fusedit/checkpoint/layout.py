"""Where checkpoints live in a run directory, the ``latest`` pointer, and the checks both formats share.

Layout::

    run_dir/checkpoints/step-000123/      one complete checkpoint (files: see fusedit.checkpoint.single / .sharded)
    run_dir/checkpoints/latest            text file naming the newest complete checkpoint ("step-000123")
    run_dir/checkpoints/.step-*.tmp-*     a checkpoint being written (removed on the next start if a crash left it)

A checkpoint is written into a hidden temporary sibling, fsynced, renamed into place, and only then is ``latest``
replaced (atomically), so a crash at any point leaves the previous checkpoint and pointer intact. Every checkpoint
holds ``trainer_state.json`` with the size of each of its files, so truncated files are detected on load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusedit.atomic import replace_dir, write_text_atomic
from fusedit.checkpoint.errors import CheckpointError

STATE_FILE = "trainer_state.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")

PathLike = str | os.PathLike


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


def publish_checkpoint(tmp: Path, final: Path, keep: int | None = None) -> None:
    """Move a completely written checkpoint directory ``tmp`` to ``final``, point ``latest`` at it, then keep only
    the newest ``keep`` checkpoints (``None``: keep all).

    Re-saving a step (e.g. after resuming from it) moves the old directory aside first, so a crash at any moment
    leaves either the old or the new checkpoint complete; the pointer is written last.
    """
    root = final.parent
    replace_dir(tmp, final)
    write_text_atomic(root / LATEST, final.name + "\n")
    if keep is not None:
        for path in list_checkpoints(root.parent)[:-keep]:
            if path != final:
                shutil.rmtree(path)


def remove_stale_temporaries(run_dir: PathLike) -> list[Path]:
    """Delete temporary directories left by crashed checkpoint writes; returns what was removed."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name)]
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    return stale


def find_latest(run_dir: PathLike) -> Path | None:
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
                f"them (fusedit train --resume-from PATH, or resume_from=...) or remove them"
            )
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


def _step_of(path: Path) -> int:
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else -1


def resume_candidates(run_dir: PathLike, problems: list[str]) -> list[Path]:
    """The checkpoints a resume tries, in order: the one ``latest`` names, then the older step directories, newest
    first. When the pointer is missing or unusable, every step directory, newest first (and the pointer's problem
    is appended to ``problems``). Empty when the run has no checkpoint."""
    existing = list_checkpoints(run_dir)
    try:
        latest = find_latest(run_dir)
    except CheckpointError as error:
        problems.append(str(error))
        return list(reversed(existing))
    if latest is None:
        return []
    return [latest, *(p for p in reversed(existing) if _step_of(p) < _step_of(latest))]


def state_json_default(value: Any) -> Any:
    """``json.dumps`` fallback for checkpoint state files: tensors, numpy scalars and paths."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{STATE_FILE}: cannot serialise {type(value).__name__}")


def write_state(directory: Path, state: Mapping[str, Any]) -> None:
    """Write ``trainer_state.json`` into ``directory`` (not yet fsynced)."""
    (directory / STATE_FILE).write_text(json.dumps(dict(state), indent=2, default=state_json_default))


def read_state(path: Path) -> dict[str, Any] | None:
    """``path/trainer_state.json`` as a dict; ``None`` when the file does not exist."""
    file = path / STATE_FILE
    if not file.is_file():
        return None
    try:
        state = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{file}: not valid JSON ({error})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return state


def file_sizes(root: Path) -> dict[str, int]:
    """``{relative path: size}`` of every file under ``root``."""
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def verify_file_sizes(path: Path, sizes: Mapping[str, int]) -> None:
    """Raise :class:`CheckpointError` when a file of the checkpoint ``path`` is missing or has another size than
    ``trainer_state.json`` recorded (truncated or overwritten)."""
    for name, size in sizes.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing (listed in {STATE_FILE} with {size} bytes)")
        actual = file.stat().st_size
        if actual != size:
            raise CheckpointError(
                f"{file} has {actual} bytes, {STATE_FILE} recorded {size}: the file is truncated or was overwritten"
            )
