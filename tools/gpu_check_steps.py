"""The GPU check's table of steps, in the order they run (cheap and essential first, compiles last), and the
performance targets the summary compares the benchmarks with.

Standard library only (see ``tools/gpu_check.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gpu_check_checks import (
    check_bench,
    check_environment,
    check_fsdp_resume,
    check_fsdp_sample,
    check_fsdp_train,
    check_parity,
)
from gpu_check_commands import (
    Context,
    bench_commands,
    cmd_environment,
    cmd_fsdp_resume,
    cmd_fsdp_sample,
    cmd_fsdp_train,
    cmd_parity,
    fsdp_steps,
)

#: The issue's targets (one H100/H200, bf16, fusedit-2b at 512 px) and the reference's numbers on an H200.
TARGETS = (
    {
        "name": "fusedit-2b training, batch 8, 512 px",
        "metric": "img_per_s",
        "unit": "img/s",
        "direction": ">=",
        "target": 40.0,
        "reference_h200": 16.0,
        "steps": ("bench-train", "bench-train-compile"),
    },
    {
        "name": "fusedit-2b sampling, 25 CFG steps, 512 px",
        "metric": "s_per_image",
        "unit": "s/image",
        "direction": "<=",
        "target": 0.35,
        "reference_h200": 1.08,
        "steps": ("bench-sample", "bench-sample-compile"),
    },
)


@dataclass(frozen=True)
class Step:
    name: str
    what: Callable[[Context], str]
    timeout_cuda: float
    timeout_cpu: float
    commands: Callable[[Context], list[list[str]]]
    check: Callable[[Context, str, str], tuple[str | None, dict]]
    needs: tuple[str, ...] = ()


def _what_bench(mode: str, extra: str = ""):
    def what(ctx: Context) -> str:
        if ctx.quick:
            size = "preset tiny, batch 2" if mode == "train" else "preset tiny, batch 1"
        else:
            size = "preset fusedit-2b, batch " + ("4" if "vs-dense" in extra else "8")
        return f"fusedit bench {mode} --device {ctx.device}, {size}" + (f", {extra}" if extra else ", eager")

    return what


def _what_fsdp(kind: str):
    def what(ctx: Context) -> str:
        first, second = fsdp_steps(ctx)
        size = "tiny shapes-world config (16 px, width-32 DiT)" if ctx.quick else "small shapes-world config (32 px)"
        backend = "gloo" if ctx.device.startswith("cpu") else "nccl, bf16"
        if kind == "train":
            return f"torchrun, FSDP2 ({backend}): {first} steps of a {size}, checkpoints"
        if kind == "resume":
            return f"torchrun, FSDP2 ({backend}): resume from step {first} and continue to {second}"
        return f"fusedit sample of the trained run ({3 if ctx.quick else 25} steps, CFG 4) -> PNG"

    return what


STEPS: tuple[Step, ...] = (
    Step(
        "environment",
        lambda c: "python, torch, CUDA, device, fusedit importable",
        90,
        120,
        cmd_environment,
        check_environment,
    ),
    Step(
        "parity",
        lambda c: (
            f"reference fixtures: {c.device} fp32 vs CPU fp32 latents (<= 1e-4), bf16 reported"
            + (" (quick: first 2 fixtures)" if c.quick else "")
        ),
        150,
        240,
        cmd_parity,
        check_parity,
    ),
    Step("bench-train", _what_bench("train"), 150, 180, lambda c: bench_commands(c, "train"), check_bench),
    Step("bench-sample", _what_bench("sample"), 150, 180, lambda c: bench_commands(c, "sample"), check_bench),
    Step("fsdp-train", _what_fsdp("train"), 150, 240, cmd_fsdp_train, check_fsdp_train),
    Step("fsdp-resume", _what_fsdp("resume"), 120, 180, cmd_fsdp_resume, check_fsdp_resume, needs=("fsdp-train",)),
    Step("fsdp-sample", _what_fsdp("sample"), 90, 120, cmd_fsdp_sample, check_fsdp_sample, needs=("fsdp-train",)),
    Step(
        "bench-train-vs-dense",
        _what_bench("train", "--vs-dense"),
        150,
        180,
        lambda c: bench_commands(c, "train", vs_dense=True),
        check_bench,
    ),
    Step(
        "bench-train-compile",
        _what_bench("train", "--compile"),
        240,
        360,
        lambda c: bench_commands(c, "train", compile_=True),
        check_bench,
    ),
    Step(
        "bench-sample-compile",
        _what_bench("sample", "--compile"),
        200,
        360,
        lambda c: bench_commands(c, "sample", compile_=True),
        check_bench,
    ),
)
STEP_NAMES = tuple(s.name for s in STEPS)
STEP_NAMES = tuple(s.name for s in STEPS)
