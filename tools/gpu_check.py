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
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HELPER = REPO / "tools" / "gpu_check_helper.py"
MIN_STEP_SECONDS = 15.0
KILL_GRACE_SECONDS = 10.0

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


# ----------------------------------------------------------------------------------------------------------------------
# configuration of one run
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Context:
    device: str
    quick: bool
    python: str
    workdir: Path
    out: Path
    env: dict
    results: dict = field(default_factory=dict)  # step name -> record

    @property
    def run_dir(self) -> Path:
        return self.workdir / "shapes-fsdp"

    @property
    def llm_dir(self) -> Path:
        return self.workdir / "llm"

    @property
    def memory_file(self) -> Path:
        return self.workdir / "memory.json"


def _bench(ctx: Context, mode: str, *, compile_: bool = False, vs_dense: bool = False) -> list[list[str]]:
    if ctx.quick:
        argv = [
            "--preset",
            "tiny",
            "--device",
            ctx.device,
            "--threads",
            "1",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--batch-size",
            "2" if mode == "train" else "1",
        ]
    else:
        batch = "4" if vs_dense else "8"
        iters = {("train", False): ("5", "2"), ("train", True): ("3", "1"), ("sample", False): ("2", "1")}
        n, w = iters[(mode, vs_dense)]
        argv = ["--preset", "fusedit-2b", "--device", ctx.device, "--batch-size", batch, "--iters", n, "--warmup", w]
    if compile_:
        argv.append("--compile")
    if vs_dense:
        argv.append("--vs-dense")
    return [[ctx.python, "-m", "fusedit.cli", "bench", mode, *argv]]


def train_overrides(ctx: Context, max_steps: int) -> list[str]:
    """``fusedit train demo`` overrides of the FSDP step: the shapes world with a random LLM, bf16, FSDP2."""
    common = [
        f"text.llm={ctx.llm_dir}",
        "train.distributed=fsdp",
        "train.mixed_precision=bf16",
        "train.sample_every=0",
        f"train.max_steps={max_steps}",
    ]
    if ctx.quick:
        return common + [
            "data.resolution=16",
            "model.sample_size=16",
            "model.patch_size=4",
            "model.dit_hidden_size=32",
            "model.dit_intermediate_size=48",
            "train.batch_size=4",
            "train.checkpoint_every=2",
            "train.log_every=1",
            "train.warmup_steps=1",
            "text.max_length=12",
        ]
    # the demo's model and data (32 px pixel space, patch 4) on a random 4-layer LLM of width 256, LLM in bf16
    return common + [
        "text.dtype=auto",
        "train.batch_size=32",
        "train.checkpoint_every=50",
        "train.log_every=10",
        "train.warmup_steps=10",
        "train.ema_every=1",
    ]


def fsdp_steps(ctx: Context) -> tuple[int, int]:
    """(steps of the first run, steps after the resume)."""
    return (4, 6) if ctx.quick else (100, 150)


def _torchrun(ctx: Context, cli_args: list[str]) -> list[str]:
    return [
        ctx.python,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "1",
        str(HELPER),
        "cli",
        *cli_args,
    ]


def _make_llm(ctx: Context) -> list[str]:
    size = (
        [
            "--hidden",
            "32",
            "--layers",
            "2",
            "--heads",
            "2",
            "--kv-heads",
            "1",
            "--head-dim",
            "16",
            "--intermediate",
            "48",
        ]
        if ctx.quick
        else [
            "--hidden",
            "256",
            "--layers",
            "4",
            "--heads",
            "4",
            "--kv-heads",
            "2",
            "--head-dim",
            "64",
            "--intermediate",
            "512",
        ]
    )
    return [ctx.python, str(HELPER), "make-llm", "--out", str(ctx.llm_dir), *size]


