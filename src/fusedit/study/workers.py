"""Running a study's pending runs N at a time in a pool of N worker processes (``fusedit study --jobs N``).

Conventions:

* A :class:`Job` is one run's work as a labelled call ``fn(*args, log=...)``; ``fn`` and ``args`` must pickle
  (``fn`` a module-level function). Workers are processes of the ``spawn`` start method (``fork`` is unsafe once
  torch has started its threads); each runs one job at a time and takes the next waiting one when it is done, so at
  most ``workers`` jobs run at a time, started in the order given.
* A worker sends its log lines to the parent through its own pipe, and the parent passes them to its ``log`` (one
  writer, so lines do not tear); records of the worker's ``fusedit.*`` loggers (INFO and up) and of other loggers
  (WARNING and up) go the same way, prefixed with the job's label. The parent logs when each job starts, finishes or
  fails and how many are left.
* A job that raises fails alone; so does one whose process dies (killed, out of memory): the dead worker is
  replaced for the jobs still waiting. When every job has ended, :func:`run_jobs` raises :class:`RunsFailed`
  naming every failed job and its error.
* Stopping: workers ignore SIGINT (Ctrl-C reaches the whole process group; the parent stops them), the parent turns
  SIGTERM into ``SystemExit(143)`` while jobs run (when it runs in the main thread), and on any exception or
  interruption it terminates its workers (SIGTERM, then SIGKILL after ``STOP_GRACE_S``) before re-raising. A worker
  whose parent dies without that (``kill -9``) exits by itself.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

#: Seconds a terminated (or, at the end, a released) worker gets to exit before it is killed.
STOP_GRACE_S = 10.0


@dataclass
class Job:
    """One call to run in a worker: ``fn(*args, log=log)``, named ``label`` in the log and in errors."""

    label: str
    fn: Callable[..., Any]
    args: tuple = ()


@dataclass
class _Worker:
    process: Any  # multiprocessing.context.SpawnProcess
    conn: Connection
    index: int | None = None  # the job it runs (None: idle)
    started: float = 0.0


class RunsFailed(RuntimeError):
    """Some runs failed after the others finished: ``failures`` is ``[(label, error), ...]`` in the jobs' order."""

    def __init__(self, failures: list[tuple[str, str]], total: int) -> None:
        self.failures = failures
        lines = [
            f"{len(failures)} of {total} runs failed (the other runs finished; no report was written; run the same "
            f"command again to retry them: finished runs are reused, a failed one resumes from its last checkpoint):"
        ]
        lines += [f"  {label}: {error}" for label, error in failures]
        super().__init__("\n".join(lines))


class _Pool:
    """The parent's side: the workers, the waiting jobs and what each ended job gave."""

    def __init__(self, jobs: Sequence[Job], size: int, log: Callable[[str], None]) -> None:
        self.jobs, self.size, self.log = jobs, size, log
        self.context = multiprocessing.get_context("spawn")
        self.waiting = deque(range(len(jobs)))
        self.workers: list[_Worker] = []
        self.values: dict[int, Any] = {}
        self.failures: dict[int, str] = {}

    def busy(self) -> list[_Worker]:
        return [w for w in self.workers if w.index is not None]

    def running(self) -> list[str]:
        """Labels of the jobs the workers run."""
        return [self.jobs[w.index].label for w in self.workers if w.index is not None]

    def assign(self) -> None:
        """Give waiting jobs to idle workers, starting workers up to ``size``."""
        for worker in self.workers:
            if worker.index is None and self.waiting:
                self.give(worker, self.waiting.popleft())
        while self.waiting and len(self.workers) < self.size:
            reader, writer = self.context.Pipe()
            process = self.context.Process(target=_worker_main, args=(writer,), name="fusedit-study-worker")
            process.start()
            writer.close()  # the worker holds the only other end: its exit, however it ends, is EOF here
            self.workers.append(_Worker(process, reader))
            self.give(self.workers[-1], self.waiting.popleft())

    def give(self, worker: _Worker, index: int) -> None:
        worker.index, worker.started = index, time.perf_counter()
        self.log(f"{self.jobs[index].label} — started in worker process {worker.process.pid}")
        try:
            worker.conn.send(self.jobs[index])
        except (BrokenPipeError, ConnectionResetError):
            self.ended(worker)

    def receive(self, worker: _Worker) -> None:
        """Handle one message of ``worker``: a log line, its job's outcome, or the end of its pipe."""
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            self.ended(worker)
            return
        if message[0] == "log":
            self.log(message[1])
        else:
            self.outcome(worker, *message)

    def outcome(self, worker: _Worker, kind: str, value: Any, trace: str | None = None) -> None:
        """Record ``worker``'s job as done (``value``) or failed (``value``: the error, ``trace``: its traceback)."""
        index, worker.index = worker.index, None
        if index is None:
            raise RuntimeError(f"worker process {worker.process.pid} sent a {kind!r} outcome without a job")
        minutes = (time.perf_counter() - worker.started) / 60
        left = f"{len(self.waiting) + len(self.busy())} of {len(self.jobs)} runs left"
        if kind == "done":
            self.values[index] = value
            self.log(f"{self.jobs[index].label} — finished in {minutes:.1f} min; {left}")
            return
        self.failures[index] = value
        self.log(f"{self.jobs[index].label} — FAILED after {minutes:.1f} min: {value}; {left}")
        if trace:
            self.log(trace.rstrip())

    def ended(self, worker: _Worker) -> None:
        """``worker``'s process has ended: forget it, and fail the job it was running."""
        worker.process.join()
        worker.conn.close()
        self.workers.remove(worker)
        if worker.index is not None:
            self.outcome(worker, "failed", _died(worker.process.exitcode))

    def release(self) -> None:
        """Tell the idle workers to exit, and wait for them."""
        for worker in self.workers:
            with contextlib.suppress(OSError):
                worker.conn.send(None)
        _stop(self.workers, grace=STOP_GRACE_S)


