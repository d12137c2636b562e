"""The ``fusedit`` command: train, sample, export, demo, eval, study, bench, cache-latents, configs."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, TypeError)


def _user_errors() -> tuple[type[BaseException], ...]:
    from fusedit.config import ConfigError
    from fusedit.text.llm import LLMLoadError
    from fusedit.checkpoint.errors import CheckpointError
    from fusedit.train.errors import NonFiniteLossError

    return (ConfigError, CheckpointError, NonFiniteLossError, LLMLoadError) + USER_ERRORS


# ----------------------------------------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from fusedit.experiment import load_experiment
    from fusedit.run import train_run

    config = load_experiment(args.config, args.overrides)
    run_dir = Path(args.run_dir or Path("runs") / config.name)
    summary = train_run(config, run_dir, device=args.device, resume=not args.no_resume)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return 0
    print(f"run: {run_dir}")
    print(f"final weights: {summary.final_dir}")
    print(f"logs: {run_dir / 'logs'} (tensorboard --logdir {run_dir / 'logs'}), metrics: {run_dir / 'metrics.jsonl'}")
    return 0


def cmd_sample(args) -> int:
    import torch

    import fusedit

    pipe = fusedit.load_pipeline(args.path, device=args.device, use_ema=not args.no_ema)
    generator = torch.Generator(device=pipe.device).manual_seed(args.seed)
    out = pipe(args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
               num_inference_steps=args.steps, guidance_scale=args.cfg, generator=generator,
               num_images_per_prompt=args.num_images, max_sequence_length=args.max_length,
               guidance_interval=args.guidance_interval)
    target = Path(args.out)
    target.parent.mkdir(parents=True, exist_ok=True)
    images = out.images
    if len(images) == 1:
        images[0].save(target)
        paths = [target]
    else:
        paths = [target.with_name(f"{target.stem}-{i}{target.suffix}") for i in range(len(images))]
        for image, path in zip(images, paths):
            image.save(path)
    if out.num_truncated:
        print(f"note: {out.num_truncated} prompt(s) were longer than the maximum text length and were truncated")
    for path in paths:
        print(path)
    return 0


def cmd_export(args) -> int:
    from fusedit.export import export_pipeline

    out = export_pipeline(args.run, args.out, use_ema=not args.no_ema)
    print(out)
    return 0


def cmd_demo(args) -> int:
    from fusedit.demo import run_demo

    run_demo(Path(args.out), device=args.device, steps=args.steps, overrides=args.overrides)
    return 0


def cmd_configs(args) -> int:
    from fusedit.config import list_shipped_configs

    for name in list_shipped_configs():
        print(name)
    return 0


def cmd_eval(args) -> int:
    from fusedit.eval.cli import main as eval_main

    return eval_main(args.rest)


def cmd_study(args) -> int:
    from fusedit.eval.study import main as study_main

    return study_main(args.rest)


def cmd_bench(args) -> int:
    from fusedit.bench import main as bench_main

    return bench_main(args.rest) or 0


def cmd_cache_latents(args) -> int:
    from fusedit.data.latents import main as cache_main

    return cache_main(args.rest) or 0


# ----------------------------------------------------------------------------------------------------------------------
#: Commands whose arguments are parsed by their own module's parser.
PASS_THROUGH = ("eval", "study", "bench", "cache-latents")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusedit", description="Deep fusion of LLMs and diffusion transformers.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a YAML config (resumes an existing run)")
    p.add_argument("config", help="YAML config file or shipped config name (see `fusedit configs`)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    p.add_argument("--run-dir", help="run directory (default: runs/<name>)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--no-resume", action="store_true", help="start from scratch even if the run has checkpoints")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="sample images from a run, an exported pipeline or a reference folder")
    p.add_argument("path")
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True, help="output PNG path")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--cfg", type=float, default=None)
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("SIGMA_LOW", "SIGMA_HIGH"),
                   help="apply CFG only at noise levels in [SIGMA_LOW, SIGMA_HIGH] (default: the model's sample config)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--max-length", type=int, default=None, help="maximum prompt length in tokens")
    p.add_argument("--device", default=None)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("export", help="export a training run to a self-contained pipeline folder")
    p.add_argument("run")
    p.add_argument("out")
    p.add_argument("--no-ema", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="the embedded default: shapes world, tiny LLM, deep fusion, samples")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--device", default=None)
    p.add_argument("--steps", type=int, default=None, help="DiT training steps (default: the demo config's)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the demo config")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("configs", help="list the configs shipped with fusedit")
    p.set_defaults(func=cmd_configs)

    for name, func, text in (("eval", cmd_eval, "evaluate a model (shapes, geneval, dpgbench, fid)"),
                             ("study", cmd_study, "train and evaluate a grid of variants"),
                             ("bench", cmd_bench, "training / sampling throughput benchmark"),
                             ("cache-latents", cmd_cache_latents, "precompute VAE latents into shards")):
        p = sub.add_parser(name, help=text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=func)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "transformers", "diffusers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # Pass-through commands get every argument after their name, even ones that start with "--" (argparse's
    # REMAINDER would reject "fusedit eval --suite fid ..." because the remainder starts with an option).
    split = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if split is not None and argv[split] in PASS_THROUGH:
        args = parser.parse_args(argv[:split + 1])
        args.rest = argv[split + 1:]
    else:
        args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("FUSEDIT_DEBUG") == "1"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _user_errors() as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