def cmd_environment(ctx: Context) -> list[list[str]]:
    probe = (
        "import json, platform, sys\n"
        "import torch, transformers, diffusers, safetensors, tokenizers, yaml, PIL, numpy, tqdm\n"
        "import fusedit\n"
        "info = {'python': sys.version.split()[0], 'executable': sys.executable, 'platform': platform.platform(),\n"
        "        'torch': torch.__version__, 'torch_cuda': torch.version.cuda,\n"
        "        'transformers': transformers.__version__,\n"
        "        'diffusers': diffusers.__version__, 'fusedit': fusedit.__version__,\n"
        "        'fusedit_path': fusedit.__file__, 'cuda_available': torch.cuda.is_available(),\n"
        "        'cpu_count': __import__('os').cpu_count()}\n"
        "if torch.cuda.is_available():\n"
        "    p = torch.cuda.get_device_properties(0)\n"
        "    info.update(device_name=p.name, device_count=torch.cuda.device_count(),\n"
        "                device_memory_gib=p.total_memory / 2**30, capability=f'{p.major}.{p.minor}',\n"
        "                multiprocessors=p.multi_processor_count)\n"
        "print(json.dumps(info))\n"
    )
    return [[ctx.python, "-c", probe]]


def cmd_parity(ctx: Context) -> list[list[str]]:
    argv = [ctx.python, str(HELPER), "parity", "--device", ctx.device]
    if ctx.quick:
        argv += ["--limit", "2"]
    return [argv]


def cmd_fsdp_train(ctx: Context) -> list[list[str]]:
    first, _ = fsdp_steps(ctx)
    return [
        _make_llm(ctx),
        _torchrun(
            ctx,
            [
                "train",
                "demo",
                *train_overrides(ctx, first),
                "--run-dir",
                str(ctx.run_dir),
                "--device",
                ctx.device.split(":")[0],
            ],
        ),
    ]


def cmd_fsdp_resume(ctx: Context) -> list[list[str]]:
    _, second = fsdp_steps(ctx)
    return [
        _torchrun(
            ctx,
            [
                "train",
                "demo",
                *train_overrides(ctx, second),
                "--allow-change",
                "train.max_steps",
                "--run-dir",
                str(ctx.run_dir),
                "--device",
                ctx.device.split(":")[0],
            ],
        )
    ]


def cmd_fsdp_sample(ctx: Context) -> list[list[str]]:
    steps = "3" if ctx.quick else "25"
    return [
        [
            ctx.python,
            str(HELPER),
            "cli",
            "sample",
            str(ctx.run_dir),
            "--prompt",
            "a red circle to the left of a blue square",
            "--out",
            str(ctx.workdir / "sample.png"),
            "--steps",
            steps,
            "--cfg",
            "4",
            "--num-images",
            "1",
            "--device",
            ctx.device,
        ]
    ]


# ----------------------------------------------------------------------------------------------------------------------
# checks of each step's output
# ----------------------------------------------------------------------------------------------------------------------


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


def _finite(x) -> bool:
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
    if not _finite(speed):
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
        speeds = [r["img_per_s"] for r in records[1:] if _finite(r.get("img_per_s"))]  # the first window has warm-up
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
    bad = [r.get("step") for r in records if not _finite(r.get("loss"))]
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
    Step("bench-train", _what_bench("train"), 150, 180, lambda c: _bench(c, "train"), check_bench),
    Step("bench-sample", _what_bench("sample"), 150, 180, lambda c: _bench(c, "sample"), check_bench),
    Step("fsdp-train", _what_fsdp("train"), 150, 240, cmd_fsdp_train, check_fsdp_train),
    Step("fsdp-resume", _what_fsdp("resume"), 120, 180, cmd_fsdp_resume, check_fsdp_resume, needs=("fsdp-train",)),
    Step("fsdp-sample", _what_fsdp("sample"), 90, 120, cmd_fsdp_sample, check_fsdp_sample, needs=("fsdp-train",)),
    Step(
        "bench-train-vs-dense",
        _what_bench("train", "--vs-dense"),
        150,
        180,
        lambda c: _bench(c, "train", vs_dense=True),
        check_bench,
    ),
    Step(
        "bench-train-compile",
        _what_bench("train", "--compile"),
        240,
        360,
        lambda c: _bench(c, "train", compile_=True),
        check_bench,
    ),
    Step(
        "bench-sample-compile",
        _what_bench("sample", "--compile"),
        200,
        360,
        lambda c: _bench(c, "sample", compile_=True),
        check_bench,
    ),
)
STEP_NAMES = tuple(s.name for s in STEPS)


