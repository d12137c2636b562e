"""Module-level fakes of a study run's training and evaluation, for ``run_study(jobs=N)``: worker processes receive
``train_fn``/``eval_fn`` by pickling, so they must be module-level functions, not the recording ``Fakes`` of
``test_study`` (whose calls a worker could not report back).

They write what ``test_study.Fakes`` writes (``final/``, ``config.yaml``, ``metrics.jsonl``, ``scores.json``, a
grid PNG) plus the evaluation manifest's code version, and append what each call saw to ``fake-calls.jsonl`` in the
run directory: the stage, the process id, the code version's commit and torch's number of threads.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import torch

from fusedit.eval.manifest import code_version
from fusedit.study.grid import PlannedRun
from tests.study.test_study import Fakes

CALLS = "fake-calls.jsonl"
#: Seconds ``train_meeting`` waits for the other seed-0 run to be training at the same time.
MEET_TIMEOUT_S = 600.0  # generous: a worker's start (importing torch) is slow on a busy CPU


def train(run: PlannedRun, *, progress: bool) -> None:
    _record(run, "train")
    Fakes().train(run, progress=progress)


def evaluate(run: PlannedRun, settings) -> dict:
    _record(run, "eval")
    scores = Fakes().evaluate(run, settings)
    scores["manifest"] = code_version()  # as evaluate_shapes records it
    run.scores_path.write_text(json.dumps(scores))
    return scores


def train_meeting(run: PlannedRun, *, progress: bool) -> None:
    """``train``; a seed-0 run first waits until the other seed-0 run is training too (two at a time, or a timeout)."""
    if run.seed == 0:
        here = _study_dir(run) / f"training-{run.variant}"
        here.touch()
        others = [p for p in _study_dir(run).glob("training-*") if p != here]
        deadline = time.monotonic() + MEET_TIMEOUT_S
        while not others:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{run.variant} seed 0 trained alone for {MEET_TIMEOUT_S} s")
            time.sleep(0.05)
            others = [p for p in _study_dir(run).glob("training-*") if p != here]
    train(run, progress=progress)


def train_failing(run: PlannedRun, *, progress: bool) -> None:
    """``train``, except that shallow seed 0 raises and deep seed 1 kills its own process (as the kernel's
    out-of-memory killer would)."""
    if (run.variant, run.seed) == ("shallow", 0):
        raise ValueError("planted failure of shallow seed 0")
    if (run.variant, run.seed) == ("deep", 1):
        os.kill(os.getpid(), signal.SIGKILL)
    train(run, progress=progress)


def train_until_stopped(run: PlannedRun, *, progress: bool) -> None:
    """Write ``pid-<variant>-<seed>`` (this process's id) in the study folder, then train for ten minutes (sleep)."""
    (_study_dir(run) / f"pid-{run.variant}-{run.seed}").write_text(str(os.getpid()))
    time.sleep(600)


def calls(run: PlannedRun) -> list[dict]:
    path = run.run_dir / CALLS
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _study_dir(run: PlannedRun) -> Path:
    return run.run_dir.parents[2]  # OUT/runs/<variant>/seed-<seed>


def _record(run: PlannedRun, stage: str) -> None:
    run.run_dir.mkdir(parents=True, exist_ok=True)
    call = {"stage": stage, "pid": os.getpid(), "commit": code_version()["commit"], "threads": torch.get_num_threads()}
    with open(run.run_dir / CALLS, "a") as file:
        file.write(json.dumps(call) + "\n")
