"""Crash-safe writes: a file or a directory appears complete under its final name, or not at all.

Every writer here goes through a hidden temporary sibling, fsyncs what it wrote, then renames it into place
(``os.replace``, atomic on POSIX) and fsyncs the parent directory. Used by checkpoints, ``final/``, exports and run
configs; it imports nothing from fusedit.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def fsync_file(path: Path) -> None:
    """Flush ``path``'s contents to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename or a new file inside it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every directory (``root`` included)."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            fsync_file(path)
    for directory in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
        fsync_dir(directory)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a fsynced temporary file and ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the completely written directory ``tmp`` to ``final``; an existing ``final`` is moved aside first and
    deleted after, so a crash at any moment leaves either the old or the new directory complete."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old)


def _cpu_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def write_dir_atomic(directory: Path, files: Mapping[str, Any]) -> None:
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
            raise TypeError(f"write_dir_atomic: don't know how to write {name!r} ({type(content).__name__})")
        fsync_file(target)
    fsync_dir(tmp)
    replace_dir(tmp, directory)
