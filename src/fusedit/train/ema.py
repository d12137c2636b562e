"""Exponential moving average of the trained weights.

The EMA keeps float32 shadow copies of a fixed set of named parameters (the trainer passes every trainable
parameter: the model's under their ``state_dict`` names, a trainable LLM's under ``llm.``). The trainer decides when
to call :meth:`EMA.update` (every ``train.ema_every`` optimiser steps in the reference recipe).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn


class EMA:
    """``shadow ← decay·shadow + (1 - decay)·param`` over named parameters.

    Args:
        named_parameters: ``{name: parameter}``; the EMA starts as a copy of their current values.
        decay: in ``[0, 1)``.
    """

    def __init__(self, named_parameters: Mapping[str, nn.Parameter], decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if not named_parameters:
            raise ValueError("EMA needs at least one parameter to track")
        self.decay = float(decay)
        self.params = dict(named_parameters)
        self.shadow = {name: p.detach().to(torch.float32).clone() for name, p in self.params.items()}
        self.num_updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step from the current parameter values."""
        names = list(self.params)
        shadows = [self.shadow[n] for n in names]
        values = [self.params[n].detach().to(torch.float32) for n in names]
        torch._foreach_lerp_(shadows, values, 1.0 - self.decay)
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow weights ``{name: float32 tensor}`` (the tensors themselves; copy before mutating)."""
        return dict(self.shadow)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load shadow weights; the names must be exactly the tracked parameters' and the shapes must agree."""
        missing = sorted(set(self.shadow) - set(state))
        unexpected = sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            raise KeyError(
                f"EMA state does not match the tracked parameters: missing {missing[:5]}"
                f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                f"{'...' if len(unexpected) > 5 else ''}"
            )
        for name, value in state.items():
            if value.shape != self.shadow[name].shape:
                raise ValueError(f"EMA state {name!r}: shape {tuple(value.shape)} != {tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(value.to(torch.float32))

    @torch.no_grad()
    def copy_to_params(self) -> None:
        """Overwrite the tracked parameters with the EMA weights (irreversibly; see :meth:`swapped_in`)."""
        for name, p in self.params.items():
            p.copy_(self.shadow[name].to(p.dtype))

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Context manager: the tracked parameters hold the EMA weights inside, their own values again after."""
        backup = {name: p.detach().clone() for name, p in self.params.items()}
        try:
            self.copy_to_params()
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(backup[name])
