"""Learning-rate schedules as ``torch.optim.lr_scheduler.LambdaLR`` factories.

The multiplier is a function of the number of optimiser steps taken so far (``LambdaLR``'s ``last_epoch``,
0 before the first step):

* ``constant``: 1.
* ``warmup``: linear from ``1/warmup_steps`` to 1 over ``warmup_steps`` steps, then 1.
* ``cosine``: the warm-up above, then cosine decay from ``lr`` to ``min_lr`` at ``total_steps``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

LR_SCHEDULES = ("constant", "warmup", "cosine")


def lr_multiplier(
    name: str, warmup_steps: int = 0, total_steps: int = 1, min_lr_ratio: float = 0.0
) -> Callable[[int], float]:
    """The multiplier function ``step -> factor`` of schedule ``name`` (see the module docstring)."""
    if name not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {name!r}; expected one of {LR_SCHEDULES}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr / lr must be in [0, 1], got {min_lr_ratio}")

    def warmup(step: int) -> float:
        return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0

    if name == "constant":
        return lambda step: 1.0
    if name == "warmup":
        return warmup

    def cosine(step: int) -> float:
        if step < warmup_steps:
            return warmup(step)
        decay_steps = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return cosine


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    *,
    lr: float,
    warmup_steps: int = 0,
    total_steps: int = 1,
    min_lr: float = 0.0,
) -> LambdaLR:
    """A ``LambdaLR`` for ``optimizer`` (whose base learning rate is ``lr``) following schedule ``name``."""
    if min_lr > lr:
        raise ValueError(f"min_lr ({min_lr}) must not exceed lr ({lr})")
    return LambdaLR(optimizer, lr_multiplier(name, warmup_steps, total_steps, min_lr / lr))
