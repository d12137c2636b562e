"""Configuration of training: optimisation, flow-matching time sampling, EMA, logging and checkpoints."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fusedit.config import require


@dataclass
class TrainConfig:
    """Defaults reproduce the reference recipe (``docs/design.md``, "The reference recipe") except the step count.

    Attributes:
        max_steps: optimiser steps to train.
        batch_size: global batch size per optimiser step (split over processes and accumulation steps).
        gradient_accumulation_steps: micro-batches per optimiser step.
        lr, weight_decay, betas, eps: AdamW.
        lr_schedule: ``constant``, ``warmup`` (linear warm-up then constant) or ``cosine`` (warm-up then cosine
            decay to ``min_lr``).
        warmup_steps, min_lr: for the schedules above.
        grad_clip: max global grad norm (``null``: no clipping).
        mixed_precision: ``bf16`` autocast where the device supports it, ``no`` for float32.
        time_sampling: ``reference`` (logit-normal index into the shifted flow-match schedule), ``uniform``,
            ``logit_normal`` or ``mode`` (SD3).
        shift: shift of the flow-match schedule (SD3-medium: 3.0).
        logit_mean, logit_std, mode_scale: parameters of the time densities.
        uniform_time_fraction: probability of replacing a drawn σ by an unshifted uniform one (0: off; see
            :meth:`fusedit.flow.FlowMatchSchedule.sample_sigmas`).
        loss_weighting: SD3 weighting: ``none`` (uniform), ``sigma_sqrt`` or ``cosmap``.
        caption_dropout: probability of replacing a caption by the empty string (for CFG).
        ema_decay, ema_every: EMA of the trained weights, updated every ``ema_every`` steps (``ema_every: 0``
            disables EMA).
        seed: global seed.
        log_every: steps between log lines / TensorBoard scalars.
        sample_every: steps between PNG sample grids of ``sample_prompts`` (0 disables).
        sample_prompts: prompts of the sample grid (empty: the data set's own held-out prompts, if any).
        sample_steps, sample_cfg: sampling settings of the grid.
        checkpoint_every: steps between checkpoints (the last step is always saved).
        keep_checkpoints: how many step checkpoints to keep (the newest).
        activation_checkpointing, compile, fused_adamw: speed/memory options.
        cache_text_context: keep the frozen text encoder's context of every caption seen
            (:class:`fusedit.text.cache.CachedTextEncoder`; for data sets that repeat their captions, such as the
            shapes world). Each caption is encoded alone, so results do not depend on batch composition or resume.
        llm_lr_scale: learning-rate multiplier of the LLM's parameters when the LLM trains (``text.trainable`` or
            LLM adapters): they form their own AdamW group at ``lr × llm_lr_scale`` (``min_lr`` scaled alike) on the
            same schedule. 1 (the default) keeps a single group.
        llm_train_steps: with a trainable LLM, train it for the first ``llm_train_steps`` optimiser steps only, then
            freeze it (and cache its contexts when ``cache_text_context``; :mod:`fusedit.train.text_phases`).
            ``null`` (the default): it trains for the whole run.
        optimizer: ``adamw`` (PyTorch's), ``adamw8bit`` (bitsandbytes' 8-bit AdamW: a quarter of the optimizer
            state's memory; needs ``pip install "fusedit[lowmem]"``; not with ``fsdp`` or ``fused_adamw``) or ``muon``
            (Muon for the transformer layers' attention and MLP matrices, AdamW for the rest, at the same ``lr`` and
            ``weight_decay``: :mod:`fusedit.train.muon`; not with ``fsdp`` or ``fused_adamw``).
        muon_ns_steps: ``muon`` only: Newton–Schulz iterations per step (5, the reference's; 3 is cheaper and
            rougher).
        muon_lr_scale: ``muon`` only: Muon's matrices train at ``lr × muon_lr_scale`` (and ``min_lr`` alike, on the
            same schedule); the AdamW parameters at ``lr``.
        distributed: ``none``, ``ddp`` or ``fsdp`` (launched by torchrun).
    """

    max_steps: int = 1000
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    lr_schedule: Literal["constant", "warmup", "cosine"] = "constant"
    warmup_steps: int = 0
    min_lr: float = 0.0
    grad_clip: float | None = 1.0
    mixed_precision: Literal["bf16", "no"] = "bf16"
    time_sampling: Literal["reference", "uniform", "logit_normal", "mode"] = "reference"
    shift: float = 3.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    uniform_time_fraction: float = 0.0
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"
    caption_dropout: float = 0.1
    ema_decay: float = 0.99
    ema_every: int = 100
    seed: int = 42
    log_every: int = 10
    sample_every: int = 0
    sample_prompts: list[str] = field(default_factory=list)
    sample_steps: int = 25
    sample_cfg: float = 6.0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    activation_checkpointing: bool = False
    compile: bool = False
    fused_adamw: bool = False
    cache_text_context: bool = False
    llm_lr_scale: float = 1.0
    llm_train_steps: int | None = None
    distributed: Literal["none", "ddp", "fsdp"] = "none"
    optimizer: Literal["adamw", "adamw8bit", "muon"] = "adamw"
    muon_ns_steps: int = 5
    muon_lr_scale: float = 1.0

    def validate(self) -> None:
        require(self.max_steps > 0, f"train.max_steps: got {self.max_steps}, expected a positive integer")
        require(self.batch_size > 0, f"train.batch_size: got {self.batch_size}, expected a positive integer")
        require(
            self.gradient_accumulation_steps > 0,
            f"train.gradient_accumulation_steps: got {self.gradient_accumulation_steps}, expected >= 1",
        )
        require(
            self.batch_size % self.gradient_accumulation_steps == 0,
            f"train.batch_size ({self.batch_size}) must be divisible by train.gradient_accumulation_steps "
            f"({self.gradient_accumulation_steps})",
        )
        require(self.lr > 0, f"train.lr: got {self.lr}, expected > 0")
        require(self.llm_lr_scale > 0, f"train.llm_lr_scale: got {self.llm_lr_scale}, expected > 0")
        require(
            self.llm_train_steps is None or self.llm_train_steps > 0,
            f"train.llm_train_steps: got {self.llm_train_steps}, expected a positive step count or null",
        )
        require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"train.betas: got {self.betas}, expected two numbers in [0, 1)",
        )
        require(0.0 <= self.caption_dropout <= 1.0, f"train.caption_dropout: got {self.caption_dropout}, expected 0..1")
        require(0.0 <= self.ema_decay < 1.0, f"train.ema_decay: got {self.ema_decay}, expected in [0, 1)")
        require(self.ema_every >= 0, f"train.ema_every: got {self.ema_every}, expected >= 0 (0 disables EMA)")
        require(
            self.grad_clip is None or self.grad_clip > 0, f"train.grad_clip: got {self.grad_clip}, expected > 0 or null"
        )
        require(self.shift > 0, f"train.shift: got {self.shift}, expected > 0")
        require(self.logit_std > 0, f"train.logit_std: got {self.logit_std}, expected > 0")
        require(
            0.0 <= self.uniform_time_fraction <= 1.0,
            f"train.uniform_time_fraction: got {self.uniform_time_fraction}, expected in [0, 1]",
        )
        require(self.checkpoint_every > 0, f"train.checkpoint_every: got {self.checkpoint_every}, expected > 0")
        require(self.keep_checkpoints >= 1, f"train.keep_checkpoints: got {self.keep_checkpoints}, expected >= 1")
        require(self.warmup_steps >= 0, f"train.warmup_steps: got {self.warmup_steps}, expected >= 0")
        require(self.sample_steps > 0, f"train.sample_steps: got {self.sample_steps}, expected > 0")
        require(self.sample_cfg >= 1, f"train.sample_cfg: got {self.sample_cfg}, expected >= 1 (1 = no guidance)")
        self._validate_optimizer()

    def _validate_optimizer(self) -> None:
        """The combinations ``train.optimizer`` cannot do (both alternatives to AdamW need unsharded weights)."""
        require(self.muon_ns_steps >= 1, f"train.muon_ns_steps: got {self.muon_ns_steps}, expected >= 1")
        require(self.muon_lr_scale > 0, f"train.muon_lr_scale: got {self.muon_lr_scale}, expected > 0")
        if self.optimizer != "muon":
            require(
                self.muon_ns_steps == 5 and self.muon_lr_scale == 1.0,
                f"train.muon_ns_steps and train.muon_lr_scale apply to train.optimizer=muon, not "
                f"{self.optimizer!r}; leave them at 5 and 1 or set train.optimizer=muon",
            )
        if self.optimizer != "adamw":
            require(not self.fused_adamw, "train.fused_adamw applies to train.optimizer=adamw; turn one of them off")
        if self.optimizer == "muon":
            require(
                self.distributed != "fsdp",
                "train.optimizer=muon needs each weight matrix whole on every process, and train.distributed=fsdp "
                "shards them; use train.distributed=ddp or train.optimizer=adamw",
            )
        if self.optimizer == "adamw8bit":
            require(
                self.distributed != "fsdp",
                "train.optimizer=adamw8bit does not shard under train.distributed=fsdp (bitsandbytes' 8-bit state "
                "is not a DTensor); use train.distributed=ddp or train.optimizer=adamw",
            )
