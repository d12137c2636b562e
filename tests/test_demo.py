"""The demo resumes an interrupted run of its own settings, and never resumes a run of other settings or LLM."""

from __future__ import annotations

import pytest

from fusedit.demo import set_aside_stale_run, stale_run_reason
from fusedit.experiment import load_experiment
from fusedit.train.launch import train_run

pytestmark = pytest.mark.slow


def test_stale_demo_runs_are_set_aside(tmp_path, tiny_llm_dir, demo_overrides, monkeypatch):
    overrides_for = demo_overrides
    monkeypatch.chdir(tmp_path)
    config = load_experiment("demo", overrides_for(tiny_llm_dir) + ["train.max_steps=1"])
    run = tmp_path / "runs" / "fusedit"
    assert stale_run_reason(run, config, llm_retrained=False) is None  # nothing there yet
    train_run(config, run, device="cpu", progress=False)

    assert stale_run_reason(run, config, llm_retrained=False) is None  # same settings: resume
    assert set_aside_stale_run(run, config, llm_retrained=False) is None and run.is_dir()
    changed = load_experiment("demo", overrides_for(tiny_llm_dir) + ["train.max_steps=1", "train.lr=1e-4"])
    assert stale_run_reason(run, changed, llm_retrained=False) == "it was trained with other settings"
    assert "retrained" in stale_run_reason(run, config, llm_retrained=True)

    (run / "marker.txt").write_text("first run")
    previous = set_aside_stale_run(run, changed, llm_retrained=False)
    assert previous == run.with_name("fusedit.previous") and (previous / "marker.txt").read_text() == "first run"
    assert not run.exists()
    run.mkdir()
    (run / "config.yaml").write_text("model: {kind: [not, a, kind]}\n")
    assert "cannot be read" in stale_run_reason(run, config, llm_retrained=False)
    set_aside_stale_run(run, config, llm_retrained=False)  # replaces the older .previous
    assert not (previous / "marker.txt").exists() and (previous / "config.yaml").is_file()
