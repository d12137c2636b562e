"""The GPU check (issue 16): one prepared run that proves fusedit on a GPU, within 8 minutes on one H100/H200.

Start it through ``tools/gpu_check.sh`` (picks the Python that has CUDA, installs carried wheels) or ``make
gpu-check``. This runner uses the standard library only; everything that needs torch runs in child processes that
drive fusedit through its command line (``python -m fusedit.cli bench|train|sample``, ``torchrun``) or through
``tools/gpu_check_helper.py`` (fixture parity with the public ``fusedit.load_pipeline``).

Steps, in order (cheap and essential first, ``torch.compile`` last so that a slow compile cannot starve the rest):

=======================  ==========================================================================================
environment              python / torch / CUDA / device name / fusedit importable
parity                   every reference fixture: CUDA fp32 vs CPU fp32 latents (<= 1e-4), bf16 differences reported
bench-train              ``fusedit bench train --preset fusedit-2b --device cuda --batch-size 8`` (eager)
bench-sample             ``fusedit bench sample --preset fusedit-2b --device cuda`` (eager)
fsdp-train               ``torchrun -m fusedit.cli train demo ... train.distributed=fsdp``: 100 bf16 steps of a small
                         config on the shapes world, checkpoint at 50 and 100
fsdp-resume              the same command with ``train.max_steps=150 --allow-change train.max_steps``: resumes
                         from step 100, continues to 150
fsdp-sample              ``fusedit sample RUN`` (25 steps, CFG) -> a PNG
bench-train-vs-dense     ``--vs-dense`` at batch 4 (the reference's dense formulation, same weights)
bench-train-compile      as bench-train with ``--compile``
bench-sample-compile     as bench-sample with ``--compile``
=======================  ==========================================================================================

Every step prints one JSON line (``{"step", "status": pass|fail|timeout|skipped, "seconds", "metrics",
"peak_memory", "error", "command"}``) and the run ends with a ``{"step": "summary"}`` line comparing the measured
numbers with the targets. Lines also go to ``OUT/gpu_check.jsonl``; every child's output to ``OUT/gpu_check.log``
(``OUT``: ``--out``, else ``$OUT``, else ``runs/gpu-check``). Exit status 0 only when every step passed (and, with
``--strict-targets``, every target was met); 1 otherwise; 2 for bad arguments.

Each step has its own timeout (``--step-timeout NAME=SECONDS`` changes one), capped by what is left of the global
budget (``--budget``, default 450 s on CUDA): a step that would start with less than 15 s left is skipped, so the
whole run stays inside its budget whatever hangs.

``--device cpu --quick`` runs every step at tiny size on the CPU (preset ``tiny``, a 2-layer LLM, 16 px, 4 + 2 steps,
gloo instead of nccl): the end-to-end test of this script (``tests/test_gpu_check.py``). ``--plant-failure
NAME[:hang]`` (or ``$GPU_CHECK_PLANT_FAILURE``) replaces a step's command by one that fails (or hangs) to prove the
failure path.

The pieces: ``gpu_check_commands.py`` (what each step runs), ``gpu_check_checks.py`` (how its output is judged),
``gpu_check_steps.py`` (the table of steps and the targets), ``gpu_check_process.py`` (running a command under a
timeout); this file runs the steps in order and writes the records and the summary.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling gpu_check_*.py modules, however this is loaded

from gpu_check_checks import check_parity, is_finite_number  # noqa: E402,F401  (check_parity: used by the tests)
from gpu_check_commands import REPO, Context  # noqa: E402
from gpu_check_process import (  # noqa: E402,F401  (KILL_GRACE_SECONDS: used by the tests)
    KILL_GRACE_SECONDS,
    GpuMemoryPoller,
    capped_log,
    output_tail,
    planted_command,
    run_command,
)
from gpu_check_steps import STEP_NAMES, STEPS, Step  # noqa: E402
from gpu_check_summary import compare_targets, git_commit, human_table  # noqa: E402

MIN_STEP_SECONDS = 15.0


# ----------------------------------------------------------------------------------------------------------------------
# running a step
# ----------------------------------------------------------------------------------------------------------------------


def _new_record(step: Step, ctx: Context, timeout: float, commands: list[list[str]], planted: str | None) -> dict:
    record = {
        "step": step.name,
        "what": step.what(ctx),
        "status": "pass",
        "seconds": None,
        "timeout_s": round(timeout, 1),
        "command": " ".join(_shorten(a) for a in commands[-1]),
        "returncode": None,
        "metrics": {},
        "peak_memory": {},
        "error": None,
    }
    if planted is not None:
        record["planted"] = planted
    return record


def _run_commands(record: dict, commands: list[list[str]], ctx: Context, timeout: float, paths, log) -> list:
    """Run ``commands`` in order until one fails or the step's time is up; sets the record's status, error and return
    code. Returns each command's peak RSS (GiB or None)."""
    started = time.monotonic()
    env = dict(ctx.env)
    env["GPU_CHECK_MEMORY_FILE"] = str(ctx.memory_file)
    rss = []
    for argv in commands:
        left = timeout - (time.monotonic() - started)
        if left <= 0:
            result = {"returncode": None, "timed_out": True, "peak_rss_gib": None}
        else:
            log.write(f"\n===== {record['step']}: {' '.join(argv)}\n".encode())
            log.flush()
            result = run_command(argv, env, left, *paths)
        rss.append(result["peak_rss_gib"])
        record["returncode"] = result["returncode"]
        if result["timed_out"]:
            record["status"] = "timeout"
            record["error"] = f"timed out after {timeout:.0f} s (process tree killed)"
            break
        if result["returncode"] != 0:
            record["status"] = "fail"
            record["error"] = f"exit status {result['returncode']}"
            break
    return rss


