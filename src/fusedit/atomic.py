"""Crash-safe writes: a file or a directory appears complete under its final name, or not at all.

Every writer here goes through a hidden temporary sibling, fsyncs what it wrote, then renames it into place
(``os.replace``, atomic on POSIX) and fsyncs the parent directory. Used by checkpoints, ``final/``, exports and run
configs; it imports nothing from fusedit.

A full disk (``ENOSPC``) while writing raises :class:`DiskFullError` naming the path, after the temporary sibling is
removed; what was there before stays complete, so a run can resume once space is freed.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


class DiskFullError(OSError):
    """No space left on the device while writing ``filename``; the message says so and what to do."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(errno.ENOSPC, f"no space left on device at {path}; free space and resume", str(path))

    def __str__(self) -> str:
        return str(self.strerror)


#: A failed write with less free space than this on the target's file system counts as a full disk (torch.save
#: reports a full disk as "unexpected pos", without an errno).
LOW_SPACE_BYTES = 1 << 20


def _free_bytes(path: Path) -> int | None:
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def is_disk_full(error: BaseException, path: str | os.PathLike | None = None) -> bool:
    """Whether ``error`` (or an error it was raised from) is a full disk: ``ENOSPC``/``EDQUOT``, a writer's wrapped
    "No space left on device" (safetensors), or, with ``path``, a failed write where that file system has less than
    :data:`LOW_SPACE_BYTES` free."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(current):
            return True
        current = current.__cause__ or current.__context__
    if path is not None and isinstance(error, (OSError, RuntimeError)):
        free = _free_bytes(Path(path))
        return free is not None and free < LOW_SPACE_BYTES
    return False


@contextmanager
def naming_full_disk(path: str | os.PathLike, cleanup: Path | None = None) -> Iterator[None]:
    """Turn a full disk inside the block into :class:`DiskFullError` naming ``path``; remove ``cleanup`` (a
    temporary file or folder) on any error so that a failed write does not keep the space it took."""
    try:
        yield
    except BaseException as error:
        full = not isinstance(error, DiskFullError) and is_disk_full(error, path)
        if cleanup is not None:
            if cleanup.is_dir():
                shutil.rmtree(cleanup, ignore_errors=True)
            else:
                cleanup.unlink(missing_ok=True)
        if full:
            raise DiskFullError(path) from error
        raise


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
    with naming_full_disk(path, cleanup=tmp), open(tmp, "w") as f:
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
    with naming_full_disk(directory, cleanup=tmp):
        tmp.mkdir()
        for name, content in files.items():
            _write_file(tmp / name, content)
        fsync_dir(tmp)
    replace_dir(tmp, directory)


def _write_file(target: Path, content: Any) -> None:
    """Write one file of :func:`write_dir_atomic` and fsync it."""
    name = target.name
    if name.endswith(".safetensors"):
        save_file(_cpu_tensors(content), str(target))
    elif name.endswith(".pt"):
        torch.save(content, target)
    elif isinstance(content, str):
        target.write_text(content)
    else:
        raise TypeError(f"write_dir_atomic: don't know how to write {name!r} ({type(content).__name__})")
    fsync_file(target)
