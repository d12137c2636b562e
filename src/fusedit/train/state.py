"""What a training run saves besides its tensors, and how it comes back: the checkpoint state of the
:class:`~fusedit.train.trainer.Trainer`, resuming, and the ``final/`` export.

A checkpoint's run state (``trainer_state.json``) holds the LR scheduler, the global data position, the config and
the last metrics; each process adds its RNG states and its data-stream position. On resume with the same number of
processes every rank continues from its own states; with another number (a sharded checkpoint on ``M != N``
processes, or a single-process checkpoint under DDP/FSDP) the shared generators continue from rank 0's states, each
rank's global RNGs from rank ``r mod N``'s, and a shard stream restarts at the next epoch boundary
(:meth:`~fusedit.train.data_order.TrainingData.restore`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from torch.optim.lr_scheduler import LRScheduler

from fusedit.atomic import write_dir_atomic
from fusedit.checkpoint.checkpointer import Checkpointer, CheckpointState
from fusedit.checkpoint.errors import CheckpointError
from fusedit.checkpoint.layout import remove_stale_temporaries, resume_candidates
from fusedit.checkpoint.rng import capture_rng_state, restore_generators, restore_rng_state
from fusedit.checkpoint.weights import FINAL_DIR
from fusedit.dist.env import barrier
from fusedit.dist.parallelize import ParallelPlan, full_tensor
from fusedit.rundir.opening import remove_stale_run_temporaries
from fusedit.train.data_order import TrainingData
from fusedit.train.ema import EMA

logger = logging.getLogger("fusedit.train")


class RunState:
    """Saves, restores and exports the state of one training run (see the module docstring).

    Args:
        run_dir: the run directory.
        checkpointer: writes and reads the checkpoints (it holds the model, optimizer and EMA).
        plan: the parallel plan (rank, world size, whether the run is distributed).
        lr_scheduler, data, generators, params, ema: the run's live objects.
        config: what checkpoints and ``final/config.yaml`` record (the ExperimentConfig as a plain mapping).
    """

    def __init__(
        self,
        run_dir: Path,
        checkpointer: Checkpointer,
        plan: ParallelPlan,
        *,
        lr_scheduler: LRScheduler,
        data: TrainingData,
        generators: Mapping[str, torch.Generator],
        params: Mapping[str, torch.Tensor],
        ema: EMA | None,
        config: dict[str, Any],
    ) -> None:
        self.run_dir, self.checkpointer, self.plan = run_dir, checkpointer, plan
        self.lr_scheduler, self.data, self.generators = lr_scheduler, data, generators
        self.params, self.ema, self.config = params, ema, config
        self.notes: list[str] = []
        self.step = 0
        self.last_checkpoint: Path | None = None

    @property
    def _cuda_devices(self) -> Literal["all", "current"]:
        return "current" if self.plan.distributed else "all"

    def save(self, metrics: Mapping[str, float] | None = None) -> Path:
        """Write the checkpoint of the current step (every rank calls it) and return its directory."""
        run = {
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "data": self.data.position(),
            "config": self.config,
            "metrics": dict(metrics or {}),
        }
        rank = {"rng": capture_rng_state(self.generators, self._cuda_devices), "data": self.data.stream_state()}
        self.last_checkpoint = self.checkpointer.save(self.step, CheckpointState(self.step, run, [rank]))
        return self.last_checkpoint

    def load(self, path: Path) -> CheckpointState:
        """Restore weights, EMA, optimizer, LR scheduler, data position, RNGs and step from checkpoint ``path``
        (either format, written by any number of processes); notes go to :attr:`notes`.

        The optimizer's hyperparameters and the schedule's base rates stay this run's config's (a checkpoint saves
        its own, which would otherwise replace them): a setting changed on resume (``--allow-change train.lr``)
        takes effect, an unchanged one continues exactly."""
        configured = _configured_hyperparameters(self.lr_scheduler)
        loaded = self.checkpointer.load(path)
        try:
            self.lr_scheduler.load_state_dict(loaded.run["lr_scheduler"])
            position = loaded.run["data"]
        except (KeyError, ValueError) as error:
            raise CheckpointError(f"{path}: scheduler/data state does not fit this run ({error})") from None
        _restore_hyperparameters(self.lr_scheduler, configured)
        env, saved = self.plan.env, len(loaded.ranks)
        if saved == env.world_size:
            restore_rng_state(loaded.ranks[env.rank]["rng"], self.generators, self._cuda_devices)
        else:
            # the shared generators are identical on every saved rank; the global RNGs (dropout, VAE sampling)
            # continue from rank (r mod saved)'s state
            restore_rng_state(loaded.ranks[env.rank % saved]["rng"], None, self._cuda_devices)
            restore_generators(loaded.ranks[0]["rng"], self.generators)
            self.notes.append(f"the checkpoint was written by {saved} process(es), this run has {env.world_size}")
        note = self.data.restore(Path(path), position, loaded.ranks)
        if note:
            self.notes.append(note)
        self.step = loaded.step
        self.last_checkpoint = loaded.path
        return loaded

    def resume(self, resume_from: Path | None, resume: bool, train_config: Mapping[str, Any]) -> Path | None:
        """Load ``resume_from``, else the newest intact checkpoint of the run when ``resume``; returns the path
        loaded. ``train_config``: this run's ``train`` section, compared with the checkpoint's (changes become
        notes). Temporaries of killed writers are removed first (rank 0)."""
        if self.plan.env.is_main:
            remove_stale_temporaries(self.run_dir)
            remove_stale_run_temporaries(self.run_dir)
        barrier()
        loaded: CheckpointState | None = None
        if resume_from is not None:
            loaded = self.load(resume_from)
        elif resume:
            loaded = self._load_newest_intact()
        if loaded is None:
            return None
        saved = loaded.run.get("config", {}).get("train", {})
        changed = sorted(k for k, v in train_config.items() if k in saved and saved[k] != v)
        if changed:
            self.notes.append(
                "resuming with changed train settings: "
                + ", ".join(f"{k}: {saved[k]!r} -> {train_config[k]!r}" for k in changed)
            )
        self.notes.append(f"resumed from {loaded.path} (step {self.step}, {self.data.samples_seen} samples seen)")
        return loaded.path

    def _load_newest_intact(self) -> CheckpointState | None:
        """Load the checkpoint ``latest`` names; when it (or the pointer) is unusable, the newest older checkpoint
        that loads, with a message. ``None`` when the run has no checkpoint."""
        failures: list[str] = []
        for path in resume_candidates(self.run_dir, failures):
            try:
                loaded = self.load(path)
            except CheckpointError as error:
                failures.append(str(error))
                logger.warning("checkpoint %s cannot be resumed: %s; trying an older one", path.name, error)
                continue
            if failures:
                self.notes.append(
                    f"resumed from {path.name}, the newest intact checkpoint (skipped: {'; '.join(failures)})"
                )
            return loaded
        if failures:
            raise CheckpointError(
                f"no checkpoint of {self.run_dir} can be resumed ({'; '.join(failures)}); resume from a copy with "
                f"--resume-from PATH, or start over with --no-resume (the run is moved aside)"
            )
        return None

    def _gather_full(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Whole float32 CPU copies of (possibly sharded) tensors; a collective under FSDP (rank 0 keeps them)."""
        out = {}
        for name, tensor in tensors.items():
            whole = full_tensor(tensor.detach())
            if self.plan.env.is_main:
                out[name] = whole.float().cpu()
        return out

    def export_final(self) -> Path:
        """Write ``run_dir/final``: ``model.safetensors`` (the trained parameters, float32), ``ema.safetensors``
        (when EMA is on) and ``config.yaml``. Every rank calls it; rank 0 writes."""
        target = self.run_dir / FINAL_DIR
        files: dict[str, Any] = {"model.safetensors": self._gather_full(self.params)}
        if self.ema is not None:
            files["ema.safetensors"] = self._gather_full(self.ema.state_dict())
        if self.plan.env.is_main:
            files["config.yaml"] = yaml.safe_dump(self.config, sort_keys=False)
            write_dir_atomic(target, files)
        barrier()
        return target


