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


def test_the_demo_runs_end_to_end_with_its_controls_scored_during_pretraining(tmp_path, monkeypatch, capsys):
    """``fusedit demo``'s stages on a shrunken world and model: the controls it starts with the world (scored in a
    second process while the tiny LLM trains) are the controls of its evaluation, and its summary is written."""
    import json
    from dataclasses import replace

    import fusedit.demo as demo
    from fusedit.data.shapes import ShapesWorld
    from fusedit.eval.shapes_eval import SamplingPlan
    from fusedit.eval.shapes_report import run_controls
    from tests.conftest import TINY_LLM, overrides_for

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo, "TinyLLMConfig", lambda: replace(TINY_LLM, steps=2))
    small = replace(demo.EVAL_SETTINGS, per_prompt=1, num_inference_steps=1, min_per_category=2, allow_small=True)
    monkeypatch.setattr(demo, "EVAL_SETTINGS", small)
    # the demo's own prompt expansion stays on (its tiny LLM continues "caption ." in its pretraining language)
    overrides = [o for o in overrides_for("unused") if not o.startswith(("text.llm=", "text.expansion=", "text.max"))]
    overrides += ["data.shapes.size=64", "data.shapes.held_out_fraction=0.01", "data.shapes.max_objects=2"]
    summary = demo.run_demo(tmp_path / "out", device="cpu", steps=2, overrides=overrides, images_per_prompt=1)

    run = tmp_path / "out" / "fusedit"
    assert json.loads((run / "eval" / "shapes.json").read_text())["overall"] == summary["overall"]
    assert (run / "demo_grid.png").is_file() and (run / "final").is_dir()
    config = load_experiment("demo", overrides)
    world = ShapesWorld(config.data.shapes, config.data.resolution)
    inline = run_controls(world, SamplingPlan.for_world(world, small).expanded, seed=small.seed)
    assert summary["controls"] == {name: row["overall"] for name, row in inline.items()}
    assert "controls" in capsys.readouterr().out
    assert load_experiment("demo", overrides).text.expansion == "greedy"
