"""``fusedit study GRID.yaml``: train and evaluate a grid of variants × seeds with one budget, then report."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fusedit.commands.values import positive_int

if TYPE_CHECKING:
    from fusedit.study.grid import StudyGrid

NAME = "study"
HELP = "train and evaluate a grid of variants × seeds"
DESCRIPTION = (
    "Train and evaluate a grid of variants × seeds with one budget; write report.md, plots and sample "
    "grids (resumable)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("grid", help="grid YAML file (see src/fusedit/configs/studies/)")
    p.add_argument("--out", help="study folder (default: runs/studies/<grid name>)")
    p.add_argument("--dry-run", action="store_true", help="check every config and list the runs, train nothing")
    p.add_argument("--report-only", action="store_true", help="rewrite report.md from finished runs only")
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch CPU threads of each training process (1 on a CPU shared with other work; default: torch's choice)",
    )
    p.add_argument(
        "--jobs",
        type=positive_int,
        default=1,
        help="runs trained and evaluated at a time, in a pool of that many worker processes (default 1: one after "
        "another in this process); with --jobs 2 on 2 cores use --threads 1",
    )
    p.add_argument(
        "--reuse-from",
        action="append",
        default=[],
        metavar="STUDY_DIR",
        help="another study's folder (repeatable): a run of this grid not started yet whose config (but for its name "
        "and tiny-LLM folder) and text model (same bytes) equal one of its finished runs is copied from there, then "
        "evaluated here, instead of trained again",
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from fusedit.study.grid import eval_settings, load_grid, plan_study
    from fusedit.study.report import write_report
    from fusedit.study.runner import collect_run, run_study, variant_costs
    from fusedit.study.workers import RunsFailed

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    grid = load_grid(args.grid)
    out = Path(args.out or Path("runs") / "studies" / grid.name)
    if args.dry_run:
        print_plan(grid, out, jobs=args.jobs, reuse_from=args.reuse_from)
        return 0
    if args.report_only:
        runs = plan_study(grid, out, build_llm=False)
        missing = [str(r.run_dir) for r in runs if not (r.trained and r.evaluated)]
        if missing:
            raise FileNotFoundError(f"--report-only needs every run trained and evaluated; missing: {missing}")
        results = [collect_run(r) for r in runs]
        print(write_report(grid, out, runs, results, costs=variant_costs(runs, eval_settings(grid))))
        return 0
    try:
        run_study(
            grid,
            out,
            progress=sys.stderr.isatty(),
            log=lambda m: print(m, flush=True),
            jobs=args.jobs,
            threads=args.threads,
            reuse_from=[Path(p) for p in args.reuse_from],
        )
    except RunsFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(out / "report.md")
    return 0


def print_plan(grid: StudyGrid, out: Path, *, jobs: int, reuse_from: Sequence[str | Path]) -> None:
    """``--dry-run``: every run with its state (done, trained, to train, to reuse from another study) and
    overrides, then the tiny LLMs; nothing is trained or written."""
    from fusedit.study.grid import describe_tiny_llm, plan_study, plan_tiny_llms
    from fusedit.study.reuse import check_sources, find_source

    check_sources(reuse_from)
    runs = plan_study(grid, out, build_llm=False)
    print(f"study {grid.name}: {len(grid.variants)} variant(s) × {len(grid.seeds)} seed(s) = {len(runs)} runs in {out}")
    fingerprints: dict[str, str] = {}
    reusable = 0
    for number, planned in enumerate(runs, 1):
        state = "done" if planned.trained and planned.evaluated else "trained" if planned.trained else "to train"
        source = None if planned.run_dir.exists() else find_source(planned, reuse_from, fingerprints)
        if source is not None:
            state, reusable = f"to reuse from {source}", reusable + 1
        print(
            f"run {number}/{len(runs)}: {planned.variant} seed {planned.seed} [{state}] "
            + " ".join(o for o in planned.overrides if not o.startswith("name="))
        )
    todo = sum(not (r.trained and r.evaluated) for r in runs)
    at_a_time = f"up to {jobs} at a time in worker processes" if jobs > 1 else "one at a time"
    reusing = f" ({reusable} of them copied from --reuse-from, then evaluated)" if reusable else ""
    print(f"{todo} of {len(runs)} runs to train or evaluate{reusing}, {at_a_time} (--jobs {jobs})")
    llms = plan_tiny_llms(grid, out)
    for number, llm in enumerate(llms, 1):
        state = "pretrained" if llm.pretrained else "to pretrain"
        print(f"tiny LLM {number}/{len(llms)}: {llm.folder} [{state}] {describe_tiny_llm(llm)}")
