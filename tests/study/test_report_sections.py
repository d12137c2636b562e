"""report.md's confidence, controls, cost and manifest sections, and the per-run timing a study records."""

from __future__ import annotations

import json
import time

import pytest
import torch

from fusedit.study import grid as study_grid
from fusedit.study import report_sections
from fusedit.study import runner as study_runner
from fusedit.study import timing as study_timing
from tests.study.test_study import Fakes, write_grid

CONTROLS = {"ground_truth": 1.0, "blur": 0.97, "blobs": 0.012, "solid": 0.0}
MANIFEST = {"commit": "abcdef0123456789", "dirty": False, "config_hash": "c" * 16, "checkpoint_hash": "d" * 16}


class RichFakes(Fakes):
    """Fakes whose scores.json carry per-image outcomes, controls and a manifest, like the real evaluation."""

    def evaluate(self, run, settings) -> dict:
        scores = super().evaluate(run, settings)
        rate = scores["overall"]
        correct = [i < rate * 60 for i in range(60)]
        scores["per_prompt"] = [
            {"prompt": f"p-{c}", "category": c, "seeds": list(range(60)), "correct": correct} for c in ("x", "y")
        ]
        scores.update(controls=CONTROLS, controls_pass=True, manifest={**MANIFEST, "steps": 2, "cfg": 2.0})
        wrong = sum(not c for c in correct)  # per category: every wrong image a wrong shape, but one a wrong count
        scores["failures"] = {c: {"count": 1, "shape": wrong - 1} for c in ("x", "y")}
        run.scores_path.write_text(json.dumps(scores))
        return scores


def fake_costs(runs, settings):
    return {
        "deep": {
            "dit_forward_gflops": 0.5,
            "text_forward_gflops": 0.25,
            "train_gflops_per_image": 1.75,
            "sample_gflops_per_image": 2.25,
        },
        "shallow": None,
    }


def test_report_has_intervals_controls_costs_timing_and_manifests(tmp_path):
    out, fakes = tmp_path / "study", RichFakes()
    grid = study_grid.load_grid(write_grid(tmp_path))
    results = study_runner.run_study(
        grid, out, train_fn=fakes.train, eval_fn=fakes.evaluate, cost_fn=fake_costs, log=lambda m: None
    )
    report = (out / "report.md").read_text()
    # the hierarchical bootstrap row of each variant and the difference from the first
    assert "| deep | 0.600 |" in report and "| shallow | 0.250 |" in report and "| deep − shallow |" in report
    assert "**shallow** (the grid's overrides: `model.fusion=shallow model.attention=cross`)" in report
    assert "## Controls" in report and "the best garbage (`blobs`) scores **0.012**" in report
    assert "| deep | – | 0.5000 | 0.2500 | 1.7500 | 2.2500 |" in report
    assert "| shallow | – | – | – | – | – |" in report
    assert "| deep | 0 | abcdef0123 | False | cccccccccccc | dddddddddddd |" in report
    # why images fail: deep's seeds have 30 and 42 of 60 images right per category, one a wrong count, the rest shape
    assert "## Why images fail" in report
    assert "| deep | 0.60 ± 0.14 | 0.02 ± 0.00 | 0.00 ± 0.00 | 0.00 ± 0.00 | 0.38 ± 0.14 | 0.00 ± 0.00 |" in report
    # every run's training and evaluation time was recorded and reported
    for result in results:
        assert result["timing_source"] == "recorded"
        assert result["metrics"]["train_min"] >= 0 and result["metrics"]["eval_min"] >= 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["costs"]["deep"]["train_gflops_per_image"] == 1.75
    assert saved["runs"][0]["correct"]["x"][:2] == [True, True]


def test_timing_accumulates_across_resumed_training(tmp_path):
    grid = study_grid.load_grid(write_grid(tmp_path))
    run = study_grid.plan_study(grid, tmp_path / "study")[0]
    run.run_dir.mkdir(parents=True)
    study_timing.add_timing(run, "train_seconds", 30.0)
    study_timing.add_timing(run, "train_seconds", 12.0)
    threads = torch.get_num_threads()
    assert study_timing.run_timing(run) == {"train_seconds": 42.0, "threads": threads, "source": "recorded"}


def test_an_interrupted_training_segment_counts_and_the_call_is_recorded(tmp_path):
    """Ctrl-C during training: the seconds trained so far are in the run's timing and the call's line says it was
    interrupted; the resumed call adds its own segment and line; a call that only reuses finished runs adds none."""
    out, fakes = tmp_path / "study", RichFakes()
    grid = study_grid.load_grid(write_grid(tmp_path))

    def interrupted(run, *, progress):
        time.sleep(0.05)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        study_runner.run_study(grid, out, train_fn=interrupted, eval_fn=fakes.evaluate, log=lambda m: None)
    first = study_grid.plan_study(grid, out)[0]
    assert study_timing.run_timing(first)["train_seconds"] >= 0.05
    for _ in range(2):  # resumed, then everything reused
        study_runner.run_study(
            grid, out, train_fn=fakes.train, eval_fn=fakes.evaluate, cost_fn=fake_costs, log=lambda m: None
        )
    assert study_timing.run_timing(first)["train_seconds"] >= 0.05  # the resumed segment added to it
    sessions = study_timing.read_sessions(out)
    assert [(s["runs"], s["finished"], s["jobs"]) for s in sessions] == [(4, False, 1), (4, True, 1)]
    report = (out / "report.md").read_text()
    assert "recorded by the study for 4 of 4 runs" in report
    assert "in 2 call(s)" in report and "(interrupted)" in report


