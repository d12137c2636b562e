"""``fusedit export RUN OUT``: a self-contained pipeline folder in diffusers' format, of a training run or converted
from a reference folder."""

from __future__ import annotations

import argparse

NAME = "export"
HELP = "export a run (or convert a reference folder) to a diffusers pipeline folder"
EPILOG = """The folder loads with fusedit.load_pipeline(OUT), or in diffusers after `import fusedit.diffusers_native`:
DiffusionPipeline.from_pretrained(OUT)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "path", metavar="RUN", help="a training run, an older fusedit export, or a reference (fuse-dit) pipeline folder"
    )
    p.add_argument("out", help="the new folder (must not exist or be empty)")
    p.add_argument("--no-ema", action="store_true", help="the raw weights instead of the EMA")
    p.add_argument("--max-shard-size", default="10GB", help="split the transformer's weights into files this large")


def run(args: argparse.Namespace) -> int:
    from fusedit.atomic import naming_full_disk
    from fusedit.sampling.export import export_pipeline

    with naming_full_disk(args.out):
        print(export_pipeline(args.path, args.out, use_ema=not args.no_ema, max_shard_size=args.max_shard_size))
    return 0
