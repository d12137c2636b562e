"""The GPU check's verdicts: each step's output (stdout, stderr, the files it wrote) read into ``(error, metrics)``,
``error`` None when the step did what it should.

Standard library only (see ``tools/gpu_check.py``).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from gpu_check_commands import Context, fsdp_steps


def last_json(text: str) -> dict | None:
    """The last line of ``text`` that is a JSON object (fusedit bench and the helper end with one)."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None


def is_finite_number(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def check_environment(ctx: Context, stdout: str, stderr: str) -> tuple[str | None, dict]:
    info = last_json(stdout)
    if info is None:
        return "could not import torch / fusedit and its dependencies (see the log)", {}
    if ctx.device.startswith("cuda") and not info.get("cuda_available"):
        return f"CUDA is not available to {info.get('executable')} (torch {info.get('torch')})", info
    return None, info


def check_parity(ctx: Context, stdout: str, stderr: str) -> tuple[str | None, dict]:
    data = last_json(stdout)
    if data is None:
        return "no JSON result from the parity helper", {}
    metrics = {
        k: data.get(k)
        for k in (
            "fixtures",
            "failed",
            "tolerance_fp32",
            "max_fp32_abs_vs_cpu",
            "max_fp32_abs_vs_reference",
            "max_cpu_abs_vs_reference",
            "max_bf16_abs_vs_cpu_fp32",
            "missing_roots",
            "device_name",
        )
    }
    metrics["per_fixture"] = {
        r["fixture"]: {
            k: r.get(k)
            for k in (
                "fp32_max_abs_vs_cpu",
                "fp32_max_abs_vs_reference",
                "cpu_max_abs_vs_reference",
                "bf16_max_abs_vs_cpu_fp32",
                "error",
            )
            if k in r
        }
        for r in data.get("results", [])
    }
    if data.get("peak_memory_gib") is not None:
        metrics["peak_memory_gib"] = data["peak_memory_gib"]
    if not data.get("ok"):
        return data.get("error") or f"fixtures over tolerance or failing: {data.get('failed')}", metrics
    return None, metrics


BENCH_KEYS = (
    "preset",
    "device_name",
    "dtype",
    "batch_size",
    "iters",
    "warmup",
    "compile",
    "img_per_s",
    "s_per_image",
    "time_per_iter_s",
    "min_time_s",
    "mfu",
    "achieved_tflops",
    "peak_memory_gib",
    "memory_source",
    "speedup_vs_dense",
    "dit_params_m",
    "llm_params_m",
)


def check_bench(ctx: Context, stdout: str, stderr: str) -> tuple[str | None, dict]:
    data = last_json(stdout)
    if data is None:
        return "no JSON result from fusedit bench", {}
    metrics = {k: data[k] for k in BENCH_KEYS if k in data}
    if "dense" in data:
        metrics["dense"] = {
            k: data["dense"].get(k) for k in ("img_per_s", "s_per_image", "time_per_iter_s", "peak_memory_gib", "error")
        }
    if data.get("error"):
        return f"bench error: {data['error']}", metrics
    speed = data.get("img_per_s", data.get("s_per_image"))
    if not is_finite_number(speed):
        return f"no finite speed in the bench result ({speed!r})", metrics
    if "dense" in data and data["dense"].get("error"):
        return f"dense formulation: {data['dense']['error']}", metrics
    return None, metrics


def _read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _check_run(run_dir: Path, steps: int) -> tuple[str | None, dict]:
    latest = run_dir / "checkpoints" / "latest"
    want = f"step-{steps:06d}"
    records = _read_metrics(run_dir)
    metrics = {"logged_steps": len(records)}
    if records:
        last = records[-1]
        metrics.update(last_step=last.get("step"), last_loss=last.get("loss"), last_grad_norm=last.get("grad_norm"))
        speeds = [
            r["img_per_s"] for r in records[1:] if is_finite_number(r.get("img_per_s"))
        ]  # the first window has warm-up
        if speeds:
            metrics["img_per_s_median"] = sorted(speeds)[len(speeds) // 2]
    if not latest.is_file() or latest.read_text().strip() != want:
        found = latest.read_text().strip() if latest.is_file() else None
        return f"checkpoints/latest is {found!r}, expected {want!r}", metrics
    if not (run_dir / "checkpoints" / want / "dcp").is_dir():
        return f"checkpoint {want} has no dcp/ folder (expected a sharded FSDP checkpoint)", metrics
    if not (run_dir / "final").is_dir():
        return "no final/ weights", metrics
    if metrics.get("last_step") != steps:
        return f"metrics.jsonl ends at step {metrics.get('last_step')}, expected {steps}", metrics
    bad = [r.get("step") for r in records if not is_finite_number(r.get("loss"))]
    if bad:
        return f"non-finite loss at logged steps {bad}", metrics
    return None, metrics


def check_fsdp_train(ctx: Context, stdout: str, stderr: str) -> tuple[str | None, dict]:
    first, _ = fsdp_steps(ctx)
    return _check_run(ctx.run_dir, first)


def check_fsdp_resume(ctx: Context, stdout: str, stderr: str) -> tuple[str | None, dict]:
    first, second = fsdp_steps(ctx)
    error, metrics = _check_run(ctx.run_dir, second)
    text = stdout + stderr
    marker = f"resumed from {ctx.run_dir / 'checkpoints' / f'step-{first:06d}'} (step {first}"
    metrics["resumed_from_step"] = first if marker in text else None
    if error is None and marker not in text:
        error = f"the log does not say {marker!r}: the run did not resume from step {first}"
    records = _read_metrics(ctx.run_dir)
    metrics["steps_after_resume"] = sorted(r["step"] for r in records if r.get("step", 0) > first)
    return error, metrics


def check_fsdp_sample(ctx: Context, stdout: str, stderr: str) -> tuple[str | None, dict]:
    image = ctx.workdir / "sample.png"
    if not image.is_file() or image.stat().st_size == 0:
        return f"no image written at {image}", {}
    target = ctx.out / "gpu_check_sample.png"
    shutil.copyfile(image, target)
    return None, {"image": str(target), "bytes": image.stat().st_size}
