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
    p.add_argument("--preset", help=f"one of: {', '.join(PRESETS)} (required unless --config)")
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
    memory = p.add_argument_group(
        "memory estimate (train only; prints a table, runs nothing: docs/performance.md, 'Memory estimate')"
    )
    memory.add_argument(
        "--estimate-memory", action="store_true", help="estimate the peak memory of a training step instead of timing"
    )
    memory.add_argument("--config", help="estimate for this training config (YAML or shipped name) instead of --preset")
    memory.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of --config")
    memory.add_argument(
        "--optimizer", choices=("adamw", "adamw8bit", "muon"), default=None, help="preset: the optimizer"
    )
    memory.add_argument("--activation-checkpointing", action="store_true", help="preset: recompute each block")
    memory.add_argument("--llm-int8", action="store_true", help="preset: the LLM's linear layers in 8 bits")
    memory.add_argument("--llm-offload", action="store_true", help="preset: the LLM on the CPU between encodings")
    memory.add_argument("--world-size", type=positive_int, default=1, help="processes (default 1)")
    memory.add_argument("--sharding", choices=("none", "ddp", "fsdp"), default=None, help="preset: how they share")


def run(args: argparse.Namespace) -> int:
    """Print a summary line (stderr), then the result as one JSON line (stdout)."""
    from fusedit.bench.presets import BenchError
    from fusedit.bench.runs import run_bench, summary_line

    if args.estimate_memory:
        return _estimate_memory(args)
    if args.config:
        args.parser.error("--config is for --estimate-memory; the timed benchmark runs a --preset")
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


def _estimate_memory(args: argparse.Namespace) -> int:
    """Print the memory estimate's table (stdout) for ``--preset`` or ``--config``."""
    from fusedit.bench.memory_plan import plan_for_experiment, plan_for_preset
    from fusedit.bench.presets import BenchError

    if args.mode != "train":
        args.parser.error("--estimate-memory estimates a training step: use `fusedit bench train --estimate-memory`")
    if bool(args.preset) == bool(args.config):
        args.parser.error("--estimate-memory needs exactly one of --preset NAME or --config CONFIG")
    if args.preset and args.preset not in PRESETS:
        args.parser.error(f"unknown preset {args.preset!r}; available presets: {', '.join(PRESETS)}")
    try:
        if args.config:
            from fusedit.experiment import load_experiment

            plan = plan_for_experiment(load_experiment(args.config, args.set), args.world_size, args.device)
        else:
            options = {
                "precision": "bf16" if (args.dtype or ("bfloat16" if args.device == "cuda" else "")) else "fp32",
                "optimizer": args.optimizer or "adamw",
                "activation_checkpointing": args.activation_checkpointing,
                "llm_int8": args.llm_int8,
                "llm_offload": args.llm_offload,
                "world_size": args.world_size,
                "sharding": args.sharding or ("ddp" if args.world_size > 1 else "none"),
            }
            options["llm_bytes"] = 2 if options["precision"] == "bf16" else 4
            preset = PRESETS[args.preset]
            plan = plan_for_preset(preset, args.batch_size or preset.batch_size, args.device, **options)
    except BenchError as error:
        args.parser.error(str(error))
    s = plan.settings
    print(
        f"memory of one training step, {plan.source}: {s.batch} image(s) per process and micro-batch, "
        f"{s.image_tokens} image tokens, {s.text_keys} text tokens, {s.precision}, {s.optimizer}, "
        f"activation checkpointing {'on' if s.activation_checkpointing else 'off'}, {s.world_size} process(es) "
        f"({s.sharding}), device {s.device}"
    )
    print(plan.estimate().table())
    return 0
