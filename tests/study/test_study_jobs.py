"""`fusedit study --jobs N`: the pending runs train and evaluate N at a time in a pool of N spawned worker processes,
with the same results and report as one at a time; a failed run fails alone and is named; workers record the
parent's code version and timings; stopping the parent stops its workers.

The workers get the module-level fakes of ``fake_runs`` (they write what a real run writes), so a test costs the
start of its worker processes (the import of torch and fusedit in each), not training.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fusedit.cli import main as cli_main
from fusedit.eval import manifest
from fusedit.study import grid as study_grid
from fusedit.study import runner as study_runner
from fusedit.study import timing as study_timing
from fusedit.study.workers import RunsFailed
from tests.study import fake_runs
from tests.study.test_study import Fakes, write_grid

ROOT = Path(__file__).resolve().parents[2]
#: The code version the parent process of these tests pretends to have loaded.
PARENT_VERSION = {"package_version": "0.0-test", "commit": "commit-the-parent-loaded", "dirty": False}


def study(tmp_path: Path, out: Path, logs: list[str], **kwargs) -> list[dict]:
    grid = study_grid.load_grid(write_grid(tmp_path))
    kwargs = {"train_fn": fake_runs.train, "eval_fn": fake_runs.evaluate, **kwargs}
    return study_runner.run_study(grid, out, log=logs.append, **kwargs)


def comparable(results: list[dict], out: Path) -> str:
    """The results as JSON without what differs between two studies of the same runs: wall times, torch threads,
    the folder."""
    kept = []
    for result in results:
        metrics = {k: v for k, v in result["metrics"].items() if k not in ("train_min", "eval_min")}
        folder = str(Path(result["run_dir"]).relative_to(out))
        kept.append({**result, "metrics": metrics, "run_dir": folder, "threads": None})
    return json.dumps(kept, sort_keys=True)


def report_with_equal_times(tmp_path: Path, out: Path) -> str:
    """``report.md`` rewritten (``--report-only``) after every run's ``study_timing.json`` is set to the same wall
    times and the record of the calls is removed, with the study folder replaced by ``OUT``: what must not differ
    between two studies of the same runs."""
    for path in out.glob("runs/*/*/" + study_timing.TIMING_NAME):
        path.write_text(json.dumps({"train_seconds": 60.0, "eval_seconds": 6.0}))
    (out / study_timing.SESSIONS_NAME).unlink()  # the calls differ: one run at a time or two
    assert cli_main(["study", str(write_grid(tmp_path)), "--out", str(out), "--report-only"]) == 0
    return (out / "report.md").read_text().replace(str(out), "OUT")


def test_two_jobs_give_the_results_and_report_of_one(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "_loaded_version", dict(PARENT_VERSION))  # the parent's pinned code version
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a worker left at torch's default would use 1 thread, not 2
    one, two = tmp_path / "one", tmp_path / "two"
    logs_one: list[str] = []
    results_one = study(tmp_path, one, logs_one)
    logs: list[str] = []
    results_two = study(tmp_path, two, logs, train_fn=fake_runs.train_meeting, jobs=2, threads=2)
    assert comparable(results_two, two) == comparable(results_one, one)
    for name in ("report.md", "results.json", "plots/loss.png", "plots/scores.png", "grids/deep-colors.png"):
        assert (two / name).is_file(), name

    runs = study_grid.plan_study(study_grid.load_grid(write_grid(tmp_path)), two)
    for run in runs:
        calls = fake_runs.calls(run)
        assert [c["stage"] for c in calls] == ["train", "eval"]
        # trained and evaluated in one worker process, with the parent's code version and --threads
        assert len({c["pid"] for c in calls}) == 1 and calls[0]["pid"] != os.getpid()
        assert {c["commit"] for c in calls} == {PARENT_VERSION["commit"]}
        assert {c["threads"] for c in calls} == {2}
        timing = json.loads((run.run_dir / study_timing.TIMING_NAME).read_text())
        assert timing["train_seconds"] > 0 and timing["eval_seconds"] > 0
    assert len({fake_runs.calls(run)[0]["pid"] for run in runs}) == 2  # a pool of two workers
    assert {r["manifest"]["commit"] for r in results_two} == {PARENT_VERSION["commit"]}

    # every line of a run names it; the parent logs each start and end and how many are left
    assert "4 of 4 runs to train or evaluate, 2 at a time in worker processes, torch threads 2 each" in logs
    for label in ("run 1/4: deep seed 0", "run 2/4: shallow seed 0", "run 3/4: deep seed 1", "run 4/4: shallow seed 1"):
        mine = [line for line in logs if line.startswith(label + " — ")]
        assert [line.split(" — ")[1].split(" ")[0] for line in mine] == [
            "started",
            "training",
            "evaluating",
            "finished",
        ]
    assert sorted(int(line.split("; ")[-1].split(" ")[0]) for line in logs if " — finished " in line) == [0, 1, 2, 3]
    assert logs[-1].startswith("all 4 runs done in ")
    assert report_with_equal_times(tmp_path, two) == report_with_equal_times(tmp_path, one)


def test_a_failed_run_fails_alone_and_is_named(tmp_path):
    out, logs = tmp_path / "study", []
    with pytest.raises(RunsFailed) as failed:
        study(tmp_path, out, logs, train_fn=fake_runs.train_failing, jobs=2)
    message = str(failed.value)
    assert message.startswith("2 of 4 runs failed (the other runs finished; no report was written")
    assert "  run 2/4: shallow seed 0: ValueError: planted failure of shallow seed 0" in message.splitlines()
    assert "  run 3/4: deep seed 1: its worker process was killed by SIGKILL" in message
    assert any("Traceback" in line and "planted failure" in line for line in logs)  # the worker's traceback
    runs = {(r.variant, r.seed): r for r in study_grid.plan_study(study_grid.load_grid(write_grid(tmp_path)), out)}
    for key in (("deep", 0), ("shallow", 1)):  # the others ran to the end
        assert runs[key].evaluated and (runs[key].run_dir / study_timing.TIMING_NAME).is_file()
    assert not runs[("shallow", 0)].trained and not runs[("deep", 1)].trained
    assert not (out / "report.md").exists()

    # a rerun trains only the failed runs, then reports
    fakes = Fakes()
    study(tmp_path, out, [], train_fn=fakes.train, eval_fn=fakes.evaluate)
    assert sorted(fakes.trained) == [("deep", 1), ("shallow", 0)]
    assert (out / "report.md").is_file()


def test_cli_exits_non_zero_naming_the_failed_runs(tmp_path, monkeypatch, capsys):
    seen = {}

    def failing_study(grid, out, **kwargs):
        seen.update(kwargs)
        raise RunsFailed([("run 2/4: shallow seed 0", "ValueError: boom")], 4)

    monkeypatch.setattr(study_runner, "run_study", failing_study)
    grid = write_grid(tmp_path)
    assert cli_main(["study", str(grid), "--out", str(tmp_path / "s"), "--jobs", "2", "--threads", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: 1 of 4 runs failed") and "  run 2/4: shallow seed 0: ValueError: boom" in err
    assert seen["jobs"] == 2 and seen["threads"] == 1


def test_jobs_are_checked(tmp_path, capsys):
    grid = write_grid(tmp_path)
    for bad in ("0", "-1", "two"):
        with pytest.raises(SystemExit) as exited:
            cli_main(["study", str(grid), "--jobs", bad, "--dry-run"])
        assert exited.value.code == 2
        assert "argument --jobs: expected" in capsys.readouterr().err
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="jobs must be a positive integer"):
            study(tmp_path, tmp_path / "s", [], jobs=bad)
    with pytest.raises(TypeError, match="with jobs=2, train_fn must be picklable.*module-level"):
        study(tmp_path, tmp_path / "s", [], train_fn=lambda run, progress: None, jobs=2)
    assert not (tmp_path / "s").exists()


def test_dry_run_says_how_many_run_at_a_time(tmp_path, capsys):
    grid = write_grid(tmp_path)
    assert cli_main(["study", str(grid), "--out", str(tmp_path / "s"), "--dry-run", "--jobs", "2"]) == 0
    assert (
        "4 of 4 runs to train or evaluate, up to 2 at a time in worker processes (--jobs 2)" in capsys.readouterr().out
    )
    assert cli_main(["study", str(grid), "--out", str(tmp_path / "s"), "--dry-run"]) == 0
    assert "4 of 4 runs to train or evaluate, one at a time (--jobs 1)" in capsys.readouterr().out


def test_finished_runs_are_reused_with_jobs(tmp_path):
    """With every run done, ``jobs=2`` starts no worker and reports again."""
    out = tmp_path / "study"
    study(tmp_path, out, [])
    logs: list[str] = []
    study(tmp_path, out, logs, jobs=2)
    assert sum(" — done before, reusing " in line for line in logs) == 4
    assert not any("worker" in line for line in logs)
    assert all(
        len(fake_runs.calls(run)) == 2 for run in study_grid.plan_study(study_grid.load_grid(write_grid(tmp_path)), out)
    )


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie left for a parent that does not reap it counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


#: The study the test stops. It first gives SIGINT Python's KeyboardInterrupt handler, as a terminal's foreground
#: job has it: a test run started in the background without job control (a CI script's ``cmd &``) has SIGINT
#: ignored, which its children inherit, and then Ctrl-C stops no study, with or without --jobs.
STUDY_SCRIPT = """
import signal
import sys
from pathlib import Path
signal.signal(signal.SIGINT, signal.default_int_handler)
from fusedit.study import grid, runner
from tests.study import fake_runs
study = grid.load_grid(sys.argv[1])
runner.run_study(study, Path(sys.argv[2]), train_fn=fake_runs.train_until_stopped, eval_fn=fake_runs.evaluate,
                 jobs=2, log=lambda m: print(m, flush=True))
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "sigkill"])
def test_stopping_the_parent_stops_its_workers(tmp_path, how):
    """Ctrl-C (SIGINT to the process group), SIGTERM or SIGKILL of the study leaves no worker training."""
    out, output = tmp_path / "study", tmp_path / "output.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    with open(output, "wb") as sink:  # a file, not a pipe: a surviving worker would hold a pipe open
        parent = subprocess.Popen(
            [sys.executable, "-c", STUDY_SCRIPT, str(write_grid(tmp_path)), str(out)],
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: for the Ctrl-C, and for the clean-up below
        )
    try:
        deadline = time.monotonic() + 600  # the workers' start (importing torch) is slow on a busy CPU
        while len(list(out.glob("pid-*"))) < 2:
            assert parent.poll() is None and time.monotonic() < deadline, output.read_text()
            time.sleep(0.2)
        workers = [int(p.read_text()) for p in out.glob("pid-*")]
        assert all(alive(pid) for pid in workers)
        if how == "ctrl-c":
            os.killpg(parent.pid, signal.SIGINT)
        else:
            parent.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        parent.wait(timeout=60)
        if how == "sigkill":  # the workers notice that their parent has gone, and exit
            deadline = time.monotonic() + 30
            while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
                time.sleep(0.2)
            # the call is on record, without a time
            assert [s["minutes"] for s in study_timing.read_sessions(out)] == [None]
        # after Ctrl-C or SIGTERM, the parent stopped its workers before it exited
        assert not any(alive(pid) for pid in workers), output.read_text()
        if how != "sigkill":
            stopping = (
                "interrupted: stopping 2 worker process(es); running: run 1/4: deep seed 0, run 2/4: shallow seed 0"
            )
            assert stopping in output.read_text()
            # the two runs stopped mid-training kept the seconds they trained, and the call is recorded as interrupted
            for variant in ("deep", "shallow"):
                timing = json.loads((out / "runs" / variant / "seed-0" / study_timing.TIMING_NAME).read_text())
                assert timing["train_seconds"] > 0, variant
            assert [s["finished"] for s in study_timing.read_sessions(out)] == [False]
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever happened, leave no process of the test behind
            os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()
