"""One checkpoint interface for every run: ``Checkpointer.save(step, state)`` and ``Checkpointer.load(path) ->
state``.

The format is chosen once, when the checkpointer is built: single-process runs write the plain files of
:mod:`fusedit.checkpoint.single`, distributed runs the sharded format of :mod:`fusedit.checkpoint.sharded`.
``load`` reads either format into any layout: a single-process checkpoint resumes under DDP or FSDP (every rank
reads the whole tensors and keeps its shard), a sharded one in one process or on another number of processes
(``torch.distributed.checkpoint`` reshards it).

The trained tensors (weights, optimizer state, EMA) are saved from and loaded into the live objects given at
construction (:class:`TrainedObjects`); everything else travels in a :class:`CheckpointState`.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from fusedit.atomic import DiskFullError, is_disk_full
from fusedit.checkpoint.errors import CheckpointError
from fusedit.checkpoint.layout import PathLike, checkpoint_dir, step_name
from fusedit.checkpoint.sharded import is_sharded_checkpoint, load_sharded_checkpoint, save_sharded_checkpoint
from fusedit.checkpoint.single import load_checkpoint, save_checkpoint
from fusedit.checkpoint.weights import load_trainable_weights
from fusedit.dist.env import DistEnv
from fusedit.dist.parallelize import like_parameter


class ShadowWeights(Protocol):
    """What the checkpointer needs of an EMA (:class:`fusedit.train.ema.EMA`)."""

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None: ...


@dataclass
class TrainedObjects:
    """The live objects whose tensors a checkpoint holds.

    Attributes:
        model: the trained module (FSDP-sharded in place, or the module inside DDP).
        params: the trained parameters by name (the model's, plus a trainable LLM's under ``llm.``); the optimizer
            was built from ``params.values()`` in this order.
        optimizer: their optimizer.
        ema: their exponential moving average, or ``None``.
    """

    model: nn.Module
    params: Mapping[str, nn.Parameter]
    optimizer: torch.optim.Optimizer
    ema: ShadowWeights | None = None


@dataclass
class CheckpointState:
    """Everything of a checkpoint besides the trained tensors.

    Attributes:
        step: optimiser steps completed.
        run: JSON-serialisable run state (``trainer_state.json``: LR scheduler, data position, config, metrics).
        ranks: per process ``{"rng": RNG states, "data": data-stream position or None}``. On save: this process's
            alone; on load: every saving process's, in rank order (``len(ranks)`` = the saving world size).
        path: the checkpoint directory (set on load and after save).
    """

    step: int
    run: dict[str, Any]
    ranks: list[dict[str, Any]] = field(default_factory=list)
    path: Path | None = None


class Checkpointer:
    """Saves and loads the checkpoints of one run directory.

    Args:
        run_dir: the run directory (checkpoints go to ``run_dir/checkpoints``).
        objects: the live objects saved and restored in place.
        env: this process's place in the job.
        sharded: write the sharded format (distributed runs) instead of the single-process one.
        keep: keep only the newest ``keep`` checkpoints (``None``: all).
    """

    def __init__(
        self, run_dir: PathLike, objects: TrainedObjects, *, env: DistEnv, sharded: bool, keep: int | None = None
    ) -> None:
        self.run_dir = Path(run_dir)
        self.objects = objects
        self.env = env
        self.sharded = sharded
        self.keep = keep

    def save(self, step: int, state: CheckpointState) -> Path:
        """Write checkpoint ``step`` atomically (every process calls it) and return its directory.

        A full disk raises :class:`~fusedit.atomic.DiskFullError` naming the checkpoint once its partial write is
        removed; the older checkpoints stay complete, so the run resumes from them when space is freed.
        """
        final = checkpoint_dir(self.run_dir) / step_name(step)
        try:
            return self._write(step, state)
        except Exception as error:
            if not is_disk_full(error, final.parent):
                raise
            if self.env.is_main:
                for partial in final.parent.glob(f".{final.name}.tmp-*"):
                    shutil.rmtree(partial, ignore_errors=True)
            raise DiskFullError(final) from error

    def _write(self, step: int, state: CheckpointState) -> Path:
        if len(state.ranks) != 1:
            raise ValueError(f"save() takes this process's rank state alone, got {len(state.ranks)}")
        objects, rank = self.objects, state.ranks[0]
        ema = objects.ema.state_dict() if objects.ema is not None else None
        if self.sharded:
            path = save_sharded_checkpoint(
                self.run_dir,
                step,
                model=objects.model,
                optimizer=objects.optimizer,
                state=state.run,
                rank_state=rank,
                env=self.env,
                ema=ema,
                keep=self.keep,
            )
        else:
            run = dict(state.run)
            if rank.get("data") is not None:  # the stream position lives in trainer_state.json in this format
                run["data"] = {**run.get("data", {}), "stream": rank["data"]}
            path = save_checkpoint(
                self.run_dir,
                step,
                model={n: p.detach() for n, p in objects.params.items()},
                ema=ema,
                optimizer=objects.optimizer.state_dict(),
                state=run,
                rng=rank["rng"],
                keep=self.keep,
            )
        state.path = path
        return path

    def load(self, path: PathLike) -> CheckpointState:
        """Restore the trained tensors from checkpoint ``path`` (either format) and return the rest."""
        objects = self.objects
        if is_sharded_checkpoint(path):
            ema = objects.ema.state_dict() if objects.ema is not None else None
            loaded = load_sharded_checkpoint(path, model=objects.model, optimizer=objects.optimizer, ema=ema)
            return CheckpointState(loaded.step, loaded.state, loaded.rank_states, loaded.path)
        checkpoint = load_checkpoint(path)
        params = objects.params
        load_trainable_weights(params, _like(checkpoint.model, params), source=str(Path(path) / "model.safetensors"))
        if objects.ema is not None:
            if checkpoint.ema is None:
                raise CheckpointError(f"{path}: EMA is enabled but the checkpoint has no ema.safetensors")
            objects.ema.load_state_dict(_like(checkpoint.ema, params))
        try:
            objects.optimizer.load_state_dict(_optimizer_like(checkpoint.optimizer, list(params.values())))
        except (KeyError, ValueError) as error:
            raise CheckpointError(f"{path}: the optimizer state does not fit this run ({error})") from None
        run = checkpoint.state
        stream = run.get("data", {}).pop("stream", None) if isinstance(run.get("data"), dict) else None
        return CheckpointState(checkpoint.step, run, [{"rng": checkpoint.rng, "data": stream}], checkpoint.path)


def _like(tensors: Mapping[str, torch.Tensor], params: Mapping[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Whole saved tensors laid out like the parameters of the same name (this rank's shard under FSDP)."""
    return {name: like_parameter(t, params[name]) if name in params else t for name, t in tensors.items()}


def _optimizer_like(state: Mapping[str, Any], params: list[nn.Parameter]) -> dict[str, Any]:
    """A saved ``optimizer.state_dict()`` of whole tensors, each parameter-shaped state laid out like its parameter
    (parameters are numbered in the order the optimizer was built with)."""
    laid_out = {}
    for index, entry in state["state"].items():
        if not 0 <= int(index) < len(params):
            raise ValueError(f"state for parameter {index}, but this run trains {len(params)}")
        param = params[int(index)]
        laid_out[index] = {
            key: like_parameter(value, param)
            if key != "step" and torch.is_tensor(value) and value.shape == param.shape
            else value
            for key, value in entry.items()
        }
    return {"state": laid_out, "param_groups": state["param_groups"]}
