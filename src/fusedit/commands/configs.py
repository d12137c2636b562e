"""``fusedit configs``: list the configs shipped with fusedit; ``--keys``: every override key with its type, default
and meaning."""

from __future__ import annotations

import argparse

from fusedit.config import list_shipped_configs

NAME = "configs"
HELP = "list the configs shipped with fusedit (--keys: every key=value override key)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "config",
        nargs="?",
        help="with --keys: show this config's values (a YAML file or shipped name) instead of the built-in defaults",
    )
    p.add_argument(
        "--keys",
        action="store_true",
        help="print every key=value override key with its type, default and meaning",
    )


def print_keys(config: str | None = None) -> int:
    """Print the override keys of :class:`~fusedit.experiment.ExperimentConfig` (defaults from ``config`` when
    given); used by ``fusedit configs --keys`` and ``fusedit train --list-keys``."""
    from fusedit.config_keys import format_keys, iter_keys
    from fusedit.experiment import ExperimentConfig, load_experiment

    instance = load_experiment(config) if config is not None else None
    print(format_keys(list(iter_keys(ExperimentConfig, instance))))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.keys:
        return print_keys(args.config)
    if args.config is not None:
        args.parser.error("a config name is only used with --keys")
    for name in list_shipped_configs():
        print(name)
    return 0
