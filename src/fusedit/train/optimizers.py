"""The optimizers ``train.optimizer`` names: ``adamw`` (PyTorch's), ``adamw8bit`` (bitsandbytes' block-wise 8-bit
AdamW, a quarter of the optimizer state's memory: one byte per state element plus one float32 scale per 256) and
``muon`` (:class:`fusedit.train.muon.MuonAdamW`: Muon for the parameters its groups flag, AdamW for the others).

bitsandbytes is an optional dependency (``pip install "fusedit[lowmem]"``); where it is missing or has no backend for
the parameters' device, :func:`make_optimizer` raises a one-line :class:`~fusedit.config.ConfigError` saying what to
install or change.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from fusedit.config import ConfigError
from fusedit.lowmem import import_bitsandbytes
from fusedit.train.muon import MuonAdamW

OPTIMIZERS = ("adamw", "adamw8bit", "muon")
#: bitsandbytes keeps 32-bit state for tensors smaller than this (its ``min_8bit_size`` default).
MIN_8BIT_SIZE = 4096
#: elements per block of bitsandbytes' block-wise quantisation (one float32 ``absmax`` per block and state).
BLOCK_SIZE = 256


def make_optimizer(
    name: str,
    params: list[nn.Parameter] | list[dict[str, Any]],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    fused: bool = False,
    muon_ns_steps: int = 5,
    muon_lr_scale: float = 1.0,
) -> torch.optim.Optimizer:
    """AdamW over ``params`` (in this order; a list of parameters, or of parameter groups: dicts with ``params`` and
    optionally their own ``lr``): PyTorch's for ``adamw`` (``fused``: its fused kernel), bitsandbytes'
    ``AdamW8bit`` for ``adamw8bit`` (same update rule; its state is 8-bit for tensors of at least
    :data:`MIN_8BIT_SIZE` elements); for ``muon``, :class:`~fusedit.train.muon.MuonAdamW` (each group's ``muon``
    flags say which parameters Muon updates; ``muon_ns_steps`` Newton–Schulz iterations, Muon's matrices at
    ``lr × muon_lr_scale``)."""
    if name == "muon":
        return MuonAdamW(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            ns_steps=muon_ns_steps,
            muon_lr_scale=muon_lr_scale,
        )
    if name == "adamw":
        return torch.optim.AdamW(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True if fused else None
        )
    if name != "adamw8bit":
        raise ConfigError(f"train.optimizer: got {name!r}, expected one of {', '.join(OPTIMIZERS)}")
    bnb = import_bitsandbytes("train.optimizer=adamw8bit")
    flat = [q for g in params for q in (g["params"] if isinstance(g, dict) else [g])]
    for device in sorted({p.device for p in flat}, key=str):
        _probe_8bit_step(bnb, device)
    return bnb.optim.AdamW8bit(
        params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, min_8bit_size=MIN_8BIT_SIZE
    )


def _probe_8bit_step(bnb: Any, device: torch.device) -> None:
    """One 8-bit AdamW step on a throw-away tensor on ``device``: bitsandbytes finds out that it has no kernel for a
    device only when it steps, which would otherwise be after the first forward and backward of a run."""
    probe = nn.Parameter(torch.zeros(MIN_8BIT_SIZE, device=device))
    probe.grad = torch.ones_like(probe)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bnb.optim.AdamW8bit([probe], lr=1e-3, min_8bit_size=MIN_8BIT_SIZE).step()
    except Exception as error:
        raise ConfigError(
            f"train.optimizer=adamw8bit: bitsandbytes cannot run 8-bit AdamW on {device} "
            f"({type(error).__name__}: {str(error)[:200]}); use train.optimizer=adamw"
        ) from None
