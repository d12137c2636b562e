"""``tools/gpu_check.sh``, the prepared GPU check (issue 16), proven end to end on the CPU: every step at tiny size
(``--device cpu --quick``), one JSON line per step and a summary, and a non-zero exit when a step fails, hangs past
its timeout, or the budget runs out."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .tool_loader import load_tool

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "gpu_check.sh"


gpu_check = load_tool("gpu_check")


def run_check(tmp_path, *args, timeout=900):
    """Run the script with this interpreter; returns ``(exit status, JSON records from stdout, stderr)``."""
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    env.pop("GPU_CHECK_PLANT_FAILURE", None)
    proc = subprocess.run(
        ["bash", str(SCRIPT), *args, "--out", str(tmp_path / "out")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every stdout line is one JSON object
    assert records and records[-1]["step"] == "summary", proc.stdout + proc.stderr
    written = (tmp_path / "out" / "gpu_check.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in written] == records
    return proc.returncode, records, proc.stderr


@pytest.mark.slow
def test_quick_cpu_run_passes_every_step(tmp_path):
    code, records, stderr = run_check(tmp_path, "--device", "cpu", "--quick")
    steps, summary = records[:-1], records[-1]
    assert code == 0, stderr[-3000:]
    assert [r["step"] for r in steps] == list(gpu_check.STEP_NAMES)
    assert all(r["status"] == "pass" for r in steps), [(r["step"], r.get("error")) for r in steps]
    assert summary["ok"] and summary["passed"] == list(gpu_check.STEP_NAMES) and not summary["failed"]
    by_name = {r["step"]: r for r in steps}
    assert by_name["parity"]["metrics"]["fixtures"] == 2
    assert by_name["parity"]["metrics"]["max_fp32_abs_vs_cpu"] <= 1e-4
    assert by_name["bench-train"]["metrics"]["img_per_s"] > 0
    assert by_name["bench-sample"]["metrics"]["s_per_image"] > 0
    assert by_name["bench-train-compile"]["metrics"]["compile"] is True
    assert by_name["bench-train-vs-dense"]["metrics"]["speedup_vs_dense"] > 0
    assert by_name["fsdp-train"]["metrics"]["last_step"] == 4
    assert by_name["fsdp-resume"]["metrics"]["resumed_from_step"] == 4
    assert by_name["fsdp-resume"]["metrics"]["steps_after_resume"] == [5, 6]
    assert (tmp_path / "out" / "gpu_check_sample.png").stat().st_size > 0
    for r in steps:  # peak memory of each step
        assert r["peak_memory"]["process_peak_rss_gib"] > 0, r["step"]
    # targets are compared on CUDA only; on the CPU they are reported as not applicable
    assert [t["met"] for t in summary["targets"]] == [None, None]
    assert set(summary["targets"][0]["measured"]) == {"eager", "compiled"}
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "===== fsdp-resume" in log


@pytest.mark.slow  # several seconds: subprocesses / the full control set
def test_planted_failure_exits_nonzero(tmp_path):
    code, records, stderr = run_check(
        tmp_path,
        "--device",
        "cpu",
        "--quick",
        "--only",
        "bench-train",
        "--skip",
        "environment",
        "--plant-failure",
        "bench-train",
    )
    assert code == 1
    assert [r["step"] for r in records] == ["bench-train", "summary"]
    failed = records[0]
    assert failed["status"] == "fail" and failed["returncode"] == 3 and failed["planted"] == "fail"
    assert "planted failure" in failed["output_tail"] and "planted failure" in stderr
    assert records[-1]["ok"] is False and records[-1]["failed"] == ["bench-train"]


@pytest.mark.slow  # several seconds: subprocesses / the full control set
def test_planted_hang_is_killed_at_the_step_timeout(tmp_path):
    code, records, _ = run_check(
        tmp_path,
        "--device",
        "cpu",
        "--quick",
        "--only",
        "parity",
        "--skip",
        "environment",
        "--plant-failure",
        "parity:hang",
        "--step-timeout",
        "parity=2",
    )
    assert code == 1
    hung = records[0]
    assert hung["step"] == "parity" and hung["status"] == "timeout"
    assert hung["seconds"] < 2 + gpu_check.KILL_GRACE_SECONDS + 5
    assert records[-1]["failed"] == ["parity"]


@pytest.mark.slow  # several seconds: subprocesses / the full control set
def test_steps_that_need_a_failed_step_are_skipped(tmp_path):
    only = "fsdp-train,fsdp-resume,fsdp-sample"
    code, records, _ = run_check(
        tmp_path, "--device", "cpu", "--quick", "--only", only, "--skip", "environment", "--plant-failure", "fsdp-train"
    )
    assert code == 1
    statuses = [(r["step"], r["status"]) for r in records[:-1]]
    assert statuses == [("fsdp-train", "fail"), ("fsdp-resume", "skipped"), ("fsdp-sample", "skipped")]
    assert all(r["error"] == "needs fsdp-train, which did not pass" for r in records[1:-1])
    assert records[-1]["skipped"] == ["fsdp-resume", "fsdp-sample"] and records[-1]["ok"] is False


@pytest.mark.slow  # several seconds: subprocesses / the full control set
def test_exhausted_budget_skips_steps_and_fails(tmp_path):
    code, records, _ = run_check(tmp_path, "--device", "cpu", "--quick", "--only", "bench-train", "--budget", "1")
    assert code == 1
    assert [(r["step"], r["status"]) for r in records[:-1]] == [("environment", "skipped"), ("bench-train", "skipped")]
    assert "budget exhausted" in records[0]["error"]
    assert records[-1]["skipped"] == ["environment", "bench-train"] and records[-1]["ok"] is False


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine may have a GPU")
@pytest.mark.slow  # several seconds: subprocesses / the full control set
def test_cuda_run_without_cuda_fails_fast(tmp_path):
    """On a machine without CUDA the environment step fails and every other step is skipped at once."""
    code, records, _ = run_check(tmp_path, "--only", "bench-train", timeout=120)
    assert code == 1
    assert records[0]["step"] == "environment" and records[0]["status"] == "fail"
    assert "CUDA is not available" in records[0]["error"]
    assert records[1]["status"] == "skipped"


def test_unknown_step_is_a_usage_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "gpu_check.py"), "--only", "nope"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "unknown step 'nope'" in proc.stderr


def test_fixture_discovery_counts_a_vendored_copy_once(tmp_path):
    helper = load_tool("gpu_check_helper")
    for root in ("vendored", "copy"):
        folder = tmp_path / root / "reference-tiny"
        (folder / "pipeline").mkdir(parents=True)
        (folder / "expected.json").write_text("{}")
        (folder / "expected.safetensors").write_bytes(b"same bytes")
    other = tmp_path / "copy" / "other"
    (other / "pipeline").mkdir(parents=True)
    (other / "expected.json").write_text("{}")
    (other / "expected.safetensors").write_bytes(b"other bytes")
    found = helper.find_fixtures([tmp_path / "vendored", tmp_path / "missing", tmp_path / "copy"])
    assert found == [other, tmp_path / "vendored" / "reference-tiny"]
    assert helper.default_fixture_roots()[0] == REPO / "tests" / "fixtures"


def test_fixtures_used_by_the_tests_are_found():
    """Every reference fixture the tests use is in the parity step (the variants and ``reference-tiny``)."""
    helper = load_tool("gpu_check_helper")
    names = {f.name for f in helper.find_fixtures(helper.default_fixture_roots())}
    index = json.loads((REPO / "tests" / "fixtures" / "reference_variants" / "index.json").read_text())
    assert set(index["variants"]) <= names and "reference-tiny" in names


def test_targets_compare_the_best_of_eager_and_compiled():
    def bench(metric, value):
        return {"status": "pass", "metrics": {metric: value}}

    results = {
        "bench-train": bench("img_per_s", 35.0),
        "bench-train-compile": bench("img_per_s", 41.0),
        "bench-sample": bench("s_per_image", 0.5),
        "bench-sample-compile": {"status": "timeout", "metrics": {}},
    }
    train, sample = gpu_check.compare_targets(results, quick=False, device="cuda")
    assert train["measured"] == {"eager": 35.0, "compiled": 41.0} and train["best"] == 41.0 and train["met"] is True
    assert train["vs_reference"] == pytest.approx(41.0 / 16.0)
    assert sample["measured"] == {"eager": 0.5} and sample["met"] is False
    assert sample["vs_reference"] == pytest.approx(1.08 / 0.5)
    none = gpu_check.compare_targets({}, quick=False, device="cuda")
    assert [t["met"] for t in none] == [False, False]


def test_gpu_memory_poller_reads_nvidia_smi(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 2048\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with gpu_check.GpuMemoryPoller(True, period=0.05) as poller:
        import time

        time.sleep(0.5)
    assert poller.peak_mib == 2048.0
    assert gpu_check.GpuMemoryPoller(False).enabled is False


@pytest.mark.slow
def test_parity_over_tolerance_fails_with_the_table(tmp_path):
    """A fixture over the fp32 tolerance fails the helper (exit 1) and says which one and by how much."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "gpu_check_helper.py"),
            "parity",
            "--device",
            "cpu",
            "--limit",
            "1",
            "--tolerance",
            "-1",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["ok"] is False and result["fixtures"] == 1 and len(result["failed"]) == 1
    entry = result["results"][0]
    assert entry["pass"] is False and "tolerance -1" in entry["error"]
    assert entry["fp32_max_abs_vs_cpu"] == 0.0 and entry["cpu_max_abs_vs_reference"] < 1e-4
    metrics_error, metrics = gpu_check.check_parity(None, proc.stdout, proc.stderr)
    assert metrics["failed"] == result["failed"] and "over tolerance" in metrics_error