def _apply_check(record: dict, step: Step, ctx: Context, stdout: str, stderr: str) -> None:
    """The step's own verdict on its output, also after a failed command (its JSON, e.g. the parity table, says what
    failed)."""
    try:
        error, metrics = step.check(ctx, stdout, stderr)
    except Exception as exc:  # a broken check is a failed step, not a crashed runner
        error, metrics = f"check raised {type(exc).__name__}: {exc}", {}
    record["metrics"] = metrics
    if record["status"] == "pass" and error:
        record["status"], record["error"] = "fail", error
    elif record["status"] == "fail" and error:
        record["error"] += f"; {error}"


def _memory_record(record: dict, ctx: Context, rss: list, gpu_peak_mib: float | None) -> dict:
    """Every peak-memory figure of the step: process RSS, torch's per-rank peaks, what the benchmark reported, and
    nvidia-smi's whole-device peak."""
    memory: dict = {}
    known = [r for r in rss if r is not None]
    if known:
        memory["process_peak_rss_gib"] = round(max(known), 3)
    for path in sorted(ctx.workdir.glob(ctx.memory_file.name + ".rank*")):
        try:
            report = json.loads(path.read_text())
        except ValueError:
            continue
        for key in ("peak_allocated_gib", "peak_reserved_gib"):
            if key in report:
                memory[f"torch_{key}"] = round(report[key], 3)
    bench_memory = record["metrics"].get("peak_memory_gib")
    if is_finite_number(bench_memory):
        memory["reported_gib"] = round(bench_memory, 3)
        memory["reported_source"] = record["metrics"].get("memory_source", "cuda max_memory_allocated")
    dense = record["metrics"].get("dense") or {}
    if is_finite_number(dense.get("peak_memory_gib")):
        memory["dense_reported_gib"] = round(dense["peak_memory_gib"], 3)
    if gpu_peak_mib is not None:
        memory["nvidia_smi_used_gib"] = round(gpu_peak_mib / 1024, 3)
    return memory


def run_step(step: Step, ctx: Context, timeout: float, planted: str | None, log) -> dict:
    """Run every command of ``step`` (stopping at the first failure), check the result, return the record."""
    paths = (ctx.workdir / f"{step.name}.out", ctx.workdir / f"{step.name}.err")
    for path in paths:
        path.write_bytes(b"")
    commands = [planted_command(planted, ctx.python)] if planted is not None else step.commands(ctx)
    record = _new_record(step, ctx, timeout, commands, planted)
    for stale in ctx.workdir.glob(ctx.memory_file.name + ".rank*"):
        stale.unlink()
    started = time.monotonic()
    with GpuMemoryPoller(ctx.device.startswith("cuda")) as poller:
        rss = _run_commands(record, commands, ctx, timeout, paths, log)
    record["seconds"] = round(time.monotonic() - started, 2)
    stdout, stderr = (path.read_text(errors="replace") for path in paths)
    log.write(capped_log((stdout + stderr).encode(errors="replace")))
    log.flush()
    if record["status"] != "timeout" and planted is None:
        _apply_check(record, step, ctx, stdout, stderr)
    record["peak_memory"] = _memory_record(record, ctx, rss, poller.peak_mib)
    if record["status"] != "pass":
        record["output_tail"] = output_tail(stdout + "\n" + stderr, 25)
    return record


