"""The process group: initialisation from ``torchrun``'s environment, this process's rank and device, collectives.

``torchrun`` (and SLURM launchers that mimic it) export ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``. :func:`init_distributed` reads them, picks the backend (``nccl`` for CUDA, ``gloo`` for CPU), binds
the process to ``cuda:LOCAL_RANK`` and returns a :class:`DistEnv`. Without a process group every helper here acts
as a single process (rank 0 of 1).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "all_reduce", "barrier", "current_env", "destroy_distributed", "init_distributed",
           "is_initialized"]

_REQUIRED_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in the job.

    Attributes:
        rank, world_size: global data-parallel rank and number of processes.
        local_rank: rank on this node (selects the GPU).
        device: this process's training device.
        backend: the process group's backend, ``None`` without a process group.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, samples and writes ``final/``."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether a process group is in use."""
        return self.backend is not None


def is_initialized() -> bool:
    """Whether a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def current_env(device: str | torch.device | None = None) -> DistEnv:
    """The :class:`DistEnv` of the existing process group (single process when there is none).

    ``device``: the training device; default ``cuda:LOCAL_RANK`` on the nccl backend, else CPU.
    """
    if not is_initialized():
        return DistEnv(device=torch.device(device) if device is not None else torch.device("cpu"))
    backend = dist.get_backend()
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    if device is None:
        device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                   device=torch.device(device), backend=backend)


def init_distributed(device: str | torch.device | None = None) -> DistEnv:
    """Initialise the default process group from torchrun's environment and return this process's :class:`DistEnv`.

    Args:
        device: ``"cuda"`` (each process takes ``cuda:LOCAL_RANK``; backend nccl), ``"cpu"`` (backend gloo), or
            ``None``: CUDA when available, else CPU. An explicit ``cuda:N`` is rejected: the local rank picks the GPU.

    An already initialised process group is reused. Raises ``RuntimeError`` naming the missing variables when the
    process was not started by torchrun (or an equivalent launcher).
    """
    if is_initialized():
        return current_env(device)
    missing = [name for name in _REQUIRED_VARS if name not in os.environ]
    if missing:
        raise RuntimeError(f"train.distributed needs a process group, but {', '.join(missing)} are not set: launch "
                           f"with torchrun (e.g. `torchrun --nproc_per_node 8 -m fusedit.cli train CONFIG`), or set "
                           f"train.distributed=none for one process")
    rank, world_size, local_rank = (int(os.environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if device is not None and torch.device(device).index is not None:
        raise ValueError(f"device {device!r}: under torchrun each process uses cuda:LOCAL_RANK; pass 'cuda' or 'cpu'")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for but CUDA is not available")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
                               f"use --nproc_per_node <= the number of GPUs")
        torch.cuda.set_device(local_rank)
        resolved, backend = torch.device("cuda", local_rank), "nccl"
    elif kind == "cpu":
        resolved, backend = torch.device("cpu"), "gloo"
    else:
        raise ValueError(f"device {device!r}: distributed training supports 'cuda' and 'cpu'")
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                            device_id=resolved if backend == "nccl" else None)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=resolved, backend=backend)


def destroy_distributed() -> None:
    """Tear the default process group down (no-op without one)."""
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_initialized():
        dist.barrier()


def all_reduce(value: float | torch.Tensor, op: str = "mean", device: str | torch.device = "cpu") -> float:
    """Reduce a scalar over ranks (``op``: ``mean``, ``sum`` or ``max``) and return it as a float on every rank."""
    ops = {"mean": dist.ReduceOp.SUM, "sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
    if op not in ops:
        raise ValueError(f"all_reduce: op got {op!r}, expected one of {sorted(ops)}")
    tensor = torch.as_tensor(value, dtype=torch.float64)
    if not is_initialized():
        return float(tensor)
    tensor = tensor.detach().clone().to(device)
    dist.all_reduce(tensor, op=ops[op])
    if op == "mean":
        tensor = tensor / dist.get_world_size()
    return float(tensor)


def broadcast_object(value: Any, src: int = 0) -> Any:
    """``value`` of rank ``src`` on every rank (picklable objects; no-op without a process group)."""
    if not is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]
