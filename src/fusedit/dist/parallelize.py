"""Wrap the trained model for data parallelism: FSDP2 (``fully_shard`` per DiT block, then the root) or DDP.

Only the trained module is wrapped. The frozen LLM (the trainer's text encoder) stays outside: every rank holds a
full replica, runs it under ``no_grad`` and never hands it to the optimizer. Both wrappers first make every rank's
weights equal to rank 0's (so the initialisation does not depend on per-rank RNG state).
"""
from __future__ import annotations

from typing import Literal, Union

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["PARALLEL_MODES", "apply_ddp", "apply_fsdp", "full_tensor", "parallelize", "shard_units"]

PARALLEL_MODES = ("none", "ddp", "fsdp")


@torch.no_grad()
def sync_module_states(module: nn.Module, src: int = 0) -> None:
    """Broadcast ``module``'s parameters and buffers from rank ``src`` (in place, before any wrapping)."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=src)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards separately before the root: the blocks of ``model.layers`` (an ``nn.ModuleList``,
    as in :class:`fusedit.models.DiffusionTransformer`). A model without ``layers`` is sharded as one unit."""
    layers = getattr(model, "layers", None)
    if layers is None:
        return []
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__}.layers must be an nn.ModuleList of blocks to shard per block, got "
                        f"{type(layers).__name__}")
    return list(layers)


def apply_fsdp(model: nn.Module, *, bf16: bool = False, reshard_after_forward: bool = True) -> nn.Module:
    """Shard ``model`` in place with FSDP2: ``fully_shard`` on every block of :func:`shard_units`, then the root.

    Args:
        bf16: compute in bfloat16 (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``); the sharded
            parameters, gradients, optimizer state and EMA stay float32.
        reshard_after_forward: free gathered block weights after the forward (ZeRO-3; ``False``: ZeRO-2-like).

    The parameters become ``DTensor`` shards (same names); build the optimizer after this call.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    sync_module_states(model)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for block in shard_units(model):
        fully_shard(block, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def apply_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)`` on ``device`` (``device_ids=[index]`` on CUDA); returns the wrapper.

    The wrapped module (``wrapper.module``) is ``model`` itself: save and load its parameters, not the wrapper's.
    """
    from torch.nn.parallel import DistributedDataParallel

    sync_module_states(model)
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def parallelize(model: nn.Module, mode: Literal["none", "ddp", "fsdp"], device: Union[str, torch.device], *,
                bf16: bool = False) -> nn.Module:
    """The module the training step calls: ``model`` (``none``; ``fsdp``, sharded in place) or a DDP wrapper."""
    if mode not in PARALLEL_MODES:
        raise ValueError(f"train.distributed: got {mode!r}, expected one of {', '.join(PARALLEL_MODES)}")
    if mode == "none":
        return model
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"train.distributed={mode} needs an initialised process group (fusedit.dist.init_distributed)")
    if mode == "fsdp":
        return apply_fsdp(model, bf16=bf16)
    return apply_ddp(model, torch.device(device))


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a (sharded) ``DTensor`` — a collective: call it on every rank — or ``tensor``."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
