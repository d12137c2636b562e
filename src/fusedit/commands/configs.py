"""``fusedit configs``: list the configs shipped with fusedit."""

from __future__ import annotations

import argparse

from fusedit.config import list_shipped_configs

NAME = "configs"
HELP = "list the configs shipped with fusedit"


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    for name in list_shipped_configs():
        print(name)
    return 0
