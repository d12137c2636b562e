"""`fusedit study --reuse-from`: a run another study trained with the identical config and text model is copied in
and evaluated here instead of trained again; anything that differs (a config field, the LLM's bytes) is trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fusedit.cli import main as cli_main
from fusedit.study import grid as study_grid
from fusedit.study import reuse as study_reuse
from fusedit.study import runner as study_runner
from fusedit.text.tiny_llm import MARKER_NAME
from tests.study.test_study import GRID, OVERALL, Fakes

#: A second study: ``deep`` is the toy grid's ``deep`` (other study name, other LLM folder), ``slow`` is not.
OTHER = """
name: other
base: demo
overrides: [text.llm=LLM]
budget: {train.max_steps: 3, train.batch_size: 4}
seeds: [0, 1]
variants:
  deep: [model.fusion=deep]
  slow: [model.fusion=deep, train.lr=0.5]
eval: {per_prompt: 1, seed: 7, steps: 2, cfg: 2.0}
"""


def make_llm(folder: Path, weights: bytes, marker: str = "{}") -> Path:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "config.json").write_text('{"hidden_size": 8}')
    (folder / MARKER_NAME).write_text(marker)
    return folder


def study(tmp_path: Path, name: str, text: str, llm: Path, reuse_from=(), logs=None) -> tuple[Fakes, Path]:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text.replace("text.llm=/nonexistent/llm", "text.llm=LLM").replace("LLM", str(llm)))
    fakes, out = Fakes(), tmp_path / name
    OVERALL.update({("slow", 0): 0.1, ("slow", 1): 0.2})
    study_runner.run_study(
        study_grid.load_grid(path),
        out,
        train_fn=fakes.train,
        eval_fn=fakes.evaluate,
        cost_fn=lambda runs, settings: {},  # costs load the model, which the fake weights are not
        log=(logs if logs is not None else []).append,
        reuse_from=list(reuse_from),
    )
    return fakes, out


def test_identical_runs_are_copied_and_evaluated_not_trained(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the report names the sources relative to the working directory
    first_llm = make_llm(tmp_path / "llm-a", b"weights", marker='{"old": 1}')
    _, first = study(tmp_path, "toy", GRID, first_llm)
    trained = first / "runs" / "deep" / "seed-0" / "final" / "model.safetensors"
    save_file({"weight": torch.arange(6.0)}, str(trained))
    (first / "runs" / "deep" / "seed-0" / "study_timing.json").unlink()  # as a run trained before studies timed
    # the same bytes in another folder, with another pretraining marker: the same text model
    same_llm = make_llm(tmp_path / "llm-b", b"weights", marker='{"new": 2}')
    logs: list[str] = []
    fakes, out = study(tmp_path, "other", OTHER, same_llm, reuse_from=[first], logs=logs)
    assert sorted(fakes.trained) == [("slow", 0), ("slow", 1)]
    assert ("deep", 0) in fakes.evaluated and ("deep", 1) in fakes.evaluated
    run_dir = out / "runs" / "deep" / "seed-0"
    assert (run_dir / "final" / "model.safetensors").read_bytes() == trained.read_bytes()
    assert (run_dir / "metrics.jsonl").is_file()
    provenance = json.loads((run_dir / study_reuse.REUSED_NAME).read_text())
    assert provenance["source"] == str((first / "runs" / "deep" / "seed-0").resolve())
    # the copied run carries this study's own config, so that it resumes and reloads as this study's run
    for config in (run_dir / "config.yaml", run_dir / "final" / "config.yaml"):
        text = config.read_text()
        assert "name: deep-seed0" in text and str(same_llm) in text and str(first_llm) not in text
    assert sum("reusing the identical run" in line for line in logs) == 2
    report = (out / "report.md").read_text()
    assert "Reused runs: 2 of 4 runs" in report and "deep seed 1 ← `toy/runs/deep/seed-1`" in report
    # seed 1's source recorded its training time, which the copy takes; seed 0's recorded none: the copy takes the
    # span of the source's files, and says so
    recorded = json.loads((first / "runs" / "deep" / "seed-1" / "study_timing.json").read_text())
    copied = json.loads((out / "runs" / "deep" / "seed-1" / "study_timing.json").read_text())
    assert copied["train_seconds"] == recorded["train_seconds"] and "train_seconds_from" not in copied
    timing = json.loads((run_dir / "study_timing.json").read_text())
    assert timing["train_seconds"] >= 0 and timing["train_seconds_from"] == "file times of the source run"
    assert "1 of them from the source's file times" in report
    results = json.loads((out / "results.json").read_text())["runs"]
    assert {r["variant"]: r["reused_from"] is not None for r in results} == {"deep": True, "slow": False}

    # a second call finds every run finished: nothing trained, nothing copied again
    again, _ = study(tmp_path, "other", OTHER, same_llm, reuse_from=[first])
    assert again.trained == [] and again.evaluated == []


def test_another_text_model_or_config_is_trained(tmp_path):
    _, first = study(tmp_path, "toy", GRID, make_llm(tmp_path / "llm-a", b"weights"))
    other_llm = make_llm(tmp_path / "llm-b", b"other weights")
    fakes, out = study(tmp_path, "other", OTHER, other_llm, reuse_from=[first])
    assert sorted(fakes.trained) == [("deep", 0), ("deep", 1), ("slow", 0), ("slow", 1)]
    assert not list(out.glob("runs/*/*/" + study_reuse.REUSED_NAME))

    changed = OTHER.replace("train.max_steps: 3", "train.max_steps: 4")
    fakes, _ = study(tmp_path, "changed", changed, make_llm(tmp_path / "llm-c", b"weights"), reuse_from=[first])
    assert ("deep", 0) in fakes.trained


def test_a_run_this_study_started_is_not_replaced(tmp_path):
    llm = make_llm(tmp_path / "llm", b"weights")
    _, first = study(tmp_path, "toy", GRID, llm)
    started = tmp_path / "other" / "runs" / "deep" / "seed-0"
    started.mkdir(parents=True)
    fakes, out = study(tmp_path, "other", OTHER, llm, reuse_from=[first])
    assert ("deep", 0) in fakes.trained and ("deep", 1) not in fakes.trained
    assert not (started / study_reuse.REUSED_NAME).exists()


def test_cli_names_bad_sources_and_shows_reusable_runs(tmp_path, capsys):
    llm = make_llm(tmp_path / "llm", b"weights")
    _, first = study(tmp_path, "toy", GRID, llm)
    grid = tmp_path / "other.yaml"
    grid.write_text(OTHER.replace("LLM", str(llm)))
    out = tmp_path / "other"
    assert cli_main(["study", str(grid), "--out", str(out), "--dry-run", "--reuse-from", str(tmp_path / "nope")]) == 2
    assert "--reuse-from takes study folders" in capsys.readouterr().err
    assert cli_main(["study", str(grid), "--out", str(out), "--dry-run", "--reuse-from", str(first)]) == 0
    text = capsys.readouterr().out
    assert "deep seed 0 [to reuse from" in text and "slow seed 0 [to train]" in text


def test_llm_fingerprint_reads_bytes_not_paths(tmp_path):
    a = make_llm(tmp_path / "a", b"w", marker="1")
    b = make_llm(tmp_path / "b", b"w", marker="2")
    c = make_llm(tmp_path / "c", b"v")
    assert study_reuse.llm_fingerprint(str(a)) == study_reuse.llm_fingerprint(str(b))
    assert study_reuse.llm_fingerprint(str(a)) != study_reuse.llm_fingerprint(str(c))
    assert study_reuse.llm_fingerprint("google/gemma-2-2b") == "name:google/gemma-2-2b"


@pytest.mark.parametrize("leftover", [True, False])
def test_adoption_is_atomic(tmp_path, leftover):
    """An interrupted copy leaves only a hidden staging folder, which the next adoption replaces."""
    llm = make_llm(tmp_path / "llm", b"weights")
    _, first = study(tmp_path, "toy", GRID, llm)
    staging = tmp_path / "other" / "runs" / "deep" / ".seed-0.adopting"
    if leftover:
        staging.mkdir(parents=True)
        (staging / "half-copied").write_text("x")
    fakes, out = study(tmp_path, "other", OTHER, llm, reuse_from=[first])
    assert ("deep", 0) not in fakes.trained and not staging.exists()
    assert not (out / "runs" / "deep" / "seed-0" / "half-copied").exists()
