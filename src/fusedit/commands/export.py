"""``fusedit export RUN OUT``: a self-contained pipeline folder of a training run."""

from __future__ import annotations

import argparse

NAME = "export"
HELP = "export a training run to a self-contained pipeline folder"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run")
    p.add_argument("out")
    p.add_argument("--no-ema", action="store_true")


def run(args: argparse.Namespace) -> int:
    from fusedit.sampling.export import export_pipeline

    print(export_pipeline(args.run, args.out, use_ema=not args.no_ema))
    return 0
