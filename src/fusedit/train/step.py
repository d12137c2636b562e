"""The training step as two functions, shared by the :class:`~fusedit.train.trainer.Trainer` and ``fusedit bench``.

* :func:`flow_loss`: the rectified-flow loss of one micro-batch — noise the clean sample, run the model, compare its
  velocity with the target (the math is :mod:`fusedit.flow`; ``docs/design.md`` §"Time and noise").
* :func:`train_step`: one optimiser step over micro-batch losses — gradient accumulation (reduction over processes
  on the last micro-batch only), the global gradient norm, clipping, a refusal to step on a non-finite loss or
  norm, and the optimizer update.

What varies between callers comes in as arguments: the forward function (the model, a DDP wrapper, a compiled
module, or the reference's dense formulation), the text (encoded with or without gradients), the draws of σ and
noise, how gradients sync and how the logged loss is reduced over processes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fusedit.dist.parallelize import full_tensor
from fusedit.flow import flow_matching_loss, interpolate, timestep_input, velocity_target
from fusedit.train.errors import NonFiniteLossError

#: ``forward(x_t (B, C, H, W), timestep (B,) = σ·1000, text context) -> velocity (B, C, H, W)``
Forward = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def flow_loss(
    forward: Forward,
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    text: Callable[[], Any],
    *,
    weights: torch.Tensor | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The flow-matching loss of one micro-batch (a float32 scalar, mean over its samples).

    Args:
        forward: the model's forward (see :data:`Forward`).
        x0: ``(B, C, H, W)`` clean latents (or pixels); ``noise``: ``(B, C, H, W)`` ε; ``sigmas``: ``(B,)`` σ.
        text: returns the text context; called inside the autocast region (the trainer encodes the captions
            there, under ``no_grad`` for a frozen LLM).
        weights: ``(B,)`` per-sample loss weights (``None``: uniform).
        autocast_dtype: run the text and the model under ``torch.autocast`` in this dtype (``None``: no autocast).
    """
    x_t = interpolate(x0, noise, sigmas)
    autocast = (
        torch.autocast(device_type=x0.device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with autocast:
        pred = forward(x_t, timestep_input(sigmas), text())
    if pred.shape != x0.shape:
        raise ValueError(
            f"the model returned {tuple(pred.shape)} for inputs of shape {tuple(x0.shape)}; it must "
            f"predict a velocity of the input's shape"
        )
    return flow_matching_loss(pred, velocity_target(x0, noise), weights)


@dataclass
class StepResult:
    """``loss``: mean loss of the step's micro-batches (reduced over processes); ``grad_norm``: global gradient norm
    before clipping."""

    loss: float
    grad_norm: float


def train_step(
    optimizer: torch.optim.Optimizer,
    params: Sequence[nn.Parameter],
    micro_losses: Iterable[Callable[[], torch.Tensor]],
    *,
    grad_clip: float | None,
    gradient_sync: Callable[[bool], AbstractContextManager[Any]] | None = None,
    reduce_loss: Callable[[torch.Tensor], float] | None = None,
) -> StepResult:
    """One optimiser step: backward through every micro-batch loss, clip, step.

    Args:
        optimizer: updates ``params``.
        params: the trained parameters (the gradient norm is taken over them).
        micro_losses: one callable per micro-batch returning its loss; the gradient of each is scaled by
            ``1 / number of micro-batches``.
        grad_clip: clip the global gradient norm to this (``None``: no clipping).
        gradient_sync: ``gradient_sync(last)`` is the context of each backward (``last``: the final micro-batch,
            whose backward reduces gradients over processes); default: none.
        reduce_loss: the mean loss tensor -> the logged float (e.g. an all-reduce); default ``.item()``.

    Raises :class:`~fusedit.train.errors.NonFiniteLossError` before changing any weight when the loss or the
    gradient norm is not finite.
    """
    calls = list(micro_losses)
    optimizer.zero_grad(set_to_none=True)
    total = None
    for index, compute in enumerate(calls):
        sync = gradient_sync(index == len(calls) - 1) if gradient_sync is not None else contextlib.nullcontext()
        with sync:
            loss = compute()
            (loss / len(calls)).backward()
        total = loss.detach() if total is None else total + loss.detach()
    if total is None:
        raise ValueError("train_step needs at least one micro-batch")
    mean = total / len(calls)
    loss_value = reduce_loss(mean) if reduce_loss is not None else mean.item()
    with_grad = [p for p in params if p.grad is not None]
    grad_norm = full_tensor(torch.nn.utils.get_total_norm([p.grad for p in with_grad if p.grad is not None]))
    if grad_clip is not None:
        torch.nn.utils.clip_grads_with_norm_(with_grad, grad_clip, grad_norm)
    norm_value = float(grad_norm)
    if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
        what = "loss" if not math.isfinite(loss_value) else "gradient norm"
        raise NonFiniteLossError(what, loss_value, norm_value)
    optimizer.step()
    return StepResult(loss_value, norm_value)
