"""The GPU check's summary: the benchmarks against the performance targets, the commit, and a table for people.

Standard library only (see ``tools/gpu_check.py``).
"""

from __future__ import annotations

import json
import os
import subprocess

from gpu_check_checks import is_finite_number
from gpu_check_commands import REPO
from gpu_check_steps import TARGETS


def compare_targets(results: dict, quick: bool, device: str) -> list[dict]:
    out = []
    for target in TARGETS:
        measured = {}
        for name in target["steps"]:
            value = results.get(name, {}).get("metrics", {}).get(target["metric"])
            if results.get(name, {}).get("status") == "pass" and is_finite_number(value):
                measured["compiled" if "compile" in name else "eager"] = value
        entry = {
            "name": target["name"],
            "unit": target["unit"],
            "target": f"{target['direction']} {target['target']:g}",
            "reference_h200": target["reference_h200"],
            "measured": measured,
        }
        if measured:
            best = max(measured.values()) if target["direction"] == ">=" else min(measured.values())
            entry["best"] = best
            entry["vs_reference"] = (
                best / target["reference_h200"] if target["direction"] == ">=" else target["reference_h200"] / best
            )
        if quick or not device.startswith("cuda"):
            entry["met"] = None
            entry["note"] = "not applicable: tiny preset on the CPU (--quick / --device cpu)"
        elif not measured:
            entry["met"] = False
            entry["note"] = "not measured in this run (failed, skipped or not selected)"
        else:
            entry["met"] = (
                entry["best"] >= target["target"] if target["direction"] == ">=" else entry["best"] <= target["target"]
            )
        out.append(entry)
    return out


def git_commit() -> str | None:
    """HEAD of the checkout (``-dirty`` with uncommitted changes); ``$GPU_CHECK_COMMIT`` where there is no git
    repository (a device machine gets a copy of the working tree)."""
    if os.environ.get("GPU_CHECK_COMMIT"):
        return os.environ["GPU_CHECK_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def human_table(records: list[dict], targets: list[dict]) -> str:
    lines = [f"{'step':<22} {'status':<8} {'seconds':>8}  result / memory"]
    for r in records:
        m = r.get("metrics", {})
        if "img_per_s" in m:
            what = f"{m['img_per_s']:.2f} img/s"
            if m.get("speedup_vs_dense"):
                what += f", {m['speedup_vs_dense']:.2f}x vs dense"
        elif "s_per_image" in m:
            what = f"{m['s_per_image']:.4f} s/image"
        elif "max_fp32_abs_vs_cpu" in m:
            what = (
                f"{m.get('fixtures')} fixtures, fp32 max {m['max_fp32_abs_vs_cpu']}, bf16 max "
                f"{m.get('max_bf16_abs_vs_cpu_fp32')}"
            )
        elif "last_step" in m:
            what = f"step {m['last_step']}, loss {m.get('last_loss')}"
        else:
            what = r.get("error") or ""
        mem = r.get("peak_memory", {})
        mem_text = ", ".join(f"{k}={v}" for k, v in mem.items() if isinstance(v, (int, float)))
        seconds = f"{r['seconds']:.1f}" if isinstance(r.get("seconds"), (int, float)) else "-"
        lines.append(f"{r['step']:<22} {r['status']:<8} {seconds:>8}  {what}" + (f" [{mem_text}]" if mem_text else ""))
        if r["status"] != "pass" and r.get("error"):
            lines.append(f"{'':<40}  error: {r['error']}")
    for t in targets:
        lines.append(
            f"target {t['name']}: {t['target']} {t['unit']}; measured "
            f"{json.dumps(t['measured'])}; met: {t['met']}" + (f" ({t['note']})" if t.get("note") else "")
        )
    return "\n".join(lines)
