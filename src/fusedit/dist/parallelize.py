"""Spread the trained model over processes: :func:`parallelize` returns a :class:`ParallelPlan`.

FSDP2 shards the model in place (``fully_shard`` per DiT block, then the root); DDP wraps it. Only the trained
module is wrapped. The frozen LLM (the trainer's text encoder) stays outside: every rank holds a full replica, runs it
under ``no_grad`` and never hands it to the optimizer. Both wrappers first make every rank's weights equal to rank
0's (so the initialisation does not depend on per-rank RNG state).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from fusedit.dist.env import DistEnv, current_env, is_initialized

ParallelMode = Literal["none", "ddp", "fsdp"]
PARALLEL_MODES: tuple[str, ...] = ("none", "ddp", "fsdp")


@dataclass(frozen=True)
class ParallelPlan:
    """How the trained model is spread over the processes of the job; everything the trainer asks about it.

    Attributes:
        mode: ``none`` (one process), ``ddp`` or ``fsdp``.
        env: this process's rank, world size and device.
        model: the model itself (under FSDP its parameters are ``DTensor`` shards, same names).
        module: what the training step calls (the DDP wrapper, or ``model``).
    """

    mode: ParallelMode
    env: DistEnv
    model: nn.Module
    module: nn.Module

    @property
    def distributed(self) -> bool:
        """Whether the job runs on a process group (checkpoints are then sharded)."""
        return self.mode != "none"

    @property
    def sharded(self) -> bool:
        """Whether each process holds only a shard of the parameters (FSDP)."""
        return self.mode == "fsdp"

    @property
    def samples_on_this_rank(self) -> bool:
        """Whether this process runs the sample grids: rank 0, and under FSDP every rank (each forward gathers the
        sharded weights, a collective every rank must join)."""
        return self.env.is_main or self.sharded

    @contextlib.contextmanager
    def gradient_sync(self, enabled: bool) -> Iterator[None]:
        """Context of one micro-batch's backward: gradients are reduced over ranks only when ``enabled`` (the last
        micro-batch of an optimiser step)."""
        if isinstance(self.module, DistributedDataParallel) and not enabled:
            with self.module.no_sync():
                yield
            return
        if isinstance(self.model, FSDPModule):
            self.model.set_requires_gradient_sync(enabled)
        yield


@torch.no_grad()
def sync_module_states(module: nn.Module, src: int = 0) -> None:
    """Broadcast ``module``'s parameters and buffers from rank ``src`` (in place, before any wrapping)."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=src)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards separately before the root: the blocks of ``model.layers`` (an ``nn.ModuleList``,
    as in :class:`fusedit.models.dit.DiffusionTransformer`). A model without ``layers`` is sharded as one unit."""
    layers = getattr(model, "layers", None)
    if layers is None:
        return []
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(
            f"{type(model).__name__}.layers must be an nn.ModuleList of blocks to shard per block, got "
            f"{type(layers).__name__}"
        )
    return list(layers)


def apply_fsdp(model: nn.Module, *, bf16: bool = False, reshard_after_forward: bool = True) -> nn.Module:
    """Shard ``model`` in place with FSDP2: ``fully_shard`` on every block of :func:`shard_units`, then the root.

    Args:
        bf16: compute in bfloat16 (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``); the sharded
            parameters, gradients, optimizer state and EMA stay float32.
        reshard_after_forward: free gathered block weights after the forward (ZeRO-3; ``False``: ZeRO-2-like).

    The parameters become ``DTensor`` shards (same names); build the optimizer after this call.
    """
    sync_module_states(model)
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    )
    for block in shard_units(model):
        fully_shard(block, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def apply_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)`` on ``device`` (``device_ids=[index]`` on CUDA); returns the wrapper.

    The wrapped module (``wrapper.module``) is ``model`` itself: save and load its parameters, not the wrapper's.
    """
    sync_module_states(model)
    device_ids = None
    if device.type == "cuda":
        device_ids = [device.index if device.index is not None else torch.cuda.current_device()]
    return DistributedDataParallel(model, device_ids=device_ids)


def parallelize(model: nn.Module, mode: str, device: torch.device | str, *, bf16: bool = False) -> ParallelPlan:
    """Spread ``model`` (already on ``device``) over the processes of the job as ``mode`` says.

    ``none``: one process, nothing changes. ``ddp`` / ``fsdp`` need the process group (torchrun, then
    :func:`fusedit.dist.env.init_distributed`); raises ``ValueError`` naming the fix without one.
    """
    if mode not in PARALLEL_MODES:
        raise ValueError(f"train.distributed: got {mode!r}, expected none, ddp or fsdp")
    device = torch.device(device)
    if mode == "none":
        return ParallelPlan("none", DistEnv(device=device), model, model)
    if not is_initialized():
        raise ValueError(
            f"train.distributed={mode} needs a process group: launch with torchrun and call "
            f"fusedit.dist.env.init_distributed() first (`fusedit train` does), or set train.distributed=none for "
            f"one process"
        )
    env = current_env(device)
    if mode == "fsdp":
        return ParallelPlan("fsdp", env, apply_fsdp(model, bf16=bf16), model)
    return ParallelPlan("ddp", env, model, apply_ddp(model, device))


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a (sharded) ``DTensor`` — a collective: call it on every rank — or ``tensor``."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def like_parameter(full: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``parameter``: this rank's shard (a ``DTensor``, no communication) when
    ``parameter`` is a ``DTensor``, else ``full`` itself. For loading whole tensors into a sharded model."""
    if isinstance(parameter, DTensor):
        local = full.to(device=parameter.device, dtype=parameter.dtype)
        return torch.distributed.tensor.distribute_tensor(
            local, parameter.device_mesh, parameter.placements, src_data_rank=None
        )
    return full
