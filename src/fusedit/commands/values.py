"""argparse ``type=`` checks shared by the commands: a bad value stops the command before anything loads, with
argparse's one-line ``error: argument --steps: ...`` (exit code 2), instead of falling back to a default.

Also :func:`check_image_path`: an output file whose extension no image writer knows fails before sampling.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1 (steps, images, batch sizes)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer (1 or more), got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (counts where 0 means none)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or a positive integer, got {value}")
    return value


def finite_float(text: str) -> float:
    """A finite number (no ``nan``/``inf``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def guidance_scale(text: str) -> float:
    """A classifier-free guidance scale: a finite number >= 1 (1 = no guidance)."""
    value = finite_float(text)
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"expected a guidance scale >= 1 (1 = no guidance; larger follows the prompt more), got {text}"
        )
    return value


def at_least(minimum: int) -> Callable[[str], int]:
    """An integer >= ``minimum``."""

    def check(text: str) -> int:
        value = _int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    check.__name__ = f"integer >= {minimum}"
    return check


def check_image_path(path: str | Path, option: str = "--out") -> None:
    """Raise ``ValueError`` unless PIL can write an image named ``path`` (its extension: ``.png``, ``.jpg`` ...)."""
    from PIL import Image

    if Path(path).is_dir():
        raise ValueError(f"{option} {str(path)!r} is a folder; name an image file, e.g. {Path(path) / 'out.png'}")
    suffix = Path(path).suffix.lower()
    known = Image.registered_extensions()
    if suffix in known and known[suffix] in Image.SAVE:
        return
    kind = f"extension {suffix!r}" if suffix else "no extension"
    raise ValueError(f"{option} {str(path)!r} has {kind}; name an image file such as out.png (.png, .jpg, .webp, ...)")
