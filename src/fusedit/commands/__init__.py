"""The ``fusedit`` command line: one module per command, each with ``NAME``, ``HELP``, ``add_arguments(parser)``
and ``run(args) -> exit code``.

Library modules never parse arguments; a command module turns its arguments into library calls and prints what the
user needs. Each command imports its implementation when it runs (not at import), so ``fusedit --help`` and
``fusedit configs`` start without loading torch.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from fusedit.commands import bench, cache_latents, configs, demo, evaluate, export, sample, serve, study, train
from fusedit.lowmem import preload_bitsandbytes_quietly

#: The commands, in the order ``fusedit --help`` lists them.
COMMANDS: tuple[ModuleType, ...] = (
    train,
    sample,
    export,
    serve,
    demo,
    configs,
    evaluate,
    study,
    bench,
    cache_latents,
)

#: Errors printed as one line (``error: ...``, exit code 2) instead of a traceback (``--debug`` shows it).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, TypeError)


def _user_errors() -> tuple[type[BaseException], ...]:
    from fusedit.checkpoint.errors import CheckpointError
    from fusedit.config import ConfigError
    from fusedit.rundir.lock import RunDirLockedError
    from fusedit.text.llm import LLMLoadError
    from fusedit.train.errors import NonFiniteLossError

    return (ConfigError, CheckpointError, NonFiniteLossError, LLMLoadError, RunDirLockedError) + USER_ERRORS


def build_parser() -> argparse.ArgumentParser:
    """The ``fusedit`` parser with one sub-command per module of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(prog="fusedit", description="Deep fusion of LLMs and diffusion transformers.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        p = sub.add_parser(
            command.NAME,
            help=command.HELP,
            description=getattr(command, "DESCRIPTION", None),
            epilog=getattr(command, "EPILOG", None),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_arguments(p)
        p.set_defaults(run=command.run, parser=p)
    return parser


def _check_device(args: argparse.Namespace) -> None:
    """Refuse a ``--device`` this machine cannot use before the command loads anything."""
    device = getattr(args, "device", None)
    if device is not None:
        from fusedit.devices import check_device

        check_device(device)


def one_line(error: BaseException) -> str:
    """``error``'s message; for an error re-raised from a DataLoader worker (whose message is the worker's whole
    traceback), the original error's own message."""
    text = str(error)
    if "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def _disk_full_message(error: BaseException) -> str | None:
    """The one-line message of a full disk anywhere in ``error``'s chain, else None."""
    from fusedit.atomic import DiskFullError, is_disk_full

    if isinstance(error, DiskFullError):
        return str(error)
    if not is_disk_full(error):
        return None
    names = (getattr(e, "filename", None) for e in (error, error.__cause__, error.__context__))
    where = next((name for name in names if name), None)
    return str(DiskFullError(where or "the output folder"))


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``fusedit ARGS``. ``key=value`` overrides may also follow an option (``fusedit train demo --no-resume
    train.max_steps=10``): argparse leaves them over, and they join the command's ``overrides``."""
    parser = build_parser()
    args, extra = parser.parse_known_args(list(argv))
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides or []) + extra
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fusedit ARGS``; returns the exit code (2 for user errors and a full disk, 130 when interrupted)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "transformers", "diffusers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = parse_arguments(list(sys.argv[1:] if argv is None else argv))
    preload_bitsandbytes_quietly()  # before peft or transformers import it and print about a 4-bit kernel
    debug = args.debug or os.environ.get("FUSEDIT_DEBUG") == "1"
    try:
        _check_device(args)
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _user_errors() as error:
        if debug:
            raise
        print(f"error: {_disk_full_message(error) or one_line(error)}", file=sys.stderr)
        return 2
    except Exception as error:
        message = _disk_full_message(error)
        if message is None or debug:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