#: parameter-group entries a checkpoint restores as saved: the parameters and the rates the schedule sets
_SCHEDULED_KEYS = ("params", "lr", "initial_lr")


def _configured_hyperparameters(scheduler: LRScheduler) -> tuple[list[Any], list[dict[str, Any]]]:
    """The schedule's base rates and each parameter group's hyperparameters (betas, weight decay, Muon's settings...)
    as this run's config built them, before a checkpoint's replace them."""
    groups = scheduler.optimizer.param_groups
    return list(scheduler.base_lrs), [{k: v for k, v in g.items() if k not in _SCHEDULED_KEYS} for g in groups]


def _restore_hyperparameters(scheduler: LRScheduler, configured: tuple[list[Any], list[dict[str, Any]]]) -> None:
    """Put back what :func:`_configured_hyperparameters` saw and set each group's rate for the restored step: the
    schedule's multiplier at its restored position times the configured base rate (what ``LambdaLR`` computes). The
    optimizer has already refused a checkpoint with another number of groups."""
    base_lrs, hyperparameters = configured
    groups = scheduler.optimizer.param_groups
    scheduler.base_lrs = base_lrs
    multipliers = getattr(scheduler, "lr_lambdas", None)
    for index, (group, base, settings) in enumerate(zip(groups, base_lrs, hyperparameters, strict=True)):
        group.update(settings)
        group["initial_lr"] = base
        if multipliers is not None:
            group["lr"] = base * multipliers[index](scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]  # what get_last_lr() reports
