"""Checks of a sampling call's arguments, before anything runs: a wrong type raises ``TypeError`` and a wrong value
``ValueError``, each naming the argument, what it got and what is allowed (never a default in place of a value that
was given, never an error from deep inside torch).

Shared by :class:`fusedit.sampling.pipeline.FuseDiTPipeline` and the diffusers pipeline built on it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def prompt_list(prompt: Any, name: str = "prompt") -> list[str]:
    """``prompt`` (a string or a non-empty sequence of strings) as a list of strings."""
    if prompt is None:
        raise ValueError(f"{name} is None: pass a string or a non-empty list of strings")
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, Sequence):
        raise TypeError(f"{name} is a {type(prompt).__name__}: pass a string or a list of strings")
    prompts = list(prompt)
    if not prompts:
        raise ValueError(f"{name} is an empty list: pass a string or a non-empty list of strings")
    for i, item in enumerate(prompts):
        if not isinstance(item, str):
            raise TypeError(f"{name}[{i}] is a {type(item).__name__} ({item!r}), expected a string")
    return prompts


def positive_int(value: Any, name: str) -> int:
    """``value`` when it is an integer >= 1 (``TypeError`` for floats, strings, bools; ``ValueError`` for < 1)."""
    if not _is_int(value):
        kind = type(value).__name__
        raise TypeError(f"{name} must be an integer, got {value!r} ({kind}); e.g. {name}={_example(value)}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return int(value)


def _example(value: Any) -> str:
    if _is_real(value) and math.isfinite(value) and value >= 1:
        return str(int(value))
    return "32"


def optional_positive_int(value: Any, name: str) -> int | None:
    """:func:`positive_int`, or None when ``value`` is None (the default applies)."""
    return None if value is None else positive_int(value, name)


def guidance_scale(value: Any, name: str = "guidance_scale") -> float:
    """A classifier-free guidance scale: a finite real number >= 1 (1 = no guidance)."""
    if not _is_real(value):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if value < 1:
        raise ValueError(
            f"{name} must be >= 1 (1 = no guidance; larger follows the prompt more), got {value}; a scale below 1 "
            f"would steer towards the negative prompt"
        )
    return float(value)
