"""``fusedit bench train|sample --preset NAME``: throughput, MFU and memory of the production code; the last line
printed is one JSON object (its fields: :func:`fusedit.bench.runs.run_bench`)."""

from __future__ import annotations

import argparse
import json
import sys

from fusedit.bench.presets import PRESETS
from fusedit.commands.values import non_negative_int, positive_int

NAME = "bench"
HELP = "training / sampling throughput benchmark"
DESCRIPTION = (
    "Training (img/s) or sampling (s/image) throughput of FuseDiT with random weights and synthetic "
    "inputs. The last line printed is one JSON object."
)
EPILOG = "presets:\n" + "\n".join(f"  {p.name:<11} {p.description}" for p in PRESETS.values())


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mode", choices=("train", "sample"), help="train: optimiser steps; sample: 25 Euler steps with CFG")
    p.add_argument("--preset", required=True, help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="images per iteration (default: the preset's)")
    p.add_argument("--iters", type=positive_int, default=5, help="timed iterations (default: 5)")
    p.add_argument("--warmup", type=non_negative_int, default=2, help="untimed warm-up iterations (default: 2)")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="compute dtype (default: bfloat16 on cuda, float32 on cpu)",
    )
    p.add_argument(
        "--vs-dense",
        action="store_true",
        help="also time the reference's dense joint-attention formulation and report the ratio",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile each DiT block")
    p.add_argument(
        "--no-llm", action="store_true", help="leave the LLM forward out (random precomputed text keys/values)"
    )
    p.add_argument(
        "--llm-attention",
        choices=("reference", "hf"),
        default="reference",
        help="LLM attention: reference (plain softmax, like the reference's fused layers) or hf",
    )
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for PyTorch (default: PyTorch's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default: 0)")


def run(args: argparse.Namespace) -> int:
    """Print a summary line (stderr), then the result as one JSON line (stdout)."""
    from fusedit.bench.presets import BenchError
    from fusedit.bench.runs import run_bench, summary_line

    if args.preset not in PRESETS:
        args.parser.error(f"unknown preset {args.preset!r}; available presets: {', '.join(PRESETS)}")
    try:
        result = run_bench(
            args.mode,
            args.preset,
            device=args.device,
            batch_size=args.batch_size,
            vs_dense=args.vs_dense,
            iters=args.iters,
            warmup=args.warmup,
            compile=args.compile,
            dtype=args.dtype,
            llm=not args.no_llm,
            llm_attention=args.llm_attention,
            seed=args.seed,
            threads=args.threads,
        )
    except BenchError as error:
        args.parser.error(str(error))
    print(summary_line(result), file=sys.stderr)
    print(json.dumps(result))
    return 0
