"""What the :class:`~fusedit.train.trainer.Trainer` checks and builds before training: its config, its text encoder,
its generators, and the summary it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from fusedit.checkpoint.weights import LLM_PREFIX
from fusedit.train.config import TrainConfig
from fusedit.train.muon import uses_muon
from fusedit.train.optimizers import make_optimizer
from fusedit.train.schedules import build_lr_scheduler


@dataclass
class TrainSummary:
    """What :meth:`Trainer.fit` did.

    Attributes:
        start_step: the step it started from (0, or the resumed checkpoint's).
        step: the step it ended at.
        losses: ``{step: loss}`` of every optimiser step run by this call (mean over the global batch).
        last_checkpoint: the newest checkpoint directory.
        final_dir: ``run_dir/final``.
        resumed_from: the checkpoint it resumed from, if any.
        images_per_second: training throughput of this call.
    """

    start_step: int
    step: int
    losses: dict[int, float] = field(default_factory=dict)
    last_checkpoint: Path | None = None
    final_dir: Path | None = None
    resumed_from: Path | None = None
    images_per_second: float = 0.0


def split_config(config: Any) -> tuple[Any, TrainConfig]:
    """``(experiment or None, train config)`` of an ExperimentConfig or a TrainConfig (validated)."""
    if isinstance(config, TrainConfig):
        experiment, train = None, config
    elif isinstance(getattr(config, "train", None), TrainConfig):
        experiment, train = config, config.train
    else:
        raise TypeError(
            f"Trainer config must be an ExperimentConfig (with a .train TrainConfig) or a TrainConfig, "
            f"got {type(config).__name__}"
        )
    train.validate()
    return experiment, train


def check_text_encoder(text_encoder: Any, cfg: TrainConfig) -> None:
    """The text encoder must encode, and may be trained in one process only."""
    if not hasattr(text_encoder, "encode"):
        raise TypeError(f"text_encoder must have encode(prompts) -> context; got {type(text_encoder).__name__}")
    if cfg.distributed != "none" and getattr(text_encoder, "trainable", False):
        raise ValueError(
            f"train.distributed={cfg.distributed} with a trainable text encoder is not supported: the "
            f"LLM is replicated outside DDP/FSDP; train it with train.distributed=none"
        )


def training_generators(seed: int, device: torch.device) -> dict[str, torch.Generator]:
    """The trainer's own generators, shared by all ranks (same seeds, same draws; each rank keeps its slice)."""
    return {
        "sigma": torch.Generator().manual_seed(seed + 1),
        "caption_dropout": torch.Generator().manual_seed(seed + 2),
        "noise": torch.Generator(device=device).manual_seed(seed + 3),
    }


def build_optimizer(cfg: TrainConfig, params: dict[str, nn.Parameter]) -> tuple[torch.optim.Optimizer, LRScheduler]:
    """The optimizer of ``train.optimizer`` over ``params`` (name → parameter, in this order: checkpoints number the
    parameters by it) and its LR schedule. With ``train.llm_lr_scale`` ≠ 1 the LLM's parameters (names under
    ``llm.``, which come after the model's) form a second group at ``lr × llm_lr_scale``; the schedule scales both
    groups alike. For ``muon`` each group flags the parameters Muon updates (:func:`fusedit.train.muon.uses_muon`)."""
    dit = {name: p for name, p in params.items() if not name.startswith(LLM_PREFIX)}
    llm = {name: p for name, p in params.items() if name.startswith(LLM_PREFIX)}
    if list(params) != list(dit) + list(llm):
        raise ValueError("the LLM's parameters (llm.*) must come after the model's: checkpoints number them in order")
    if llm and cfg.llm_lr_scale != 1.0:
        scaled = {**_group(cfg, llm), "lr": cfg.lr * cfg.llm_lr_scale}
        groups: list[dict] = [_group(cfg, dit), scaled] if dit else [scaled]
    else:
        groups = [_group(cfg, params)]
    optimizer = make_optimizer(
        cfg.optimizer,
        groups,
        lr=cfg.lr,
        betas=(cfg.betas[0], cfg.betas[1]),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=cfg.fused_adamw,
        muon_ns_steps=cfg.muon_ns_steps,
        muon_lr_scale=cfg.muon_lr_scale,
    )
    scheduler = build_lr_scheduler(
        optimizer,
        cfg.lr_schedule,
        lr=cfg.lr,
        total_steps=cfg.max_steps,
        warmup_steps=cfg.warmup_steps,
        min_lr=cfg.min_lr,
    )
    return optimizer, scheduler


def _group(cfg: TrainConfig, named: dict[str, nn.Parameter]) -> dict:
    """One parameter group of ``named`` (in order); for ``train.optimizer=muon`` with the group's Muon flags."""
    group: dict = {"params": list(named.values())}
    if cfg.optimizer == "muon":
        group["muon"] = [uses_muon(name, p) for name, p in named.items()]
    return group
