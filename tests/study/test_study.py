"""`fusedit study`: grid parsing and checks, resumability (finished runs reused), report table, plots and grids.

Training and evaluation are replaced by fakes that write what the real ones write (final/, config.yaml,
metrics.jsonl, scores.json, grid PNGs), so these tests take seconds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fusedit.cli import main as cli_main
from fusedit.config import ConfigError
from fusedit.study import grid as study_grid
from fusedit.study import report as study_report
from fusedit.study import runner as study_runner
from fusedit.train.launch import save_run_config
from fusedit.train.logging import save_image_grid

GRID = """
name: toy
base: demo
overrides: [text.llm=/nonexistent/llm]
budget: {train.max_steps: 3, train.batch_size: 4}
seeds: [0, 1]
variants:
  deep: [model.fusion=deep]
  shallow: [model.fusion=shallow, model.attention=cross]
eval: {per_prompt: 1, seed: 7, steps: 2, cfg: 2.0}
"""

#: Fake accuracy of (variant, seed).
OVERALL = {("deep", 0): 0.5, ("deep", 1): 0.7, ("shallow", 0): 0.2, ("shallow", 1): 0.3}


def write_grid(tmp_path: Path, text: str = GRID) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return path


class Fakes:
    """Fake train/eval that record their calls."""

    def __init__(self):
        self.trained: list[tuple[str, int]] = []
        self.evaluated: list[tuple[str, int]] = []

    def train(self, run: study_grid.PlannedRun, *, progress: bool) -> None:
        self.trained.append((run.variant, run.seed))
        save_run_config(run.config, run.run_dir)
        (run.run_dir / "final").mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"step": s, "loss": 1.0 / s + run.seed * 0.01, "img_per_s": 10.0}) for s in (1, 2, 3)]
        (run.run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")

    def evaluate(self, run: study_grid.PlannedRun, settings) -> dict:
        self.evaluated.append((run.variant, run.seed))
        assert settings.per_prompt == 1 and settings.num_inference_steps == 2 and settings.guidance_scale == 2.0
        run.eval_dir.mkdir(parents=True, exist_ok=True)
        save_image_grid(torch.zeros(2, 3, 8, 8), run.eval_dir / "grid-colors.png")
        overall = OVERALL[(run.variant, run.seed)]
        scores = {
            "suite": "shapes",
            "overall": overall,
            "settings": {
                "per_prompt": settings.per_prompt,
                "seed": settings.seed,
                "min_per_category": settings.min_per_category,
                "num_inference_steps": 2,
                "guidance_scale": 2.0,
                "negative_prompt": "",
            },
            "accuracy": {"colors": overall},
            "correct": {"colors": 1},
            "total": {"colors": 2},
            "num_images": 2,
            "fd_pixels": 1.0 - overall,
            "grids": {"colors": "grid-colors.png"},
        }
        run.scores_path.write_text(json.dumps(scores))
        return scores


def run(grid_path: Path, out: Path, fakes: Fakes, logs: list[str] | None = None):
    logs = [] if logs is None else logs
    return study_runner.run_study(
        study_grid.load_grid(grid_path), out, train_fn=fakes.train, eval_fn=fakes.evaluate, log=logs.append
    )


def test_study_trains_evaluates_and_reports(tmp_path):
    out, fakes, logs = tmp_path / "study", Fakes(), []
    results = run(write_grid(tmp_path), out, fakes, logs)
    assert sorted(fakes.trained) == sorted(OVERALL) and sorted(fakes.evaluated) == sorted(OVERALL)
    assert len(results) == 4
    # progress across the whole study, seed-major
    assert any(line.startswith("run 1/4: deep seed 0") for line in logs)
    assert any(line.startswith("run 4/4: shallow seed 1") for line in logs)
    # every run got the same budget and its own seed
    configs = {
        (r.variant, r.seed): r.config for r in study_grid.plan_study(study_grid.load_grid(write_grid(tmp_path)), out)
    }
    assert {c.train.max_steps for c in configs.values()} == {3}
    assert configs[("shallow", 1)].train.seed == 1 and configs[("shallow", 1)].model.attention == "cross"

    report = (out / "report.md").read_text()
    # mean ± sample std over the two seeds: deep 0.6 ± 0.141, shallow 0.25 ± 0.071
    assert "| deep | 0.600 ± 0.141 |" in report
    assert "| shallow | 0.250 ± 0.071 |" in report
    assert "Welch" in report and "fusedit study" in report and "model.fusion=shallow model.attention=cross" in report
    for png in ("plots/loss.png", "plots/scores.png", "grids/deep-colors.png", "grids/shallow-colors.png"):
        assert (out / png).is_file() and (out / png).stat().st_size > 0, png
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert summary["deep"]["overall"]["values"] == [0.5, 0.7]


def test_finished_runs_are_reused_and_partial_ones_completed(tmp_path):
    grid, out = write_grid(tmp_path), tmp_path / "study"
    run(grid, out, Fakes())
    again = Fakes()
    logs: list[str] = []
    run(grid, out, again, logs)
    assert again.trained == [] and again.evaluated == []
    assert sum("reusing" in line for line in logs) == 4

    # a trained run without scores is only evaluated; a run without final/ is trained (train_run resumes it)
    planned = {(r.variant, r.seed): r for r in study_grid.plan_study(study_grid.load_grid(grid), out)}
    planned[("deep", 1)].scores_path.unlink()
    (planned[("shallow", 0)].run_dir / "final").rmdir()
    third = Fakes()
    run(grid, out, third)
    assert third.trained == [("shallow", 0)]
    assert sorted(third.evaluated) == [("deep", 1), ("shallow", 0)]


def test_changed_eval_settings_evaluate_again_without_training(tmp_path):
    grid, out = write_grid(tmp_path), tmp_path / "study"
    run(grid, out, Fakes())
    changed = write_grid(tmp_path, GRID.replace("seed: 7", "seed: 8"))
    again, logs = Fakes(), []
    run(changed, out, again, logs)
    assert again.trained == [] and len(again.evaluated) == 4
    assert any("seed: 7 -> 8" in line for line in logs)


def test_run_trained_with_another_config_is_not_reused(tmp_path):
    grid, out = write_grid(tmp_path), tmp_path / "study"
    run(grid, out, Fakes())
    changed = write_grid(tmp_path, GRID.replace("train.max_steps: 3", "train.max_steps: 5"))
    with pytest.raises(ConfigError, match="trained with another config.*train.max_steps"):
        run(changed, out, Fakes())


def test_unknown_variant_key_fails_before_training(tmp_path):
    bad = write_grid(tmp_path, GRID.replace("[model.fusion=deep]", "[model.fusn=deep]"))
    fakes = Fakes()
    with pytest.raises(ConfigError, match="variant 'deep'.*model.fusn"):
        run(bad, tmp_path / "study", fakes)
    assert fakes.trained == []


@pytest.mark.parametrize(
    "text, message",
    [
        (GRID.replace("[model.fusion=deep]", "[model.fusion=deep, train.max_steps=9]"), "budget and the seed"),
        (GRID.replace("[model.fusion=deep]", "[train.seed=3]"), "budget and the seed"),
        (GRID.replace("seeds: [0, 1]", "seeds: []"), "seeds must be"),
        (GRID.replace("eval: {", "eval: {cfgg: 1, "), "unknown eval key"),
        (GRID + "extra: 1\n", "unknown key"),
        (GRID.replace("base: demo", "base: no-such-config"), "not found"),
    ],
)
def test_grid_errors(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        study_grid.plan_study(study_grid.load_grid(write_grid(tmp_path, text)), tmp_path / "study")


def test_cli_dry_run_and_report_only(tmp_path, capsys):
    grid, out = write_grid(tmp_path), tmp_path / "study"
    assert cli_main(["study", str(grid), "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "4 runs" in text and "run 3/4: deep seed 1 [to train]" in text
    assert not (out / "runs").exists()
    # --report-only refuses while runs are missing, then rewrites the report from finished runs
    assert cli_main(["study", str(grid), "--out", str(out), "--report-only"]) == 2
    assert "missing" in capsys.readouterr().err
    run(grid, out, Fakes())
    (out / "report.md").unlink()
    assert cli_main(["study", str(grid), "--out", str(out), "--report-only"]) == 0
    assert (out / "report.md").is_file()


def test_mean_std_and_welch():
    mean, std = study_report.mean_std([1.0, 2.0, 3.0])
    assert mean == 2.0 and math.isclose(std, 1.0)
    assert study_report.mean_std([4.0]) == (4.0, 0.0)
    t, p = study_report.welch_t([1.0, 1.1, 0.9], [2.0, 2.1, 1.9])
    assert t < 0 and p < 0.001
    assert all(math.isnan(x) for x in study_report.welch_t([1.0], [2.0, 3.0]))


def test_shipped_grids_plan(tmp_path):
    """Every shipped study grid parses and every one of its runs has a valid config."""
    from fusedit.config import SHIPPED_CONFIGS

    grids = sorted((SHIPPED_CONFIGS / "studies").glob("*.yaml"))
    assert grids, "no shipped study grids"
    for path in grids:
        grid = study_grid.load_grid(path)
        runs = study_grid.plan_study(grid, tmp_path / grid.name)
        assert len(runs) == len(grid.variants) * len(grid.seeds)


def test_llm_size_grid_keeps_one_dit_across_llm_widths(tmp_path):
    """llm-size changes the LLM alone: every variant's DiT resolves to width 128 / MLP 256 (pinned, or defaulting
    to its 128-wide LLM's), so the runs differ only in the text model."""
    from fusedit.config import SHIPPED_CONFIGS

    grid = study_grid.load_grid(SHIPPED_CONFIGS / "studies" / "llm-size.yaml")
    widths = set()
    for run in study_grid.plan_study(grid, tmp_path / "llm-size"):
        llm, _ = study_grid.variant_tiny_llm(grid, run.variant)
        model = run.config.model
        widths.add((model.dit_hidden_size or llm.hidden_size, model.dit_intermediate_size or llm.intermediate_size))
    assert widths == {(128, 256)}


