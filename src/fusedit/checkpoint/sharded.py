"""The checkpoint format of distributed runs (``train.distributed: ddp | fsdp``): ``torch.distributed.checkpoint``.

::

    run_dir/checkpoints/step-000123/
        dcp/                  DCP files: {"model", "optimizer", "ema"} — every rank writes its shards
        rank-00000.pt ...     per rank (tensors, numbers and containers only, read with weights_only=True): RNG
                              states (python, numpy, torch CPU, this rank's CUDA device, the trainer's
                              generators) and the data-stream position (shard streams)
        trainer_state.json    written by rank 0: format "fusedit-dcp", step, world_size, LR scheduler, global data
                              position, config, metrics, file sizes

Writing is atomic like the single-process format: every rank writes into the hidden ``.step-XXXXXX.tmp-dcp``
directory, a barrier waits for all of them, then rank 0 fsyncs, renames the directory into place and moves
``latest``.

Model, EMA and optimizer state are stored by parameter name (``get_state_dict``), so DCP reshards them on load: a
checkpoint written by ``N`` processes loads on ``M`` processes, with FSDP, DDP or in one process without a process
group. :func:`read_sharded_weights` reads the model or EMA weights alone, without a model (sampling, export).
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from fusedit.atomic import fsync_tree
from fusedit.checkpoint.dcp_safety import SafeLoadPlanner, check_dcp_metadata, checkpoint_error_of
from fusedit.checkpoint.errors import CheckpointError
from fusedit.checkpoint.layout import (
    STATE_FILE,
    PathLike,
    checkpoint_dir,
    file_sizes,
    publish_checkpoint,
    read_state,
    step_name,
    verify_file_sizes,
    write_state,
)
from fusedit.checkpoint.safe_pickle import load_torch_file
from fusedit.checkpoint.verify import check_finite
from fusedit.dist.env import DistEnv, barrier

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


def _state_dict_options(strict: bool = True) -> StateDictOptions:
    # frozen parameters are neither saved nor loaded; dcp.load already fails on any missing trainable entry, so
    # set_state_dict must not insist on the frozen ones (strict=False)
    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def _payload(
    model: nn.Module, optimizer: torch.optim.Optimizer, ema: Mapping[str, torch.Tensor] | None
) -> dict[str, Any]:
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_state_dict_options())
    payload: dict[str, Any] = {"model": model_state, "optimizer": optimizer_state}
    if ema is not None:
        payload["ema"] = dict(ema)
    return payload


def save_sharded_checkpoint(
    run_dir: PathLike,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: Mapping[str, Any],
    rank_state: Mapping[str, Any],
    env: DistEnv,
    ema: Mapping[str, torch.Tensor] | None = None,
    keep: int | None = None,
) -> Path:
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
    root = checkpoint_dir(run_dir)
    final = root / step_name(step)
    tmp = root / f".{final.name}{_TMP_SUFFIX}"
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / DCP_DIR).mkdir(parents=True)
    barrier()
    with warnings.catch_warnings():  # saving without a process group is intended (a one-process sharded run)
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(_payload(model, optimizer, ema), checkpoint_id=str(tmp / DCP_DIR))
    torch.save(dict(rank_state), tmp / rank_file(env.rank))
    barrier()
    if env.is_main:
        write_state(
            tmp,
            {
                **state,
                "format": FORMAT,
                "step": step,
                "world_size": env.world_size,
                "has_ema": ema is not None,
                "files": file_sizes(tmp),
            },
        )
        fsync_tree(tmp)
        publish_checkpoint(tmp, final, keep)
    barrier()
    return final


def is_sharded_checkpoint(path: PathLike) -> bool:
    """Whether ``path`` is a checkpoint written by :func:`save_sharded_checkpoint`."""
    state = read_state(Path(path))
    return isinstance(state, dict) and state.get("format") == FORMAT


def _verified_state(path: Path) -> dict[str, Any]:
    state = read_state(path)
    if state is None:
        raise CheckpointError(f"{path / STATE_FILE} is missing; {path} is not a complete checkpoint")
    well_formed = (
        isinstance(state.get("step"), int)
        and isinstance(state.get("world_size"), int)
        and isinstance(state.get("files"), dict)
    )
    if state.get("format") != FORMAT or not well_formed:
        raise CheckpointError(
            f"{path / STATE_FILE}: not a sharded fusedit checkpoint (format {FORMAT!r} with step, world_size and files)"
        )
    verify_file_sizes(path, state["files"])
    return state


def _dcp_load(payload: dict[str, Any], path: Path) -> None:
    check_dcp_metadata(path / DCP_DIR)  # DCP unpickles it: nothing but its own classes may be in it
    with warnings.catch_warnings():  # loading without a process group is intended (resume in one process)
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp.load(payload, checkpoint_id=str(path / DCP_DIR), planner=SafeLoadPlanner())
        except CheckpointException as error:  # a BaseException: DCP's wrapper of every rank's failure
            raise checkpoint_error_of(error, path / DCP_DIR) from None


def load_sharded_checkpoint(
    path: PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: Mapping[str, torch.Tensor] | None = None,
) -> ShardedCheckpoint:
    """Load model, optimizer and EMA (in place, resharded to the current layout) and read every rank's state.

    Works with any number of processes, and without a process group. ``ema``: the EMA tensors to load into
    (``None`` when EMA is off). Raises :class:`CheckpointError` on missing, truncated or mismatching files.
    """
    path = Path(path)
    state = _verified_state(path)
    if ema is not None and not state.get("has_ema"):
        raise CheckpointError(f"{path}: EMA is enabled but the checkpoint was written without EMA")
    payload = _payload(model, optimizer, ema)
    try:
        _dcp_load(payload, path)
        set_state_dict(
            model,
            optimizer,
            model_state_dict=payload["model"],
            optim_state_dict=payload["optimizer"],
            options=_state_dict_options(strict=False),
        )
    except CheckpointError:
        raise
    except (RuntimeError, KeyError, ValueError) as error:
        raise CheckpointError(
            f"{path / DCP_DIR}: cannot be loaded into this model/optimizer ({type(error).__name__}: {str(error)[:500]})"
        ) from None
    if ema is not None:
        with torch.no_grad():
            for name, tensor in ema.items():
                if payload["ema"][name] is not tensor:
                    tensor.copy_(payload["ema"][name])
    rank_states = []
    for rank in range(state["world_size"]):
        rank_states.append(load_torch_file(path / rank_file(rank)))
    step = state.pop("step")
    return ShardedCheckpoint(path=path, step=step, world_size=state["world_size"], state=state, rank_states=rank_states)


def read_sharded_weights(path: PathLike, which: str = "model") -> dict[str, torch.Tensor]:
    """The whole ``model`` (or ``ema``) weights of a sharded checkpoint as CPU float32 tensors, read in one process
    without a model: shapes and dtypes come from the checkpoint's own metadata."""
    path = Path(path)
    state = _verified_state(path)
    if which == "ema" and not state.get("has_ema"):
        raise CheckpointError(f"{path}: the checkpoint was written without EMA")
    check_dcp_metadata(path / DCP_DIR)
    try:
        metadata = dcp.FileSystemReader(str(path / DCP_DIR)).read_metadata().state_dict_metadata
    except Exception as error:  # unreadable metadata raises many types
        raise CheckpointError(f"{path / DCP_DIR}: cannot read the checkpoint's metadata ({error})") from None
    prefix = which + "."
    wanted = {
        key[len(prefix) :]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    if not wanted:
        raise CheckpointError(f"{path / DCP_DIR}: holds no {which!r} weights")
    payload = {which: wanted}
    try:
        _dcp_load(payload, path)
    except CheckpointError:
        raise
    except (RuntimeError, KeyError, ValueError) as error:
        raise CheckpointError(
            f"{path / DCP_DIR}: cannot be read ({type(error).__name__}: {str(error)[:500]})"
        ) from None
    weights = {name: tensor.float() for name, tensor in payload[which].items()}
    check_finite(weights, f"{path} ({which} weights)")
    return weights