def run_jobs(jobs: Sequence[Job], workers: int, log: Callable[[str], None] = print) -> list[Any]:
    """Run ``jobs`` in a pool of at most ``workers`` processes; returns each job's value, in order.

    Raises :class:`RunsFailed` after every job has ended when one or more failed.
    """
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    pool = _Pool(jobs, workers, log)
    with _sigterm_raises():
        try:
            while pool.waiting or pool.busy():
                pool.assign()
                for conn in wait([w.conn for w in pool.workers]):
                    pool.receive(next(w for w in pool.workers if w.conn is conn))
        except BaseException as error:
            busy = ", ".join(pool.running())
            why = "interrupted" if isinstance(error, (KeyboardInterrupt, SystemExit)) else type(error).__name__
            _stop(pool.workers, grace=0.0)
            log(f"{why}: stopping {len(pool.workers)} worker process(es); running: {busy or 'none'}")
            raise
        pool.release()
    if pool.failures:
        raise RunsFailed([(jobs[i].label, pool.failures[i]) for i in sorted(pool.failures)], len(jobs))
    return [pool.values[i] for i in range(len(jobs))]


def _died(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"its worker process was killed by {name} before it finished (out of memory?)"
    return f"its worker process exited with code {exitcode} before it finished"


def _stop(workers: list[_Worker], *, grace: float) -> None:
    """Wait ``grace`` seconds for ``workers`` to exit, then terminate them (SIGTERM, and SIGKILL after
    ``STOP_GRACE_S``)."""
    for worker in workers:
        worker.process.join(grace)
        if worker.process.is_alive():
            worker.process.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for worker in workers:
        worker.process.join(max(0.0, deadline - time.monotonic()))
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While jobs run, SIGTERM raises ``SystemExit(143)`` in the parent, so that it stops its workers first (only
    the main thread can set signal handlers; elsewhere the handler is left alone)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------------------------------------------
# In the worker
# ----------------------------------------------------------------------------------------------------------------


def _worker_main(conn: Connection) -> None:
    """Run the jobs the parent sends until it sends ``None``; for each, send ``("log", line)`` messages, then
    ``("done", value)`` or ``("failed", error, traceback)``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops the workers
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # ... with SIGTERM, which unwinds the job (its finally blocks)
    _exit_with_parent()
    lock = threading.RLock()  # log records may come from other threads than the job's

    def send(message: tuple) -> None:
        with lock:
            conn.send(message)

    def log(line: str) -> None:
        send(("log", line))

    forward = _forward_logging(log)
    while True:
        try:
            data = conn.recv_bytes()
        except EOFError:  # the parent has gone
            return
        try:
            job = pickle.loads(data)
            if job is None:
                return
            forward.label = job.label
            send(("done", job.fn(*job.args, log=log)))
        except Exception as error:
            send(("failed", f"{type(error).__name__}: {error}", traceback.format_exc()))


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    """A worker told to stop raises ``SystemExit(143)`` in its job, so that what the job does on the way out (a run
    adds the seconds it trained to its timing) is done; the parent kills a worker that takes too long."""
    raise SystemExit(128 + signum)


class _ForwardHandler(logging.Handler):
    def __init__(self, log: Callable[[str], None]) -> None:
        super().__init__(logging.INFO)
        self.label, self.send = "worker", log

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.send(f"{self.label} — {record.getMessage()}")
        except Exception:
            self.handleError(record)


def _forward_logging(log: Callable[[str], None]) -> _ForwardHandler:
    """Send this worker's log records to the parent: ``fusedit.*`` from INFO, other loggers from WARNING."""
    handler = _ForwardHandler(log)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("fusedit").setLevel(logging.INFO)
    return handler


def _exit_with_parent() -> None:
    """Exit this worker as soon as its parent process has ended (a parent killed with SIGKILL cannot stop it)."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()  # returns when the parent's end of the spawn pipe closes: the parent has exited
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