def test_wall_time_lines_say_where_times_come_from():
    results = [{"timing_source": "recorded", "threads": 1}, {"timing_source": "file times"}]
    sessions = [{"minutes": 61.0, "runs": 2, "jobs": 2, "threads": 1, "finished": True}]
    text = " ".join(study_timing.wall_time_lines(results, sessions))
    assert "recorded by the study for 1 of 2 runs, 1 torch thread(s) per run" in text
    assert "taken from file times for 1" in text
    assert "**61 min** of wall time in 1 call(s): 61 min for 2 run(s) at 2 at a time, 1 thread(s) each." in text
    assert study_timing.wall_time_lines([], []) == []
    killed = {"minutes": None, "runs": 2, "jobs": 2, "threads": 1, "finished": False}
    text = " ".join(study_timing.wall_time_lines(results, [*sessions, killed]))
    assert "**61 min** of wall time in 1 call(s)" in text
    assert "Besides these, 1 call(s) recorded no time: killed outright" in text and "longer than this total" in text
    text = " ".join(study_timing.wall_time_lines(results, [killed]))
    assert "Whole study" not in text and "1 call(s) recorded no time" in text and "wall time is not known" in text


def test_a_call_is_on_record_from_its_start_and_completed_when_it_ends(tmp_path):
    with study_timing.study_session(tmp_path, runs=3, jobs=2, threads=1):
        (started,) = study_timing.read_sessions(tmp_path)
        assert started["minutes"] is None and not started["finished"]  # what a kill -9 now would leave
    (ended,) = study_timing.read_sessions(tmp_path)
    assert ended["minutes"] >= 0 and ended["finished"] and ended["runs"] == 3
    with study_timing.study_session(tmp_path, runs=0, jobs=1, threads=1):
        pass
    assert len(study_timing.read_sessions(tmp_path)) == 1
    old = {"started": "2026-12-01T00:00:00+00:00", "minutes": 5.0, "jobs": 1, "threads": 1, "runs": 1, "finished": True}
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / study_timing.SESSIONS_NAME).write_text(json.dumps(old) + "\n" + json.dumps(old) + "\n")
    assert len(study_timing.read_sessions(legacy)) == 2  # lines without a call id are one call each


def test_controls_section_flags_failing_or_differing_controls():
    results = [
        {"controls": CONTROLS, "controls_pass": True},
        {"controls": {**CONTROLS, "blobs": 0.2}, "controls_pass": False},
    ]
    text = "\n".join(report_sections.controls_section(results))
    assert "NOT every" in text and "differ between runs" in text
    assert report_sections.controls_section([{"controls": {}}]) == []


def test_study_manifests_name_the_commit_loaded_at_start(tmp_path, monkeypatch):
    """A commit made while a study runs must not be attributed to the code the study had loaded: git is asked once,
    when the study starts, and every evaluation's manifest names that commit."""
    import subprocess

    from fusedit.eval import manifest

    head = {"commit": "loaded-at-start"}

    def fake_git(command, **kwargs):
        stdout = head["commit"] if "rev-parse" in command else ""
        return subprocess.CompletedProcess(command, 0, stdout=stdout, stderr="")

    def train(run, *, progress):
        Fakes().train(run, progress=progress)
        head["commit"] = f"committed-while-training-{run.variant}-{run.seed}"

    monkeypatch.setattr(manifest, "_loaded_version", None)  # as in a fresh process (restored after the test)
    monkeypatch.setattr(manifest.subprocess, "run", fake_git)
    seen = []

    def evaluate(run, settings):
        seen.append(manifest.code_version()["commit"])
        return RichFakes().evaluate(run, settings)

    grid = study_grid.load_grid(write_grid(tmp_path))
    study_runner.run_study(grid, tmp_path / "s", train_fn=train, eval_fn=evaluate, log=lambda m: None)
    assert seen == ["loaded-at-start"] * 4


def test_failure_table_names_the_variants_whose_evaluations_lack_failure_counts():
    def result(variant: str, failures: bool) -> dict:
        r = {"variant": variant, "correct": {"x": [True, False, False, False]}}
        return {**r, "failures": {"x": {"shape": 3}}} if failures else r

    results = [result("deep", True), result("deep", True), result("old", True), result("old", False)]
    lines = report_sections.failure_section(results, ["deep", "old", "never-ran"])
    assert "| deep | 0.25 ± 0.00 |" in "\n".join(lines)
    assert not any(line.startswith("| old |") for line in lines)
    assert [line for line in lines if line.startswith("Not shown")] == [
        "Not shown: old, some of whose evaluations predate the failure counts "
        "(`python tools/shapes_binding.py RUN/eval-shapes` counts them from the saved images)."
    ]
    assert report_sections.failure_section([result("old", False)], ["old"]) == []
