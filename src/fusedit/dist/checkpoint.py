"""Sharded checkpoints of distributed runs (``train.distributed: ddp | fsdp``) through ``torch.distributed.checkpoint``.

Layout (same place and pointer as the single-process checkpoints of :mod:`fusedit.train.checkpoint`)::

    run_dir/checkpoints/step-000123/
        dcp/                  DCP files: {"model", "optimizer", "ema"} — every rank writes its shards
        rank-00000.pt ...     per rank: RNG states (python, numpy, torch CPU, this rank's CUDA device, the trainer's
                              generators) and the data-stream position (shard streams)
        trainer_state.json    written by rank 0: format "fusedit-dcp", step, world_size, LR scheduler, global data
                              position, config, metrics, file sizes
    run_dir/checkpoints/latest

Writing is atomic like the single-process checkpoints: every rank writes into the hidden ``.step-XXXXXX.tmp-dcp``
directory, a barrier waits for all of them, then rank 0 fsyncs, renames the directory into place and moves
``latest``; a crash at any point leaves the previous checkpoint and pointer intact.

Model, EMA and optimizer state are stored by parameter name (``get_state_dict``), so DCP reshards them on load:
a checkpoint written by ``N`` processes loads on ``M`` processes, with FSDP, DDP or in one process without a process
group. What happens to the per-rank RNG and data positions when ``N != M`` is the trainer's decision (see
``docs/distributed.md``); :func:`load_sharded_checkpoint` returns every rank's file.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from fusedit.dist.env import DistEnv, barrier
from fusedit.train.checkpoint import (
    STATE_FILE,
    capture_rng_state,
    checkpoint_dir,
    publish_checkpoint,
    restore_rng_state,
    state_json_default,
    step_name,
)
from fusedit.train.errors import CheckpointError

__all__ = ["DCP_DIR", "FORMAT", "ShardedCheckpoint", "capture_local_rng", "is_sharded_checkpoint",
           "load_sharded_checkpoint", "rank_file", "restore_local_rng", "save_sharded_checkpoint"]

FORMAT = "fusedit-dcp"
DCP_DIR = "dcp"
_TMP_SUFFIX = ".tmp-dcp"


def rank_file(rank: int) -> str:
    """``rank-00003.pt``."""
    return f"rank-{rank:05d}.pt"


@dataclass
class ShardedCheckpoint:
    """A loaded sharded checkpoint (the model, optimizer and EMA were loaded in place).

    Attributes:
        path: its directory.
        step: optimiser steps completed.
        world_size: the number of processes that wrote it.
        state: ``trainer_state.json`` without ``step`` (``lr_scheduler``, ``data``, ``config``, ``metrics``, ...).
        rank_states: every writing rank's small state (``rank_states[r]`` of rank ``r``), CPU tensors.
    """

    path: Path
    step: int
    world_size: int
    state: dict[str, Any]
    rank_states: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------------------
# per-rank RNG
# --------------------------------------------------------------------------------------------------------------------


def capture_local_rng(generators: Mapping[str, torch.Generator] = {}) -> dict[str, Any]:
    """This rank's RNG states: :func:`fusedit.train.checkpoint.capture_rng_state` with only the current CUDA device
    (under torchrun each process owns one GPU and must not touch the others)."""
    return capture_rng_state(generators, cuda_devices="current")


def restore_local_rng(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] = {}) -> None:
    """Inverse of :func:`capture_local_rng`; every generator named here must be in ``state``."""
    restore_rng_state(state, generators)


# --------------------------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------------------------


def _state_dict_options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # frozen parameters are neither saved nor loaded; dcp.load already fails on any missing trainable entry, so
    # set_state_dict must not insist on the frozen ones (strict=False)
    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def _payload(model: nn.Module, optimizer: torch.optim.Optimizer, ema: Optional[Mapping[str, torch.Tensor]]):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer, options=_state_dict_options())
    payload: dict[str, Any] = {"model": model_state, "optimizer": optimizer_state}
    if ema is not None:
        payload["ema"] = dict(ema)
    return payload


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for directory in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _file_sizes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def save_sharded_checkpoint(run_dir: Union[str, os.PathLike], step: int, *, model: nn.Module,
                            optimizer: torch.optim.Optimizer, state: Mapping[str, Any], rank_state: Mapping[str, Any],
                            env: DistEnv, ema: Optional[Mapping[str, torch.Tensor]] = None,
                            keep: Optional[int] = None) -> Path:
    """Write checkpoint ``step`` collectively (every rank calls this) and return its directory.

    Args:
        model: the trained module (FSDP-sharded in place, or the module inside DDP).
        optimizer: its optimizer.
        state: JSON-serialisable run state (rank 0's is written; ``step``, ``world_size``, ``format`` and file
            sizes are added).
        rank_state: this rank's small state (``torch.save``-able: RNG states, data position).
        ema: ``{name: tensor}`` EMA weights (DTensor shards under FSDP) or ``None``.
        keep: prune to the newest ``keep`` step directories.
    """
    import torch.distributed.checkpoint as dcp

    root = checkpoint_dir(run_dir)
    final = root / step_name(step)
    tmp = root / f".{final.name}{_TMP_SUFFIX}"
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / DCP_DIR).mkdir(parents=True)
    barrier()
    dcp.save(_payload(model, optimizer, ema), checkpoint_id=str(tmp / DCP_DIR))
    torch.save(dict(rank_state), tmp / rank_file(env.rank))
    barrier()
    if env.is_main:
        payload = {**state, "format": FORMAT, "step": step, "world_size": env.world_size, "has_ema": ema is not None,
                   "files": _file_sizes(tmp)}
        (tmp / STATE_FILE).write_text(json.dumps(payload, indent=2, default=state_json_default))
        _fsync_tree(tmp)
        publish_checkpoint(tmp, final, keep)
    barrier()
    return final


# --------------------------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------------------------


def _read_state(path: Path) -> Optional[dict[str, Any]]:
    file = path / STATE_FILE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{file}: not valid JSON ({error})") from None


def is_sharded_checkpoint(path: Union[str, os.PathLike]) -> bool:
    """Whether ``path`` is a checkpoint written by :func:`save_sharded_checkpoint`."""
    state = _read_state(Path(path))
    return isinstance(state, dict) and state.get("format") == FORMAT


def load_sharded_checkpoint(path: Union[str, os.PathLike], *, model: nn.Module, optimizer: torch.optim.Optimizer,
                            ema: Optional[Mapping[str, torch.Tensor]] = None) -> ShardedCheckpoint:
    """Load model, optimizer and EMA (in place, resharded to the current layout) and read every rank's state.

    Works with any number of processes, and without a process group. ``ema``: the EMA tensors to load into
    (``None`` when EMA is off). Raises :class:`CheckpointError` on missing, truncated or mismatching files.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = Path(path)
    state = _read_state(path)
    if state is None:
        raise CheckpointError(f"{path / STATE_FILE} is missing; {path} is not a complete checkpoint")
    if state.get("format") != FORMAT or not isinstance(state.get("step"), int) \
            or not isinstance(state.get("world_size"), int) or not isinstance(state.get("files"), dict):
        raise CheckpointError(f"{path / STATE_FILE}: not a sharded fusedit checkpoint (format {FORMAT!r} with step, "
                              f"world_size and files)")
    for name, size in state["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing (listed in {STATE_FILE} with {size} bytes)")
        if file.stat().st_size != size:
            raise CheckpointError(f"{file} has {file.stat().st_size} bytes, {STATE_FILE} recorded {size}: the file "
                                  f"is truncated or was overwritten")
    if ema is not None and not state.get("has_ema"):
        raise CheckpointError(f"{path}: EMA is enabled but the checkpoint was written without EMA")

    payload = _payload(model, optimizer, ema)
    try:
        with warnings.catch_warnings():  # loading without a process group is intended (resume in one process)
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(payload, checkpoint_id=str(path / DCP_DIR))
        set_state_dict(model, optimizer, model_state_dict=payload["model"], optim_state_dict=payload["optimizer"],
                       options=_state_dict_options(strict=False))
    except (RuntimeError, KeyError, ValueError) as error:
        raise CheckpointError(f"{path / DCP_DIR}: cannot be loaded into this model/optimizer ({type(error).__name__}: "
                              f"{str(error)[:500]})") from None
    if ema is not None:
        with torch.no_grad():
            for name, tensor in ema.items():
                if payload["ema"][name] is not tensor:
                    tensor.copy_(payload["ema"][name])

    rank_states = []
    for rank in range(state["world_size"]):
        file = path / rank_file(rank)
        try:
            rank_states.append(torch.load(file, map_location="cpu", weights_only=False))
        except Exception as error:  # truncated/garbled pickles raise many types
            raise CheckpointError(f"{file}: cannot be loaded ({type(error).__name__}: {error})") from None
    step = state.pop("step")
    return ShardedCheckpoint(path=path, step=step, world_size=state["world_size"], state=state,
                             rank_states=rank_states)
