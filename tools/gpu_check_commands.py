"""The GPU check's steps as commands: one run's configuration (:class:`Context`) and, per step, the command lines it
runs (``fusedit bench``, ``torchrun ... fusedit train``, ``fusedit sample`` and ``tools/gpu_check_helper.py``).

Standard library only: the runner (``tools/gpu_check.py``) must start where torch is missing, to say so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HELPER = REPO / "tools" / "gpu_check_helper.py"


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


def bench_commands(ctx: Context, mode: str, *, compile_: bool = False, vs_dense: bool = False) -> list[list[str]]:
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
        "train.optimizer=adamw",  # the demo's Muon needs whole matrices; FSDP shards them
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


def _fsdp_train(ctx: Context, max_steps: int, extra: list[str]) -> list[str]:
    """``torchrun ... fusedit train demo`` of the FSDP steps into ``ctx.run_dir``, for ``max_steps`` steps."""
    device = ctx.device.split(":")[0]
    overrides = train_overrides(ctx, max_steps)
    return _torchrun(ctx, ["train", "demo", *overrides, *extra, "--run-dir", str(ctx.run_dir), "--device", device])


def cmd_fsdp_train(ctx: Context) -> list[list[str]]:
    first, _ = fsdp_steps(ctx)
    return [_make_llm(ctx), _fsdp_train(ctx, first, [])]


def cmd_fsdp_resume(ctx: Context) -> list[list[str]]:
    _, second = fsdp_steps(ctx)
    return [_fsdp_train(ctx, second, ["--allow-change", "train.max_steps"])]


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
