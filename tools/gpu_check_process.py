"""Running one command of the GPU check: its own session, a timeout that kills the whole process tree (torchrun
workers included), peak RSS from ``wait4``, the GPU's peak used memory from ``nvidia-smi``, and capped logs.

Standard library only (see ``tools/gpu_check.py``).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

from gpu_check_commands import REPO

KILL_GRACE_SECONDS = 10.0


def _children_of(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc; empty where there is none)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    out, stack = [], [pid]
    while stack:
        for child in parents.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def _signal_tree(pid: int, sig: int) -> None:
    """Send ``sig`` to the process group of ``pid`` (started with a new session) and to each descendant by id (torchrun
    workers may sit in their own sessions)."""
    targets = _children_of(pid)
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for child in targets:
        try:
            os.kill(child, sig)
        except (ProcessLookupError, PermissionError):
            pass


class GpuMemoryPoller:
    """Peak of ``nvidia-smi``'s used memory of GPU 0 while a step runs (whole device: CUDA context, cache and all)."""

    def __init__(self, enabled: bool, period: float = 0.5):
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.period, self.peak_mib = period, None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                ).stdout
                value = float(out.strip().splitlines()[0])
                self.peak_mib = value if self.peak_mib is None else max(self.peak_mib, value)
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass
            self._stop.wait(self.period)

    def __enter__(self):
        if self.enabled:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)


def run_command(argv: list[str], env: dict, timeout: float, stdout_path: Path, stderr_path: Path) -> dict:
    """Run ``argv`` in its own session; kill its whole tree at ``timeout``. Returns returncode, timed_out, seconds and
    the peak RSS of the process tree (``wait4``: the largest of the process and its waited-for descendants)."""
    started = time.monotonic()
    with open(stdout_path, "ab") as out, open(stderr_path, "ab") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=REPO, start_new_session=True)
        timed_out, status, usage = False, None, None
        deadline, killed_at = started + timeout, None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            now = time.monotonic()
            if now >= deadline and killed_at is None:
                timed_out, killed_at = True, now
                _signal_tree(proc.pid, signal.SIGTERM)
            elif killed_at is not None and now >= killed_at + KILL_GRACE_SECONDS:
                _signal_tree(proc.pid, signal.SIGKILL)
                killed_at = math.inf  # sent once
            time.sleep(0.1)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if timed_out:  # stragglers that left the group
        _signal_tree(proc.pid, signal.SIGKILL)
    return {
        "returncode": proc.returncode,
        "timed_out": timed_out,
        "seconds": time.monotonic() - started,
        "peak_rss_gib": usage.ru_maxrss / 2**20 if usage else None,
    }


LOG_CAP_BYTES = (256 * 1024, 1280 * 1024)  # head and tail of one step's output kept in gpu_check.log


def capped_log(data: bytes) -> bytes:
    """A step's output for the combined log, at most about 1.5 MB (the device tool returns files up to 16 MB)."""
    head, tail = LOG_CAP_BYTES
    if len(data) <= head + tail:
        return data
    return data[:head] + f"\n[... {len(data) - head - tail} bytes cut ...]\n".encode() + data[-tail:]


def output_tail(text: str, lines: int = 40) -> str:
    rows = [row for row in text.replace("\r", "\n").splitlines() if row.strip()]
    return "\n".join(rows[-lines:])


def planted_command(kind: str, python: str) -> list[str]:
    if kind == "hang":
        return [python, "-c", "import time; print('planted hang', flush=True); time.sleep(3600)"]
    return [python, "-c", "import sys; print('planted failure', file=sys.stderr); sys.exit(3)"]
