"""Check the training-memory estimate (``fusedit bench train --estimate-memory``) against measured CPU peaks.

For each case (preset, batch, optimizer, activation checkpointing, precision) a fresh Python process builds the
benchmark's random-weight model and LLM and runs ``--steps`` optimiser steps through the trainer's own step
functions (``fusedit.bench.runs.train_step_fns``) under ``torch.profiler`` with ``profile_memory``: the measured
peak is the largest sum of live CPU tensor bytes over the whole run (model construction included), from the
profiler's allocation and free events. The process's peak RSS growth over its start (``ru_maxrss``; Python objects,
the allocator's slack and library buffers included) is printed beside it for reference.

    .venv/bin/python tools/memory_check.py                    # the default cases (docs/performance.md)
    .venv/bin/python tools/memory_check.py --cases tiny:8:adamw:0:fp32 small:2:adamw8bit:1:fp32

Prints one table row per case and exits 1 if any estimate is off by more than ``--tolerance`` (default 15 %).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CASES = (
    "tiny:8:adamw:0:fp32",
    "tiny:8:adamw8bit:0:fp32",
    "tiny:8:adamw:1:fp32",
    "tiny:2:adamw:0:fp32",
    "tiny:8:adamw:0:bf16",
    "small:2:adamw:0:fp32",
    "small:2:adamw8bit:0:fp32",
    "small:2:adamw:1:fp32",
    "small:8:adamw:0:fp32",
)


def parse_case(text: str) -> dict:
    preset, batch, optimizer, checkpointing, precision = text.split(":")
    return {
        "preset": preset,
        "batch": int(batch),
        "optimizer": optimizer,
        "checkpointing": checkpointing == "1",
        "precision": precision,
    }


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(case: dict, steps: int) -> dict:
    """Run ``steps`` training steps of ``case`` and return the measured peaks (bytes)."""
    import resource

    import torch
    from torch.profiler import ProfilerActivity, profile

    from fusedit.bench.presets import PRESETS
    from fusedit.bench.runs import build_setup, train_step_fns

    torch.set_num_threads(1)
    dtype = torch.bfloat16 if case["precision"] == "bf16" else torch.float32
    start_rss = _rss_bytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        setup = build_setup(PRESETS[case["preset"]], torch.device("cpu"), dtype, case["batch"], "train", True, False)
        if case["checkpointing"]:
            setup.model.enable_activation_checkpointing()
        step, _ = train_step_fns(setup, optimizer_name=case["optimizer"])
        for _ in range(steps):
            step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"tensor_peak": peak, "rss_growth": rss_peak - start_rss}


def estimate(case: dict) -> tuple[int, str]:
    from fusedit.bench.memory_plan import plan_for_preset
    from fusedit.bench.presets import PRESETS

    plan = plan_for_preset(
        PRESETS[case["preset"]],
        case["batch"],
        optimizer=case["optimizer"],
        activation_checkpointing=case["checkpointing"],
        precision=case["precision"],
        llm_bytes=2 if case["precision"] == "bf16" else 4,
    )
    result = plan.estimate()
    return result.peak, result.phase


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", default=list(DEFAULT_CASES), help="preset:batch:optimizer:ckpt:precision")
    parser.add_argument("--steps", type=int, default=3, help="optimiser steps per case (default 3)")
    parser.add_argument("--tolerance", type=float, default=0.15)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(json.loads(args.child), args.steps)))
        return 0
    header = "| case (preset, batch, optimizer, checkpointing, precision) | estimate MiB | measured tensor peak MiB "
    print(header + "| error | peak phase (estimate) | RSS growth MiB |", flush=True)
    print("|---|---|---|---|---|---|")
    failed = 0
    for text in args.cases:
        case = parse_case(text)
        child = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(case), "--steps", str(args.steps)],
            capture_output=True,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
        )
        if child.returncode != 0:
            print(f"| {text} | measurement failed: {child.stderr.strip().splitlines()[-1:]} |")
            failed += 1
            continue
        measured = json.loads(child.stdout.strip().splitlines()[-1])
        peak, phase = estimate(case)
        error = peak / measured["tensor_peak"] - 1
        failed += abs(error) > args.tolerance
        print(
            f"| {text} | {peak / 2**20:.1f} | {measured['tensor_peak'] / 2**20:.1f} | {error:+.1%} | {phase} "
            f"| {measured['rss_growth'] / 2**20:.1f} |",
            flush=True,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