def _shorten(arg: str) -> str:
    """Commands in the JSON: paths inside the repository relative to it; code passed with -c elided."""
    if "\n" in arg:
        return "'<probe>'"
    return arg.replace(str(REPO) + os.sep, "")


# ----------------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------------


def _split(values: list[str] | None) -> list[str]:
    out = []
    for value in values or []:
        out += [v.strip() for v in value.split(",") if v.strip()]
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tools/gpu_check.sh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (for --device cpu: the script's own test)")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="global time budget in seconds (default: 450 on cuda, 1200 with --quick)",
    )
    parser.add_argument("--only", action="append", help=f"comma-separated steps to run (of: {', '.join(STEP_NAMES)})")
    parser.add_argument("--skip", action="append", help="comma-separated steps to leave out")
    parser.add_argument(
        "--step-timeout", action="append", default=[], metavar="NAME=SECONDS", help="override one step's timeout"
    )
    parser.add_argument(
        "--out", default=None, help="folder for gpu_check.jsonl / .log / sample (default: $OUT, else runs/gpu-check)"
    )
    parser.add_argument(
        "--workdir",
        default=None,
        help="scratch folder (default: a new temporary folder, removed at the end unless --keep)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument(
        "--plant-failure",
        action="append",
        default=[],
        metavar="NAME[:hang]",
        help="make a step fail (or hang until its timeout) to test the failure path; also $GPU_CHECK_PLANT_FAILURE",
    )
    parser.add_argument("--strict-targets", action="store_true", help="a missed performance target fails the run")
    return parser


@dataclass
class Settings:
    """The command line, validated."""

    device: str
    quick: bool
    budget: float
    only: list[str]
    skip: list[str]
    planted: dict[str, str]
    timeouts: dict[str, float]
    strict_targets: bool
    out: Path
    workdir: Path | None
    keep: bool