@pytest.mark.parametrize(
    "name", sorted(p.stem for p in (Path(study_grid.__file__).parents[1] / "configs" / "studies").glob("*.yaml"))
)
def test_every_shipped_grid_passes_its_dry_run(name, tmp_path, capsys):
    """`fusedit study GRID --dry-run` succeeds for every shipped grid (what a user runs first)."""
    from fusedit.config import SHIPPED_CONFIGS

    grid = SHIPPED_CONFIGS / "studies" / f"{name}.yaml"
    assert cli_main(["study", str(grid), "--out", str(tmp_path / name), "--dry-run"]) == 0
    text = capsys.readouterr().out
    loaded = study_grid.load_grid(grid)
    assert f"{len(loaded.variants) * len(loaded.seeds)} runs" in text and "[to train]" in text
    assert len(loaded.seeds) >= 3, "a shipped study compares variants over at least 3 seeds"


def test_report_names_paths_inside_the_study_folder_relative_to_it(tmp_path):
    """The reproduce section writes the tiny LLM's folder as STUDY/... (a report copied into docs/ names no
    machine's absolute path); a path outside the study stays as it is."""
    out = tmp_path / "study"
    inside = GRID.replace("text.llm=/nonexistent/llm", f"text.llm={out}/tiny-llm")
    run(write_grid(tmp_path, inside), out, Fakes())
    report = (out / "report.md").read_text()
    assert "text.llm=STUDY/tiny-llm" in report and str(out) + "/tiny-llm" not in report
    run(write_grid(tmp_path), tmp_path / "elsewhere", Fakes())
    assert "text.llm=/nonexistent/llm" in (tmp_path / "elsewhere" / "report.md").read_text()
