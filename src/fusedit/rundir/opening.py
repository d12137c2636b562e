"""Opening a run directory for training (rank 0, under its lock): start a new run, move an old one aside, or check a
resume's config, before anything in the run is written.

* ``--no-resume`` on a directory that holds a run moves the whole run to ``<run>.previous-<UTC timestamp>`` (one
  rename: a kill at any moment leaves the old run whole, in one place or the other) and starts a new one.
* A resume checks its config against the run's (:func:`fusedit.rundir.config_guard.resume_changes`); a refused one
  leaves every file as it was.
* Temporary files that a killed writer left in the run (``.final.tmp-<pid>``, ``.final.old-<pid>``, a half-written
  ``config.yaml``) are removed: whoever holds the lock is the only writer.
* ``config.yaml`` is written once, when the run is created.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusedit.atomic import fsync_dir
from fusedit.rundir import lock
from fusedit.rundir.config_guard import CONFIG_FILE, resume_changes, write_config_once

logger = logging.getLogger("fusedit.train")

#: Names of temporaries a killed writer may leave in a run directory (its own lock makes them stale).
_STALE = re.compile(r"^\.(final|config\.yaml|metrics\.jsonl|config_changes\.jsonl)\.(tmp|old)(-\d+)?$")


@dataclass
class RunOpening:
    """What :func:`open_run` did.

    Attributes:
        created: the run had no ``config.yaml`` (a new run).
        moved_to: where ``--no-resume`` moved the previous run, if it did.
        changes: ``{key: (old, new)}`` this resume makes to the run's config (to record once it has resumed).
        allowed: the ``--allow-change`` keys.
    """

    created: bool
    moved_to: Path | None = None
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    allowed: tuple[str, ...] = ()


def holds_a_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds anything besides its lock file."""
    return run_dir.is_dir() and any(p.name != lock.LOCK_FILE for p in run_dir.iterdir())


def previous_name(run_dir: Path) -> Path:
    """A free ``<run>.previous-<YYYYmmdd-HHMMSS>[-N]`` next to ``run_dir``."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = run_dir.with_name(f"{run_dir.name}.previous-{stamp}")
    number = 1
    while target.exists():
        number += 1
        target = run_dir.with_name(f"{run_dir.name}.previous-{stamp}-{number}")
    return target


def move_aside(run_dir: Path) -> Path:
    """Rename the run in ``run_dir`` to :func:`previous_name` and take the lock of a new, empty ``run_dir``."""
    target = previous_name(run_dir)
    os.rename(run_dir, target)
    fsync_dir(run_dir.parent)
    lock.forget_moved(run_dir, target)
    lock.acquire(run_dir)
    return target


def remove_stale_run_temporaries(run_dir: Path) -> list[Path]:
    """Delete what killed writers left at the top of ``run_dir`` (see :data:`_STALE`); returns what was removed."""
    if not run_dir.is_dir():
        return []
    stale = [p for p in run_dir.iterdir() if _STALE.match(p.name)]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return stale


def open_run(run_dir: Path, config: Any, *, resume: bool, allow_change: tuple[str, ...] = ()) -> RunOpening:
    """Prepare ``run_dir`` for training ``config`` (an ExperimentConfig); the caller holds the lock (see the module
    docstring). Raises :class:`~fusedit.rundir.config_guard.RunConfigChangeError` before touching anything when a
    resume would change the run's config in a refused way."""
    moved_to = None
    if not resume and holds_a_run(run_dir):
        moved_to = move_aside(run_dir)
        logger.warning("--no-resume: the previous run in %s was moved to %s; starting a new run", run_dir, moved_to)
    changes: dict[str, tuple[Any, Any]] = {}
    if (run_dir / CONFIG_FILE).is_file():
        changes = resume_changes(run_dir, config, allow_change)
    removed = remove_stale_run_temporaries(run_dir)
    if removed:
        logger.info("removed %s left by an interrupted process", ", ".join(p.name for p in removed))
    created = write_config_once(run_dir, config)
    return RunOpening(created=created, moved_to=moved_to, changes=changes, allowed=tuple(allow_change))
