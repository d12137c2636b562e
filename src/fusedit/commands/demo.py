"""``fusedit demo``: the embedded default (shapes world, tiny LLM, deep fusion, samples)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fusedit.commands.values import positive_int

NAME = "demo"
HELP = "the embedded default: shapes world, tiny LLM, deep fusion, samples"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out", default="runs/demo", help="folder of the demo's tiny LLM, run and grid (default: runs/demo)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N ... (default: CUDA when available)")
    p.add_argument("--steps", type=positive_int, default=None, help="DiT training steps (default: the demo config's)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the demo config")


def run(args: argparse.Namespace) -> int:
    from fusedit.atomic import naming_full_disk
    from fusedit.demo import run_demo

    with naming_full_disk(args.out):
        run_demo(Path(args.out), device=args.device, steps=args.steps, overrides=args.overrides)
    return 0
