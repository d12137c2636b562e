"""The wall clock of a study: how long each run trained and evaluated, and how long each ``fusedit study`` call ran.

* Per run, ``<run>/study_timing.json``: ``{"train_seconds", "eval_seconds", "threads"}``. Every training segment adds
  its seconds when it ends, also when it ends by an exception (Ctrl-C, a failed step), so a run interrupted and
  resumed reports the sum of its segments. Only a process killed outright (``kill -9``, power loss) loses the
  segment it was in. ``threads`` is ``torch.get_num_threads()`` of the last segment's process.
* Per study, ``<study>/study_sessions.jsonl``: per ``fusedit study`` call that had runs to train or evaluate,
  ``{"call", "started", "minutes", "jobs", "threads", "runs", "finished"}`` (``call``: a random id, ``runs``: how
  many were pending, ``finished``: whether the call got through them, false after an interruption or a failed run).
  A line with ``"minutes": null`` is written when the call starts and a complete one when it ends; a call killed
  outright keeps only the first, so the report can say that its time is unknown instead of leaving it out of the
  total.

A run trained before a study recorded times has no ``study_timing.json``; :func:`run_timing` then falls back on its
files' modification times and says so (``"source": "file times"``), which overstate an interrupted run.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import torch

from fusedit.eval.shapes_eval import write_json_atomic
from fusedit.study.grid import PlannedRun

TIMING_NAME = "study_timing.json"
SESSIONS_NAME = "study_sessions.jsonl"


def add_timing(run: PlannedRun, key: str, seconds: float) -> None:
    """Add ``seconds`` to ``key`` of the run's ``study_timing.json`` and record this process's torch threads."""
    path = run.run_dir / TIMING_NAME
    timing = json.loads(path.read_text()) if path.is_file() else {}
    timing[key] = timing.get(key, 0.0) + seconds
    timing["threads"] = torch.get_num_threads()
    write_json_atomic(path, timing)


@contextmanager
def timed(run: PlannedRun, key: str) -> Iterator[None]:
    """Add the wall time of the ``with`` block to ``key`` of the run's timing, however the block ends."""
    start = time.perf_counter()
    try:
        yield
    finally:
        add_timing(run, key, time.perf_counter() - start)


def run_timing(run: PlannedRun) -> dict:
    """``{"train_seconds", "eval_seconds", "threads", "source"}``: what the study recorded, or — for a run trained
    before the study recorded times — the span between its files: ``config.yaml`` (written when training starts) to
    ``final/``, and ``final/`` to ``scores.json`` (exact for a run trained in one go, too long for one that was
    interrupted)."""
    path = run.run_dir / TIMING_NAME
    if path.is_file():
        return {**json.loads(path.read_text()), "source": "recorded"}
    config, final = run.run_dir / "config.yaml", run.run_dir / "final"
    if not (config.is_file() and final.exists() and run.scores_path.is_file()):
        return {}
    return {
        "train_seconds": final.stat().st_mtime - config.stat().st_mtime,
        "eval_seconds": run.scores_path.stat().st_mtime - final.stat().st_mtime,
        "source": "file times",
    }


@contextmanager
def study_session(out: Path, *, runs: int, jobs: int, threads: int | None) -> Iterator[None]:
    """Record this call in ``out/study_sessions.jsonl``: a line without minutes now, the complete line when the
    ``with`` block ends, however it ends (nothing when ``runs`` is 0: a call that only reused finished runs cost no
    study time)."""
    if runs == 0:
        yield
        return
    line = {
        "call": uuid.uuid4().hex,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "minutes": None,
        "jobs": jobs,
        "threads": threads if threads is not None else torch.get_num_threads(),
        "runs": runs,
        "finished": False,
    }
    _append_session(out, line)
    start = time.perf_counter()
    try:
        yield
        line["finished"] = True
    finally:
        _append_session(out, {**line, "minutes": (time.perf_counter() - start) / 60})


def _append_session(out: Path, line: dict) -> None:
    with open(out / SESSIONS_NAME, "a") as file:
        file.write(json.dumps(line) + "\n")


def read_sessions(out: Path) -> list[dict]:
    """One entry per recorded call of ``out/study_sessions.jsonl``, in order (empty when the study recorded none):
    a call's complete line where it wrote one, else its start line (``"minutes": None``: killed outright, or still
    running)."""
    path = out / SESSIONS_NAME
    if not path.is_file():
        return []
    calls: dict[str, dict] = {}
    for number, text in enumerate(path.read_text().splitlines()):
        if text.strip():
            line = json.loads(text)
            calls[line.get("call") or f"line {number}"] = line  # lines written before calls had ids: one each
    return list(calls.values())


def wall_time_lines(results: Sequence[dict], sessions: Sequence[dict]) -> list[str]:
    """Sentences saying how the per-run times were measured (recorded / file times, threads) and how long the whole
    study ran (from ``sessions``)."""
    lines = []
    sources = [r.get("timing_source") for r in results]
    recorded, from_files = sources.count("recorded"), sources.count("file times")
    if recorded or from_files:
        parts = []
        if recorded:
            threads = sorted({r["threads"] for r in results if r.get("threads") is not None})
            each = f", {'/'.join(map(str, threads))} torch thread(s) per run" if threads else ""
            parts.append(f"recorded by the study for {recorded} of {len(results)} runs{each}")
        if from_files:
            parts.append(
                f"taken from file times for {from_files} (`config.yaml` → `final/` → `scores.json`: too long for a "
                "run that was interrupted)"
            )
        lines.append("Per-run times: " + "; ".join(parts) + ".")
    timed_calls = [s for s in sessions if s.get("minutes") is not None]
    killed = len(sessions) - len(timed_calls)
    if timed_calls:
        total = sum(s["minutes"] for s in timed_calls)
        calls = ", ".join(
            f"{s['minutes']:.0f} min for {s['runs']} run(s) at {s['jobs']} at a time, {s['threads']} thread(s) each"
            + ("" if s["finished"] else " (interrupted)")
            for s in timed_calls
        )
        lines.append(f"Whole study: **{total:.0f} min** of wall time in {len(timed_calls)} call(s): {calls}.")
    if killed:
        lines.append(
            f"{'Besides these, ' if timed_calls else ''}{killed} call(s) recorded no time: killed outright (their runs "
            "resume in a later call) or still running, so "
            + ("the study took longer than this total." if timed_calls else "the study's wall time is not known.")
        )
    return [" ".join(lines), ""] if lines else []
