"""Item 4 of issue 17: one owner per run directory; a second one is refused naming the owner; a dead owner's lock is
taken over with a message."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fusedit.rundir import lock
from fusedit.rundir.lock import RunDirLockedError, hold_run_dir

HOLDER = """
import sys, time
from fusedit.rundir.lock import acquire
acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def start_holder(run_dir):
    """A real process that takes the lock and sleeps (killed by the test)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_owner_is_refused_naming_the_first_and_a_killed_owner_is_taken_over(tmp_path, caplog):
    run = tmp_path / "run"
    holder = start_holder(run)
    try:
        with pytest.raises(RunDirLockedError) as error:
            lock.acquire(run)
        message = str(error.value)
        assert f"pid {holder.pid} on host" in message and "another --run-dir" in message and "\n" not in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel released the lock; the file still names the dead owner: taken over with a message
    assert json.loads((run / lock.LOCK_FILE).read_text())["pid"] == holder.pid
    with caplog.at_level("WARNING", logger="fusedit.train"):
        with hold_run_dir(run):  # (read through the holder's descriptor: closing another one would release it)
            assert lock._owner_of_fd(lock._HELD[run.resolve()].fd)["pid"] == os.getpid()
    assert f"left by pid {holder.pid}" in caplog.text and "no longer running" in caplog.text
    assert not (run / lock.LOCK_FILE).exists()  # a clean release removes the file


def test_lock_is_reentrant_in_one_process_and_skipped_on_other_ranks(tmp_path):
    run = tmp_path / "run"
    with hold_run_dir(run):
        with hold_run_dir(run):  # train_run holds it, then the Trainer it built
            assert lock.holds(run)
        assert lock.holds(run) and (run / lock.LOCK_FILE).exists()
    assert not lock.holds(run)
    with hold_run_dir(tmp_path / "other", enabled=False):  # ranks other than 0
        assert not (tmp_path / "other").exists()


def test_released_lock_is_free_for_the_next_process(tmp_path):
    run = tmp_path / "run"
    with hold_run_dir(run):
        pass
    holder = start_holder(run)  # would fail if the lock had stayed taken
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    started = time.time()
    with hold_run_dir(run):
        assert time.time() - started < 5