# ----------------------------------------------------------------------------------------------------------------------
# running a step
# ----------------------------------------------------------------------------------------------------------------------


def _children_of(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc; empty where there is none)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    out, stack = [], [pid]
    while stack:
        for child in parents.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def _signal_tree(pid: int, sig: int) -> None:
    """Send ``sig`` to the process group of ``pid`` (started with a new session) and to each descendant by id (torchrun
    workers may sit in their own sessions)."""
    targets = _children_of(pid)
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for child in targets:
        try:
            os.kill(child, sig)
        except (ProcessLookupError, PermissionError):
            pass


class GpuMemoryPoller:
    """Peak of ``nvidia-smi``'s used memory of GPU 0 while a step runs (whole device: CUDA context, cache and all)."""

    def __init__(self, enabled: bool, period: float = 0.5):
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.period, self.peak_mib = period, None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                ).stdout
                value = float(out.strip().splitlines()[0])
                self.peak_mib = value if self.peak_mib is None else max(self.peak_mib, value)
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass
            self._stop.wait(self.period)

    def __enter__(self):
        if self.enabled:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)


def run_command(argv: list[str], env: dict, timeout: float, stdout_path: Path, stderr_path: Path) -> dict:
    """Run ``argv`` in its own session; kill its whole tree at ``timeout``. Returns returncode, timed_out, seconds and
    the peak RSS of the process tree (``wait4``: the largest of the process and its waited-for descendants)."""
    started = time.monotonic()
    with open(stdout_path, "ab") as out, open(stderr_path, "ab") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=REPO, start_new_session=True)
        timed_out, status, usage = False, None, None
        deadline, killed_at = started + timeout, None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            now = time.monotonic()
            if now >= deadline and killed_at is None:
                timed_out, killed_at = True, now
                _signal_tree(proc.pid, signal.SIGTERM)
            elif killed_at is not None and now >= killed_at + KILL_GRACE_SECONDS:
                _signal_tree(proc.pid, signal.SIGKILL)
                killed_at = math.inf  # sent once
            time.sleep(0.1)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if timed_out:  # stragglers that left the group
        _signal_tree(proc.pid, signal.SIGKILL)
    return {
        "returncode": proc.returncode,
        "timed_out": timed_out,
        "seconds": time.monotonic() - started,
        "peak_rss_gib": usage.ru_maxrss / 2**20 if usage else None,
    }


LOG_CAP_BYTES = (256 * 1024, 1280 * 1024)  # head and tail of one step's output kept in gpu_check.log


def _capped(data: bytes) -> bytes:
    """A step's output for the combined log, at most about 1.5 MB (the device tool returns files up to 16 MB)."""
    head, tail = LOG_CAP_BYTES
    if len(data) <= head + tail:
        return data
    return data[:head] + f"\n[... {len(data) - head - tail} bytes cut ...]\n".encode() + data[-tail:]


def _tail(text: str, lines: int = 40) -> str:
    rows = [row for row in text.replace("\r", "\n").splitlines() if row.strip()]
    return "\n".join(rows[-lines:])


def planted_command(kind: str, python: str) -> list[str]:
    if kind == "hang":
        return [python, "-c", "import time; print('planted hang', flush=True); time.sleep(3600)"]
    return [python, "-c", "import sys; print('planted failure', file=sys.stderr); sys.exit(3)"]


