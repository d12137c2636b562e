"""Running a study: train every planned run (resuming), evaluate it with the shapes suite, collect its metrics."""

from __future__ import annotations

import json
import math
import pickle
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from fusedit.eval.manifest import code_version, pin_code_version
from fusedit.eval.shapes_eval import evaluate_shapes, world_from_config
from fusedit.sampling.loading import load_pipeline
from fusedit.study.costs import measure_costs
from fusedit.study.grid import PlannedRun, StudyGrid, check_reusable, ensure_tiny_llms, eval_settings, plan_study
from fusedit.study.report import write_report
from fusedit.study.reuse import adopt_from, reused_from
from fusedit.study.stats import correctness_by_category
from fusedit.study.timing import run_timing, study_session, timed
from fusedit.study.workers import Job, run_jobs
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
    cost_fn: Callable | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
    jobs: int = 1,
    threads: int | None = None,
    reuse_from: Sequence[Path] = (),
) -> list[dict]:
    """Train, evaluate and report every run of ``grid`` in ``out``; returns the per-run results.

    ``train_fn(run, progress=)``, ``eval_fn(run, settings) -> scores`` and ``cost_fn(runs, settings) -> {variant:
    costs}`` are injectable (tests use fakes; the default cost function is :func:`variant_costs`). Each run's wall
    time of training and evaluation accumulates in its ``study_timing.json`` (across resumes).

    ``jobs``: how many runs train and evaluate at a time. 1: one after another, in this process. More: the parent
    checks every run and pretrains the tiny LLMs, then the pending runs go to :func:`fusedit.study.workers.run_jobs`,
    a pool of ``jobs`` spawned worker processes, each running one run at a time: it records this process's
    :func:`code_version`, sets ``torch.set_num_threads(threads)`` when ``threads`` is given (the caller sets its own)
    and shows no progress bar. ``train_fn`` and ``eval_fn`` must then pickle (module-level functions), and runs that
    fail raise :class:`~fusedit.study.workers.RunsFailed` once the others have finished (no report is written).

    ``reuse_from``: other study folders whose finished runs with the identical config and text model are copied in
    for runs this study has not started (:mod:`fusedit.study.reuse`), then evaluated here.
    """
    _check_jobs(jobs, threads, train_fn, eval_fn)
    out.mkdir(parents=True, exist_ok=True)
    version = code_version()  # the code this process loaded, recorded in every evaluation's manifest even if HEAD moves
    settings = eval_settings(grid)
    runs = plan_study(grid, out)
    for run in runs:
        check_reusable(run)
    ensure_tiny_llms(grid, out, log=log)  # after the checks: a refused run costs no pretraining
    if reuse_from:
        adopt_from(runs, reuse_from, log)  # after the tiny LLMs: their bytes decide what matches
    pending = [(label, run) for label, run in _labelled(runs) if is_pending(run, settings, label, log)]
    started = time.perf_counter()
    with study_session(out, runs=len(pending), jobs=jobs, threads=threads):
        if jobs == 1:
            _run_in_order(pending, settings, train_fn=train_fn, eval_fn=eval_fn, progress=progress, log=log)
        elif pending:
            each = f", torch threads {threads} each" if threads is not None else ""
            log(
                f"{len(pending)} of {len(runs)} runs to train or evaluate, {min(jobs, len(pending))} at a time in "
                f"worker processes{each}"
            )
            work = [
                Job(label, run_in_worker, (run, settings, label, train_fn, eval_fn, threads, version))
                for label, run in pending
            ]
            run_jobs(work, jobs, log)
    results = [collect_run(run) for run in runs]
    log(f"all {len(runs)} runs done in {(time.perf_counter() - started) / 60:.1f} min; writing the report")
    write_report(grid, out, runs, results, costs=(cost_fn or variant_costs)(runs, settings))
    return results


def _check_jobs(jobs: int, threads: int | None, train_fn: Callable, eval_fn: Callable) -> None:
    """Refuse a bad ``jobs``/``threads``, and (for ``jobs`` > 1) functions a worker process could not receive."""
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer (runs trained at a time), got {jobs!r}")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ValueError(f"threads must be None or a positive integer, got {threads!r}")
    if jobs == 1:
        return
    for name, fn in (("train_fn", train_fn), ("eval_fn", eval_fn)):
        try:
            pickle.dumps(fn)
        except (pickle.PicklingError, AttributeError, TypeError) as error:
            raise TypeError(
                f"with jobs={jobs}, {name} must be picklable to reach the worker processes (a module-level "
                f"function, not a lambda or a local function); {fn!r} is not: {error}"
            ) from None


def _labelled(runs: Sequence[PlannedRun]) -> list[tuple[str, PlannedRun]]:
    """``(label, run)`` with the labels of the log: ``run 3/12: addition seed 0``."""
    return [(f"run {number}/{len(runs)}: {run.variant} seed {run.seed}", run) for number, run in enumerate(runs, 1)]


