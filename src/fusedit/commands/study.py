"""``fusedit study GRID.yaml``: train and evaluate a grid of variants × seeds with one budget, then report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fusedit.commands.values import positive_int

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


def run(args: argparse.Namespace) -> int:
    import torch

    from fusedit.study.grid import describe_tiny_llm, eval_settings, load_grid, plan_study, plan_tiny_llms
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
        runs = plan_study(grid, out, build_llm=False)
        print(
            f"study {grid.name}: {len(grid.variants)} variant(s) × {len(grid.seeds)} seed(s) = {len(runs)} runs "
            f"in {out}"
        )
        for number, planned in enumerate(runs, 1):
            state = "done" if planned.trained and planned.evaluated else "trained" if planned.trained else "to train"
            print(
                f"run {number}/{len(runs)}: {planned.variant} seed {planned.seed} [{state}] "
                + " ".join(o for o in planned.overrides if not o.startswith("name="))
            )
        todo = sum(not (r.trained and r.evaluated) for r in runs)
        at_a_time = f"up to {args.jobs} at a time in worker processes" if args.jobs > 1 else "one at a time"
        print(f"{todo} of {len(runs)} runs to train or evaluate, {at_a_time} (--jobs {args.jobs})")
        llms = plan_tiny_llms(grid, out)
        for number, llm in enumerate(llms, 1):
            state = "pretrained" if llm.pretrained else "to pretrain"
            print(f"tiny LLM {number}/{len(llms)}: {llm.folder} [{state}] {describe_tiny_llm(llm)}")
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
        )
    except RunsFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(out / "report.md")
    return 0