def run_step(step: Step, ctx: Context, timeout: float, planted: str | None, log) -> dict:
    """Run every command of ``step`` (stopping at the first failure), check the result, return the record."""
    stdout_path, stderr_path = ctx.workdir / f"{step.name}.out", ctx.workdir / f"{step.name}.err"
    for path in (stdout_path, stderr_path):
        path.write_bytes(b"")
    commands = step.commands(ctx)
    if planted is not None:
        commands = [planted_command(planted, ctx.python)]
    started = time.monotonic()
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
    env = dict(ctx.env)
    env["GPU_CHECK_MEMORY_FILE"] = str(ctx.memory_file)
    for stale in ctx.workdir.glob(ctx.memory_file.name + ".rank*"):
        stale.unlink()
    rss = []
    with GpuMemoryPoller(ctx.device.startswith("cuda")) as poller:
        for argv in commands:
            left = timeout - (time.monotonic() - started)
            if left <= 0:
                result = {"returncode": None, "timed_out": True, "peak_rss_gib": None}
            else:
                log.write(f"\n===== {step.name}: {' '.join(argv)}\n".encode())
                log.flush()
                result = run_command(argv, env, left, stdout_path, stderr_path)
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
    record["seconds"] = round(time.monotonic() - started, 2)
    stdout = stdout_path.read_text(errors="replace")
    stderr = stderr_path.read_text(errors="replace")
    log.write(_capped((stdout + stderr).encode(errors="replace")))
    log.flush()
    if record["status"] != "timeout" and planted is None:
        # also after a failed command: its JSON (e.g. the parity table) says what failed
        try:
            error, metrics = step.check(ctx, stdout, stderr)
        except Exception as exc:  # a broken check is a failed step, not a crashed runner
            error, metrics = f"check raised {type(exc).__name__}: {exc}", {}
        record["metrics"] = metrics
        if record["status"] == "pass" and error:
            record["status"], record["error"] = "fail", error
        elif record["status"] == "fail" and error:
            record["error"] += f"; {error}"
    memory = record["peak_memory"]
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
    if _finite(bench_memory):
        memory["reported_gib"] = round(bench_memory, 3)
        memory["reported_source"] = record["metrics"].get("memory_source", "cuda max_memory_allocated")
    dense = record["metrics"].get("dense") or {}
    if _finite(dense.get("peak_memory_gib")):
        memory["dense_reported_gib"] = round(dense["peak_memory_gib"], 3)
    if poller.peak_mib is not None:
        memory["nvidia_smi_used_gib"] = round(poller.peak_mib / 1024, 3)
    if record["status"] != "pass":
        record["output_tail"] = _tail(stdout + "\n" + stderr, 25)
    return record


def _shorten(arg: str) -> str:
    """Commands in the JSON: paths inside the repository relative to it; code passed with -c elided."""
    if "\n" in arg:
        return "'<probe>'"
    return arg.replace(str(REPO) + os.sep, "")


# ----------------------------------------------------------------------------------------------------------------------
# summary
# ----------------------------------------------------------------------------------------------------------------------


def compare_targets(results: dict, quick: bool, device: str) -> list[dict]:
    out = []
    for target in TARGETS:
        measured = {}
        for name in target["steps"]:
            value = results.get(name, {}).get("metrics", {}).get(target["metric"])
            if results.get(name, {}).get("status") == "pass" and _finite(value):
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


