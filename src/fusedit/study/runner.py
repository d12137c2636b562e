"""Running a study: train every planned run (resuming), evaluate it with the shapes suite, collect its metrics."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

from safetensors import safe_open

from fusedit.eval.shapes_eval import evaluate_shapes, world_from_config
from fusedit.sampling.loading import load_pipeline
from fusedit.study.grid import PlannedRun, StudyGrid, check_reusable, eval_settings, plan_study
from fusedit.study.report import write_report
from fusedit.train.launch import train_run
from fusedit.train.logging import read_metrics


def default_train(run: PlannedRun, *, progress: bool) -> None:
    """Train ``run`` with :func:`fusedit.train.launch.train_run` (resuming its checkpoint)."""
    train_run(run.config, run.run_dir, progress=progress)


def default_evaluate(run: PlannedRun, settings) -> dict:
    """Evaluate ``run`` with the shapes suite into ``run.eval_dir``."""
    pipe = load_pipeline(run.run_dir)
    return evaluate_shapes(
        pipe, world_from_config(pipe.experiment), run.eval_dir, settings, model_path=str(run.run_dir)
    )


def run_study(
    grid: StudyGrid,
    out: Path,
    *,
    train_fn: Callable = default_train,
    eval_fn: Callable = default_evaluate,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Train, evaluate and report every run of ``grid`` in ``out``; returns the per-run results.

    ``train_fn(run, progress=)`` and ``eval_fn(run, settings) -> scores`` are injectable (tests use fakes).
    """
    out.mkdir(parents=True, exist_ok=True)
    settings = eval_settings(grid)
    runs = plan_study(grid, out, build_llm=True)
    for run in runs:
        check_reusable(run)
    started, trained_seconds, trained_count = time.perf_counter(), 0.0, 0
    results = []
    for number, run in enumerate(runs, 1):
        label = f"run {number}/{len(runs)}: {run.variant} seed {run.seed}"
        changed = run.eval_differences(settings) if run.evaluated else []
        if changed:
            log(f"{label} — the grid's eval settings changed ({', '.join(changed)}); evaluating again")
        if run.trained and run.evaluated and not changed:
            log(f"{label} — done before, reusing {run.run_dir}")
        else:
            if not run.trained:
                remaining = sum(not r.trained for r in runs[number - 1 :])
                eta = (
                    ""
                    if not trained_count
                    else f", about {trained_seconds / trained_count * remaining / 60:.0f} min of training left"
                )
                log(f"{label} — training {run.config.train.max_steps} steps in {run.run_dir}{eta}")
                t0 = time.perf_counter()
                train_fn(run, progress=progress)
                trained_seconds += time.perf_counter() - t0
                trained_count += 1
                if not run.trained:
                    raise RuntimeError(f"training {run.run_dir} finished without writing final/")
            log(f"{label} — evaluating (shapes suite) into {run.eval_dir}")
            eval_fn(run, settings)
            if not run.evaluated:
                raise RuntimeError(f"evaluation of {run.run_dir} did not write {run.scores_path}")
        results.append(collect_run(run))
    log(f"all {len(runs)} runs done in {(time.perf_counter() - started) / 60:.1f} min; writing the report")
    write_report(grid, out, runs, results)
    return results


def collect_run(run: PlannedRun) -> dict:
    """Metrics of a finished run: its shapes scores and training summary (from ``metrics.jsonl``)."""
    scores = json.loads(run.scores_path.read_text())
    records = [r for r in read_metrics(run.run_dir) if "loss" in r]
    tail = records[-3:]
    metrics = {
        "overall": scores["overall"],
        "acc_images": sum(scores["correct"].values()) / scores["num_images"],
        **{f"acc/{k}": v for k, v in scores["accuracy"].items()},
    }
    for name in ("fd_pixels", "color_recall", "color_precision"):
        if name in scores:
            metrics[name] = scores[name]
    if tail:
        metrics["final_loss"] = sum(r["loss"] for r in tail) / len(tail)
    speeds = [r["img_per_s"] for r in records if "img_per_s" in r]
    if speeds:
        metrics["img_per_s"] = sum(speeds) / len(speeds)
    params = count_parameters(run.run_dir / "final" / "model.safetensors")
    if params is not None:
        metrics["params_m"] = params / 1e6
    return {
        "variant": run.variant,
        "seed": run.seed,
        "run_dir": str(run.run_dir),
        "metrics": metrics,
        "loss_curve": [[r["step"], r["loss"]] for r in records],
        "grids": scores.get("grids", {}),
    }


def count_parameters(path: Path) -> int | None:
    """Number of trained values in a safetensors file (``None`` when it does not exist)."""
    if not path.is_file():
        return None
    total = 0
    with safe_open(str(path), framework="pt") as weights:
        for key in weights.keys():
            shape = weights.get_slice(key).get_shape()
            total += math.prod(shape)
    return total