def parse_settings(argv: list[str] | None) -> Settings:
    """Parse and check the arguments; a mistake exits with status 2 and says what was wrong (argparse's error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device.split(":")[0] not in ("cuda", "cpu"):
        parser.error(f"--device must be cuda or cpu, got {args.device!r}")
    planted = {}
    for item in _split(args.plant_failure) + _split([os.environ.get("GPU_CHECK_PLANT_FAILURE", "")]):
        name, _, kind = item.partition(":")
        planted[name] = kind or "fail"
    timeouts = {}
    for item in args.step_timeout:
        name, _, value = item.partition("=")
        try:
            timeouts[name] = float(value)
        except ValueError:
            parser.error(f"--step-timeout expects NAME=SECONDS, got {item!r}")
    only, skip = _split(args.only), _split(args.skip)
    for name in [*only, *skip, *planted, *timeouts]:
        if name not in STEP_NAMES:
            parser.error(f"unknown step {name!r}; steps: {', '.join(STEP_NAMES)}")
    for kind in planted.values():
        if kind not in ("fail", "hang"):
            parser.error(f"--plant-failure kinds are 'fail' and 'hang', got {kind!r}")
    return Settings(
        device=args.device,
        quick=args.quick,
        budget=args.budget if args.budget is not None else (1200.0 if args.quick else 450.0),
        only=only,
        skip=skip,
        planted=planted,
        timeouts=timeouts,
        strict_targets=args.strict_targets,
        out=Path(args.out or os.environ.get("OUT") or REPO / "runs" / "gpu-check"),
        workdir=Path(args.workdir) if args.workdir else None,
        keep=args.keep,
    )


def child_env() -> dict:
    """The environment of every step's commands: this checkout's ``src`` first on the path, offline hub, unbuffered."""
    env = dict(os.environ)
    src = str(REPO / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("GPU_CHECK_PLANT_FAILURE", None)
    return env


def skip_reason(step: Step, ctx: Context, left: float, elapsed: float, budget: float) -> str | None:
    """Why ``step`` must not start (a step it needs or the environment did not pass, or too little time is left)."""
    missing = [n for n in step.needs if ctx.results.get(n, {}).get("status") != "pass"]
    if missing:
        return f"needs {', '.join(missing)}, which did not pass"
    if ctx.results.get("environment", {}).get("status") not in (None, "pass"):
        return "the environment step did not pass"
    if left < MIN_STEP_SECONDS:
        return f"budget exhausted ({elapsed:.0f} s of {budget:.0f} s used)"
    return None


def run_steps(settings: Settings, ctx: Context, log, emit) -> list[dict]:
    """Every selected step in order, each under its timeout capped by what is left of the budget."""
    started, records = time.monotonic(), []
    cuda_sizes = settings.device.startswith("cuda") and not settings.quick
    for step in STEPS:
        selected = not settings.only or step.name in settings.only or step.name == "environment"
        if not selected or step.name in settings.skip:
            continue
        elapsed = time.monotonic() - started
        left = settings.budget - elapsed
        reason = skip_reason(step, ctx, left, elapsed, settings.budget)
        if reason is not None:
            record = {"step": step.name, "what": step.what(ctx), "status": "skipped", "seconds": 0, "error": reason}
        else:
            base = settings.timeouts.get(step.name, step.timeout_cuda if cuda_sizes else step.timeout_cpu)
            record = run_step(step, ctx, min(base, left), settings.planted.get(step.name), log)
        ctx.results[step.name] = record
        records.append(record)
        emit(record)
        if record["status"] != "pass" and record.get("output_tail"):
            print(
                f"--- {step.name} {record['status']}: last lines of its output ---\n{record['output_tail']}\n---",
                file=sys.stderr,
                flush=True,
            )
    return records


def summarize(settings: Settings, ctx: Context, records: list[dict], date: str, seconds: float) -> dict:
    """The closing ``{"step": "summary"}`` record: what passed, failed and was skipped, the targets, the versions."""
    targets = compare_targets(ctx.results, settings.quick, settings.device)
    env_info = ctx.results.get("environment", {}).get("metrics", {})
    failed = [r["step"] for r in records if r["status"] in ("fail", "timeout")]
    skipped = [r["step"] for r in records if r["status"] == "skipped"]
    missed = [t["name"] for t in targets if t["met"] is False]
    return {
        "step": "summary",
        "ok": not failed and not skipped and bool(records) and not (settings.strict_targets and missed),
        "date_utc": date,
        "device": settings.device,
        "quick": settings.quick,
        **{key: env_info.get(key) for key in ("device_name", "torch", "torch_cuda", "python")},
        **{key: env_info.get(key) for key in ("transformers", "diffusers")},
        "git_commit": git_commit(),
        "seconds": round(seconds, 1),
        "budget_s": settings.budget,
        "passed": [r["step"] for r in records if r["status"] == "pass"],
        "failed": failed,
        "skipped": skipped,
        "targets": targets,
        "targets_missed": missed,
        "strict_targets": settings.strict_targets,
        "peak_memory": {r["step"]: r.get("peak_memory", {}) for r in records if r.get("peak_memory")},
        "out": str(settings.out),
        "planted": settings.planted or None,
    }


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    settings.out.mkdir(parents=True, exist_ok=True)
    workdir = settings.workdir or Path(tempfile.mkdtemp(prefix="fusedit-gpu-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = Context(
        device=settings.device,
        quick=settings.quick,
        python=sys.executable,
        workdir=workdir,
        out=settings.out,
        env=child_env(),
    )
    jsonl = open(settings.out / "gpu_check.jsonl", "w")
    log = open(settings.out / "gpu_check.log", "wb")

    def emit(record: dict) -> None:
        line = json.dumps(record, default=str)
        print(line, flush=True)
        jsonl.write(line + "\n")
        jsonl.flush()

    started = time.monotonic()
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    try:
        records = run_steps(settings, ctx, log, emit)
        summary = summarize(settings, ctx, records, date, time.monotonic() - started)
        print(human_table(records, summary["targets"]), file=sys.stderr, flush=True)
        emit(summary)
    finally:
        jsonl.close()
        log.close()
        if not settings.keep and settings.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