def _git_commit() -> str | None:
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
        t.get("best")
        lines.append(
            f"target {t['name']}: {t['target']} {t['unit']}; measured "
            f"{json.dumps(t['measured'])}; met: {t['met']}" + (f" ({t['note']})" if t.get("note") else "")
        )
    return "\n".join(lines)


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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = args.device
    if device.split(":")[0] not in ("cuda", "cpu"):
        parser.error(f"--device must be cuda or cpu, got {device!r}")
    only, skip = _split(args.only), _split(args.skip)
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
    for name in [*only, *skip, *planted, *timeouts]:
        if name not in STEP_NAMES:
            parser.error(f"unknown step {name!r}; steps: {', '.join(STEP_NAMES)}")
    for kind in planted.values():
        if kind not in ("fail", "hang"):
            parser.error(f"--plant-failure kinds are 'fail' and 'hang', got {kind!r}")
    budget = args.budget if args.budget is not None else (1200.0 if args.quick else 450.0)

    out = Path(args.out or os.environ.get("OUT") or REPO / "runs" / "gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="fusedit-gpu-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    src = str(REPO / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("GPU_CHECK_PLANT_FAILURE", None)
    ctx = Context(device=device, quick=args.quick, python=sys.executable, workdir=workdir, out=out, env=env)

    jsonl = open(out / "gpu_check.jsonl", "w")
    log = open(out / "gpu_check.log", "wb")

    def emit(record: dict) -> None:
        line = json.dumps(record, default=str)
        print(line, flush=True)
        jsonl.write(line + "\n")
        jsonl.flush()

    started = time.monotonic()
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    records = []
    try:
        for step in STEPS:
            if (only and step.name not in only and step.name != "environment") or step.name in skip:
                continue
            elapsed = time.monotonic() - started
            left = budget - elapsed
            base = timeouts.get(
                step.name, step.timeout_cuda if device.startswith("cuda") and not args.quick else step.timeout_cpu
            )
            missing = [n for n in step.needs if ctx.results.get(n, {}).get("status") != "pass"]
            if missing:
                record = {
                    "step": step.name,
                    "what": step.what(ctx),
                    "status": "skipped",
                    "seconds": 0,
                    "error": f"needs {', '.join(missing)}, which did not pass",
                }
            elif ctx.results.get("environment", {}).get("status") not in (None, "pass"):
                record = {
                    "step": step.name,
                    "what": step.what(ctx),
                    "status": "skipped",
                    "seconds": 0,
                    "error": "the environment step did not pass",
                }
            elif left < MIN_STEP_SECONDS:
                record = {
                    "step": step.name,
                    "what": step.what(ctx),
                    "status": "skipped",
                    "seconds": 0,
                    "error": f"budget exhausted ({elapsed:.0f} s of {budget:.0f} s used)",
                }
            else:
                record = run_step(step, ctx, min(base, left), planted.get(step.name), log)
            ctx.results[step.name] = record
            records.append(record)
            emit(record)
            if record["status"] != "pass" and record.get("output_tail"):
                print(
                    f"--- {step.name} {record['status']}: last lines of its output ---\n{record['output_tail']}\n---",
                    file=sys.stderr,
                    flush=True,
                )
        targets = compare_targets(ctx.results, args.quick, device)
        env_info = ctx.results.get("environment", {}).get("metrics", {})
        failed = [r["step"] for r in records if r["status"] in ("fail", "timeout")]
        skipped = [r["step"] for r in records if r["status"] == "skipped"]
        missed = [t["name"] for t in targets if t["met"] is False]
        ok = not failed and not skipped and bool(records) and not (args.strict_targets and missed)
        summary = {
            "step": "summary",
            "ok": ok,
            "date_utc": date,
            "device": device,
            "quick": args.quick,
            "device_name": env_info.get("device_name"),
            "torch": env_info.get("torch"),
            "torch_cuda": env_info.get("torch_cuda"),
            "python": env_info.get("python"),
            "transformers": env_info.get("transformers"),
            "diffusers": env_info.get("diffusers"),
            "git_commit": _git_commit(),
            "seconds": round(time.monotonic() - started, 1),
            "budget_s": budget,
            "passed": [r["step"] for r in records if r["status"] == "pass"],
            "failed": failed,
            "skipped": skipped,
            "targets": targets,
            "targets_missed": missed,
            "strict_targets": args.strict_targets,
            "peak_memory": {r["step"]: r.get("peak_memory", {}) for r in records if r.get("peak_memory")},
            "out": str(out),
            "planted": planted or None,
        }
        print(human_table(records, targets), file=sys.stderr, flush=True)
        emit(summary)
    finally:
        jsonl.close()
        log.close()
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