def is_pending(run: PlannedRun, settings, label: str, log: Callable[[str], None]) -> bool:
    """Whether ``run`` needs training or evaluating (not trained, not evaluated, or evaluated with other sampling
    settings than ``settings``); logs why a finished run is evaluated again, or that it is reused."""
    changed = run.eval_differences(settings) if run.evaluated else []
    if changed:
        log(f"{label} — the grid's eval settings changed ({', '.join(changed)}); evaluating again")
    if run.trained and run.evaluated and not changed:
        log(f"{label} — done before, reusing {run.run_dir}")
        return False
    return True


def _run_in_order(pending: Sequence[tuple[str, PlannedRun]], settings, *, train_fn, eval_fn, progress, log) -> None:
    """``jobs=1``: the pending ``(label, run)`` pairs trained and evaluated in this process, in order (with an ETA of
    the training left)."""
    trained_seconds, trained_count = 0.0, 0
    for number, (label, run) in enumerate(pending):
        eta = ""
        if not run.trained and trained_count:
            remaining = sum(not r.trained for _, r in pending[number:])
            eta = f", about {trained_seconds / trained_count * remaining / 60:.0f} min of training left"
        seconds = train_and_evaluate(
            run, settings, label=label, train_fn=train_fn, eval_fn=eval_fn, progress=progress, log=log, eta=eta
        )
        if seconds is not None:
            trained_seconds, trained_count = trained_seconds + seconds, trained_count + 1


def train_and_evaluate(
    run: PlannedRun, settings, *, label: str, train_fn, eval_fn, progress: bool, log, eta: str = ""
) -> float | None:
    """One pending run's work, the same with any ``jobs``: train it unless ``final/`` exists (``train_fn`` resumes
    from its checkpoints), then evaluate it; each stage's wall time is added to its ``study_timing.json``. Returns
    the seconds of training (None when it was trained before). ``eta`` ends the training line."""
    trained = None
    if not run.trained:
        log(f"{label} — training {run.config.train.max_steps} steps in {run.run_dir}{eta}")
        t0 = time.perf_counter()
        with timed(run, "train_seconds"):  # an interrupted segment counts too
            train_fn(run, progress=progress)
        trained = time.perf_counter() - t0
        if not run.trained:
            raise RuntimeError(f"training {run.run_dir} finished without writing final/")
    log(f"{label} — evaluating (shapes suite) into {run.eval_dir}")
    with timed(run, "eval_seconds"):
        eval_fn(run, settings)
    if not run.evaluated:
        raise RuntimeError(f"evaluation of {run.run_dir} did not write {run.scores_path}")
    return trained


def run_in_worker(
    run: PlannedRun, settings, label: str, train_fn, eval_fn, threads: int | None, version: dict, *, log
) -> float | None:
    """A worker process's job (``jobs`` > 1; module-level so that it pickles): record the parent's code version,
    use ``threads`` torch threads when given, then :func:`train_and_evaluate` without a progress bar."""
    pin_code_version(version)
    if threads is not None:
        torch.set_num_threads(threads)
    return train_and_evaluate(run, settings, label=label, train_fn=train_fn, eval_fn=eval_fn, progress=False, log=log)


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
    if "background_error" in scores:
        metrics["background_error"] = scores["background_error"]
    timing = run_timing(run)
    for stage in ("train", "eval"):
        if f"{stage}_seconds" in timing:
            metrics[f"{stage}_min"] = timing[f"{stage}_seconds"] / 60
    return {
        "variant": run.variant,
        "seed": run.seed,
        "run_dir": str(run.run_dir),
        "reused_from": reused_from(run.run_dir),
        "metrics": metrics,
        "timing_source": timing.get("source"),
        **({"train_seconds_from": timing["train_seconds_from"]} if "train_seconds_from" in timing else {}),
        "threads": timing.get("threads"),
        "loss_curve": [[r["step"], r["loss"]] for r in records],
        "grids": scores.get("grids", {}),
        "correct": {c: v.tolist() for c, v in correctness_by_category(scores.get("per_prompt", [])).items()},
        **({"failures": scores["failures"]} if "failures" in scores else {}),
        "controls": scores.get("controls", {}),
        "controls_pass": scores.get("controls_pass"),
        "manifest": scores.get("manifest", {}),
    }


def variant_costs(runs: Sequence[PlannedRun], settings) -> dict[str, dict | None]:
    """:func:`~fusedit.study.costs.measure_costs` of each variant's first trained run (``None`` for a variant whose
    runs hold no model weights), over the first held-out prompt of each category at the study's sampling."""
    costs: dict[str, dict | None] = {}
    for run in runs:
        if run.variant in costs or not (run.run_dir / "final" / "model.safetensors").is_file():
            continue
        scores = json.loads(run.scores_path.read_text())
        prompts = list({e["category"]: e["prompt"] for e in reversed(scores.get("per_prompt", []))}.values())
        saved = scores.get("settings", {})
        pipe = load_pipeline(run.run_dir)
        costs[run.variant] = measure_costs(
            pipe,
            prompts,
            saved.get("num_inference_steps") or pipe.defaults.num_inference_steps,
            saved.get("guidance_scale") or pipe.defaults.guidance_scale,
            text_trainable=run.config.text.trainable,
        )
    return {variant: costs.get(variant) for variant in dict.fromkeys(r.variant for r in runs)}


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
