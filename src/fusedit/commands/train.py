"""``fusedit train CONFIG [key=value ...]``: train a model (resumes an existing run)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

NAME = "train"
HELP = "train a model from a YAML config (resumes an existing run)"
EPILOG = """A run directory is used by one `fusedit train` at a time (a lock file names its owner). Its config.yaml is
written once: a resume with other settings that alter the model, the text side or the data stream is refused;
step counts, logging, checkpoints, sample grids and optimiser settings change with --allow-change KEY (recorded in
config_changes.jsonl). See docs/reliability-rundir.md."""
#: What ``fusedit train`` without a config says (after the usage line).
NEEDS_CONFIG = (
    "a config is needed: a YAML file or a shipped config name, e.g. `fusedit train tiny/base`; "
    "`fusedit configs` lists the shipped ones, `fusedit train --list-keys` the keys you can override"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config file or shipped config name (see `fusedit configs`)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    p.add_argument("--run-dir", help="run directory (default: runs/<name>)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument(
        "--no-resume",
        action="store_true",
        help="start a new run: an existing run in --run-dir is moved to <run-dir>.previous-<timestamp>",
    )
    p.add_argument(
        "--resume-from",
        metavar="PATH",
        help="resume from this checkpoint directory (default: the newest intact checkpoint of the run)",
    )
    p.add_argument(
        "--allow-change",
        metavar="KEY",
        action="append",
        default=[],
        help="on a resume, accept a new value of KEY (repeatable), e.g. --allow-change train.max_steps; "
        "model.*, text.*, data.*, train.seed, train.batch_size and train.ema_every can never change",
    )
    p.add_argument(
        "--init-from",
        metavar="PATH",
        help="fine-tune: start from the DiT of this run, exported folder or reference folder (finetune.init_from; "
        "with finetune.lora.rank=... only LoRA adapters train; docs/finetune.md)",
    )
    p.add_argument(
        "--list-keys",
        action="store_true",
        help="print every key=value override key with its type, default and meaning, then exit",
    )


def run(args: argparse.Namespace) -> int:
    if args.list_keys:
        from fusedit.commands.configs import print_keys

        return print_keys(args.config)
    if args.config is None:
        args.parser.error(NEEDS_CONFIG)
    from fusedit.atomic import naming_full_disk
    from fusedit.experiment import load_experiment
    from fusedit.train.launch import train_run

    if args.no_resume and args.resume_from:
        raise ValueError("--no-resume and --resume-from contradict each other; give one")
    overrides = list(args.overrides) + ([f"finetune.init_from={args.init_from}"] if args.init_from else [])
    config = load_experiment(args.config, overrides)
    run_dir = Path(args.run_dir or Path("runs") / config.name)
    with naming_full_disk(run_dir):
        summary = train_run(
            config,
            run_dir,
            device=args.device,
            resume=not args.no_resume,
            resume_from=args.resume_from,
            allow_change=args.allow_change,
        )
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return 0
    print(f"run: {run_dir}")
    print(f"final weights: {summary.final_dir}")
    print(f"logs: {run_dir / 'logs'} (tensorboard --logdir {run_dir / 'logs'}), metrics: {run_dir / 'metrics.jsonl'}")
    return 0
