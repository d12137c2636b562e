"""LoRA against full fine-tuning of the same model: trained parameters and peak memory (docs/finetune.md).

    python tools/finetune_memory.py runs/demo/fusedit --steps 20 [key=value ...]

Each mode trains ``--steps`` steps from the base run in a fresh process (``fusedit train``'s own code: the base
run's config with ``finetune.init_from`` and, for LoRA, ``finetune.lora.*``; key=value overrides apply to both),
in a temporary run directory. Printed, one JSON line per mode: trained and total DiT parameters, the process's peak
resident memory (``ru_maxrss``), its resident memory once the trainer was built (model, LLM and data loaded, before
the first step), and the difference (what training itself added: gradients, optimizer state, activations).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from fusedit.experiment import load_experiment
from fusedit.finetune.lora import count_parameters
from fusedit.train.launch import build_trainer

#: The LoRA settings of the tutorial's recipe (docs/finetune.md); ``--lora-targets`` changes the target modules.
LORA = ["finetune.lora.rank=4", "finetune.lora.alpha=4"]


def rss_mib() -> float:
    """The current resident set size of this process in MiB (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def child(base: str, mode: str, steps: int, overrides: list[str], targets: str = "[attention, mlp]") -> dict:
    """Train ``steps`` steps in this process; the numbers of the module docstring."""
    torch.set_num_threads(1)
    extra = [f"finetune.init_from={base}", f"train.max_steps={steps}", "train.sample_every=0"]
    extra += [f"train.checkpoint_every={steps}", "train.log_every=1000"]
    lora = [*LORA, f"finetune.lora.target_modules={targets}"] if mode == "lora" else []
    config = load_experiment(Path(base) / "config.yaml", extra + lora + overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_trainer(config, Path(run_dir), device=torch.device("cpu"), resume=False, progress=False)
        trainer.tensorboard = False
        trained, total = count_parameters(trainer.model)
        before = rss_mib()
        trainer.fit()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "mode": mode,
        "trained_params": trained,
        "total_params": total,
        "trained_percent": round(100 * trained / total, 2),
        "rss_before_training_mib": round(before, 1),
        "peak_rss_mib": round(peak, 1),
        "training_added_mib": round(peak - before, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", help="the base training run")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lora-targets", default="[attention, mlp]", help="finetune.lora.target_modules of LoRA")
    parser.add_argument("--mode", choices=["lora", "full"], help=argparse.SUPPRESS)  # one measurement (child)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    if args.mode:
        print(json.dumps(child(args.base, args.mode, args.steps, args.overrides, args.lora_targets)))
        return 0
    for mode in ("lora", "full"):
        command = [sys.executable, __file__, args.base, "--steps", str(args.steps), "--mode", mode]
        command += ["--lora-targets", args.lora_targets, *args.overrides]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode:
            print(done.stderr, file=sys.stderr)
            return done.returncode
        print(done.stdout.strip().splitlines()[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
