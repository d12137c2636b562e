"""An advisory lock on a run directory: one process group trains in it at a time.

The lock is ``run_dir/.fusedit.lock``, held with a POSIX record lock (``fcntl.lockf``: released by the kernel when its
holder exits, even after ``kill -9``, and not inherited by forked children such as DataLoader workers, which may
outlive a killed trainer by a few seconds) and naming its owner inside (``{"pid", "host", "started", "command"}``)
so that a refused second trainer can say who holds the run. A lock file whose owner is gone (a killed trainer) is
taken over, with a message naming the previous owner. Under torchrun rank 0 holds the lock for the whole process group.

The lock is reentrant within a process (:func:`hold_run_dir` nested for the same directory takes it once), so that
``train_run`` and the ``Trainer`` it builds can both hold it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

LOCK_FILE = ".fusedit.lock"
logger = logging.getLogger("fusedit.train")


class RunDirLockedError(RuntimeError):
    """Another live process owns the run directory (the message names it and what to do)."""


@dataclass
class _Held:
    fd: int
    path: Path
    depth: int = 1


#: Locks held by this process, by resolved run directory.
_HELD: dict[Path, _Held] = {}


def lock_path(run_dir: str | os.PathLike) -> Path:
    """``run_dir/.fusedit.lock``."""
    return Path(run_dir) / LOCK_FILE


def read_owner(path: Path) -> dict:
    """The owner recorded in a lock file (``{}`` when empty or unreadable). Never call it in the process holding
    the lock: closing any descriptor of the file releases a POSIX lock (the holder reads through its own, see
    :func:`_owner_of_fd`)."""
    try:
        return _parse_owner(path.read_bytes())
    except OSError:
        return {}


def _owner_of_fd(fd: int) -> dict:
    return _parse_owner(os.pread(fd, 65536, 0))


def _parse_owner(raw: bytes) -> dict:
    try:
        owner = json.loads(raw.decode() or "{}")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return owner if isinstance(owner, dict) else {}


def describe_owner(owner: dict) -> str:
    """``pid 123 on host h (since 2026-01-01 12:00:00 UTC)``."""
    since = owner.get("started")
    when = f" (since {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(since))})" if since else ""
    return f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}{when}"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_record() -> str:
    return json.dumps(
        {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": " ".join(sys.argv)[:300]}
    )


def _open_locked(path: Path) -> int:
    """Open ``path`` and take its exclusive lock; the file is the one at ``path`` when this returns."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                owner = read_owner(path)
                raise RunDirLockedError(
                    f"{path.parent} is in use by another fusedit process ({describe_owner(owner)}); wait for it to "
                    f"finish or stop it, or train in another --run-dir"
                ) from None
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file its previous holder unlinked after we opened it
            return fd
        os.close(fd)


def acquire(run_dir: str | os.PathLike) -> None:
    """Take the lock of ``run_dir`` (created if needed) for this process; see the module docstring."""
    run_dir = Path(run_dir)
    key = run_dir.resolve()
    held = _HELD.get(key)
    if held is not None:
        held.depth += 1
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = lock_path(run_dir)
    fd = _open_locked(path)
    previous = _owner_of_fd(fd)
    if previous and previous.get("pid") != os.getpid():
        logger.warning(
            "taking over the lock of %s left by %s, which is no longer running", run_dir, describe_owner(previous)
        )
    os.ftruncate(fd, 0)
    os.pwrite(fd, _owner_record().encode(), 0)
    os.fsync(fd)
    _HELD[key] = _Held(fd, path)


def release(run_dir: str | os.PathLike) -> None:
    """Give the lock of ``run_dir`` back (the lock file is removed when the outermost holder releases it)."""
    key = Path(run_dir).resolve()
    held = _HELD.get(key)
    if held is None:
        return
    held.depth -= 1
    if held.depth > 0:
        return
    del _HELD[key]
    try:
        if held.path.exists() and os.stat(held.path).st_ino == os.fstat(held.fd).st_ino:
            held.path.unlink()
    finally:
        os.close(held.fd)


def forget_moved(run_dir: str | os.PathLike, moved_to: Path) -> None:
    """The locked ``run_dir`` was renamed to ``moved_to``: drop its lock (the file inside ``moved_to`` is removed)."""
    key = Path(run_dir).resolve()
    held = _HELD.pop(key, None)
    if held is None:
        return
    try:
        (moved_to / LOCK_FILE).unlink(missing_ok=True)
    finally:
        os.close(held.fd)


def holds(run_dir: str | os.PathLike) -> bool:
    """Whether this process holds the lock of ``run_dir``."""
    return Path(run_dir).resolve() in _HELD


@contextmanager
def hold_run_dir(run_dir: str | os.PathLike, enabled: bool = True) -> Iterator[None]:
    """Hold the lock of ``run_dir`` inside the block (nothing when ``enabled`` is false: ranks other than 0)."""
    if not enabled:
        yield
        return
    acquire(run_dir)
    try:
        yield
    finally:
        release(run_dir)
