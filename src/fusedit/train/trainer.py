"""The training loop: one rectified-flow training step for every model, with exact resume.

Usage::

    trainer = Trainer(experiment_config, model, text_encoder, dataset, run_dir="runs/x", sample_fn=pipeline_fn)
    summary = trainer.fit()          # resumes from run_dir/checkpoints/latest if there is one

Interfaces consumed (duck-typed):

* ``model``: ``nn.Module``, ``forward(x (B, C, H, W), timestep (B,) = σ·1000, context) -> velocity (B, C, H, W)``.
  Only parameters with ``requires_grad`` are optimised, averaged (EMA) and saved.
* ``text_encoder``: ``encode(prompts: list[str]) -> context`` (opaque; passed to the model), ``trainable: bool``,
  ``trainable_parameters()``. Frozen: encoded under ``no_grad``, never optimised or saved. Trainable: it must also
  have ``named_parameters()`` (e.g. be an ``nn.Module``); its trainable parameters join the optimiser, the EMA and
  the weight files under the prefix ``llm.``. With ``train.llm_train_steps`` it also needs ``freeze()``, called when
  the LLM stops training (:mod:`fusedit.train.text_phases`).
* ``dataset``: items ``{"image": (C, H, W) float tensor, "caption": str}``, map-style or a resumable stream (read as
  :mod:`fusedit.train.data_order` describes). Items with ``"is_latent": True`` are already latents (a latent
  cache): ``codec.encode`` is skipped. Otherwise an optional ``codec`` with ``encode(images (B, 3, H, W) in [-1, 1])
  -> latents`` is applied under ``no_grad``. A data set's ``skipped`` count (corrupt samples) is logged.
* ``sample_fn(prompts, step) -> images (N, 3, H, W) in [-1, 1]``: called every ``train.sample_every`` steps (model in
  eval mode, global RNG forked so training randomness is untouched); the grid goes to ``run_dir/samples/``.
  Prompts: ``train.sample_prompts``, else the dataset's ``sample_prompts`` attribute if it has one.

Outputs in ``run_dir``: ``checkpoints/step-XXXXXX/`` every ``train.checkpoint_every`` steps and at the last step
(:mod:`fusedit.checkpoint`), ``final/`` (what the pipeline loads: trained weights, EMA weights, ``config.yaml``;
:mod:`fusedit.train.state`), ``metrics.jsonl``, ``logs/`` (TensorBoard) and ``samples/``
(:mod:`fusedit.train.logging`).

Randomness and resume: σ, noise and caption dropout come from trainer-owned ``torch.Generator`` objects. Their
states, the global RNGs, the optimizer, the LR scheduler, the EMA and the data position are checkpointed, so a
resumed run continues exactly as the uninterrupted one would (bit-exact on CPU).

Distributed (``train.distributed: ddp | fsdp``, launched by torchrun; :func:`fusedit.dist.parallelize.parallelize`):
the global batch ``train.batch_size`` is split over the accumulation steps and the ``W`` ranks. σ, noise and caption
dropout are drawn for the whole global micro-batch on every rank from the shared generators and each rank keeps its
slice, so a ``W``-process run computes the same losses as a 1-process run of the same global batch (up to float
reduction order). The logged loss is all-reduced; only rank 0 logs, writes samples and ``final/``.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fusedit.checkpoint.checkpointer import Checkpointer, TrainedObjects
from fusedit.checkpoint.layout import step_name
from fusedit.checkpoint.weights import trainable_named_parameters
from fusedit.dist.env import all_reduce
from fusedit.dist.parallelize import parallelize
from fusedit.flow import FlowMatchSchedule, loss_weighting
from fusedit.rundir.lock import hold_run_dir
from fusedit.text.expansion import expand_ahead
from fusedit.train.data_order import MicroBatch, TrainingData
from fusedit.train.ema import EMA
from fusedit.train.errors import NonFiniteLossError
from fusedit.train.logging import SilentLog, TrainLogger
from fusedit.train.setup import TrainSummary, build_optimizer, check_text_encoder, split_config, training_generators
from fusedit.train.state import RunState
from fusedit.train.step import flow_loss, train_step
from fusedit.train.text_phases import TextEncoderPhases

SampleFn = Callable[[list[str], int], torch.Tensor]


class Trainer:
    """Trains ``model`` (and optionally the text encoder) with the rectified-flow objective of :mod:`fusedit.flow`.

    Args:
        config: an ``ExperimentConfig`` (its ``train`` section is used, the rest is saved with the weights) or a
            :class:`TrainConfig`.
        model, text_encoder, dataset, codec, sample_fn: see the module docstring.
        run_dir: the run directory (created).
        device: where the model trains; the text encoder and codec place their outputs themselves. Distributed:
            this rank's device (``cuda:LOCAL_RANK`` or ``cpu``).
        resume: resume from the newest intact checkpoint of ``run_dir`` (``checkpoints/latest``; when it is
            corrupt, the newest older one that loads, with a message).
        resume_from: resume from this checkpoint directory instead (an error if it cannot be loaded).
        num_workers: DataLoader workers (default: ``config.data.num_workers`` for an ExperimentConfig, else 0).
        progress, tensorboard: console progress / TensorBoard on or off.
        after_save: called by rank 0 with each checkpoint directory and ``final/`` once written (e.g.
            :class:`fusedit.finetune.setup.AdapterWriter` adds the LoRA adapters in peft's format).
    """

    def __init__(
        self,
        config: Any,
        model: nn.Module,
        text_encoder: Any,
        dataset: Any,
        *,
        run_dir: str | Path,
        codec: Any = None,
        sample_fn: SampleFn | None = None,
        device: str | torch.device = "cpu",
        resume: bool = True,
        resume_from: str | Path | None = None,
        num_workers: int | None = None,
        progress: bool = True,
        tensorboard: bool = True,
        after_save: Callable[[Path], None] | None = None,
    ) -> None:
        self.experiment, self.cfg = split_config(config)
        check_text_encoder(text_encoder, self.cfg)
        cfg = self.cfg
        self.run_dir, self.device = Path(run_dir), torch.device(device)
        self.codec, self.sample_fn = codec, sample_fn
        expand_ahead(text_encoder, dataset)  # text.expansion: every known caption's continuation, batched, once
        #: the encoder of each step: trained along (for the first train.llm_train_steps), or frozen and maybe cached
        self.text_phases = TextEncoderPhases(
            text_encoder, trains_until=cfg.llm_train_steps, cache=cfg.cache_text_context
        )
        self.resume, self.resume_from = resume, Path(resume_from) if resume_from is not None else None
        self.progress, self.tensorboard = progress, tensorboard
        self.after_save = after_save
        self.use_bf16 = cfg.mixed_precision == "bf16" and self.device.type == "cuda" and torch.cuda.is_bf16_supported()

        self.model = self._prepare_model(model)
        # DDP wraps the model; FSDP shards it in place (self.model then holds DTensor shards)
        self.plan = parallelize(self.model, cfg.distributed, self.device, bf16=self.use_bf16)
        self.data = TrainingData(
            dataset,
            seed=cfg.seed,
            global_micro_batch=self._global_micro_batch(),
            env=self.plan.env,
            num_workers=self._num_workers(num_workers),
        )
        self.forward_model = torch.compile(self.plan.module) if cfg.compile else self.plan.module
        self.params = trainable_named_parameters(self.model, text_encoder)
        self.optimizer, self.lr_scheduler = build_optimizer(cfg, self.params)
        self.ema = EMA(self.params, cfg.ema_decay) if cfg.ema_every > 0 else None
        self.schedule = FlowMatchSchedule(shift=cfg.shift)
        self.generators = training_generators(cfg.seed, self.device)
        self.state = self._run_state()
        #: called on rank 0 with the starting step once the run has resumed (or started), before training
        self.on_started: Callable[[int], None] | None = None
        if cfg.mixed_precision == "bf16" and not self.use_bf16:
            self.notes.append(
                f"train.mixed_precision=bf16 is not supported on device {self.device}; training in float32"
            )

    # ------------------------------------------------------------------------------------------------------------
    # construction helpers
    # ------------------------------------------------------------------------------------------------------------

    def _prepare_model(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        if self.cfg.activation_checkpointing:
            enable = getattr(model, "enable_activation_checkpointing", None)
            if enable is None:
                raise ValueError(
                    f"train.activation_checkpointing=true but {type(model).__name__} has no "
                    f"enable_activation_checkpointing() method"
                )
            enable()
        return model

    def _run_state(self) -> RunState:
        """What saves, restores and exports this run (its checkpointer holds the model, optimizer and EMA)."""
        objects = TrainedObjects(self.model, self.params, self.optimizer, self.ema)
        checkpointer = Checkpointer(
            self.run_dir, objects, env=self.plan.env, sharded=self.plan.distributed, keep=self.cfg.keep_checkpoints
        )
        return RunState(
            self.run_dir,
            checkpointer,
            self.plan,
            lr_scheduler=self.lr_scheduler,
            data=self.data,
            generators=self.generators,
            params=self.params,
            ema=self.ema,
            config=self._config_dict(),
        )

    def _global_micro_batch(self) -> int:
        """Samples per micro-batch over all ranks (each rank reads ``1 / world_size`` of it)."""
        cfg, world = self.cfg, self.plan.env.world_size
        accumulation = cfg.gradient_accumulation_steps
        if cfg.batch_size % (accumulation * world):
            raise ValueError(
                f"train.batch_size ({cfg.batch_size}) must be divisible by "
                f"train.gradient_accumulation_steps ({accumulation}) x the number of processes ({world})"
            )
        return cfg.batch_size // accumulation

    def _num_workers(self, num_workers: int | None) -> int:
        if num_workers is not None:
            return num_workers
        return getattr(getattr(self.experiment, "data", None), "num_workers", 0)

    def _config_dict(self) -> dict[str, Any]:
        if self.experiment is not None and dataclasses.is_dataclass(self.experiment):
            return dataclasses.asdict(self.experiment)  # type: ignore[arg-type]
        return {"train": dataclasses.asdict(self.cfg)}

    @property
    def step(self) -> int:
        """Optimiser steps completed."""
        return self.state.step

    @property
    def notes(self) -> list[str]:
        """Messages for the log (resume, changed settings, device fallbacks), printed when :meth:`fit` starts."""
        return self.state.notes

    @property
    def last_checkpoint(self) -> Path | None:
        return self.state.last_checkpoint

    # ------------------------------------------------------------------------------------------------------------
    # the training step (one function for every model)
    # ------------------------------------------------------------------------------------------------------------

    def _rank_slice(self, size: int) -> tuple[int, slice]:
        """(global micro-batch size, this rank's slice of it) for a local micro-batch of ``size`` samples."""
        env = self.plan.env
        return size * env.world_size, slice(env.rank * size, (env.rank + 1) * size)

    def drop_captions(self, captions: list[str]) -> list[str]:
        """Replace each caption by ``""`` with probability ``train.caption_dropout`` (trainer-owned generator; drawn
        for the global micro-batch, this rank's slice kept)."""
        total, mine = self._rank_slice(len(captions))
        drop = torch.rand(total, generator=self.generators["caption_dropout"])[mine] < self.cfg.caption_dropout
        return ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]

    @property
    def text_encoder(self) -> Any:
        """The text encoder of the coming step (:class:`fusedit.train.text_phases.TextEncoderPhases`)."""
        return self.text_phases.at(self.step)

    def _encode_text(self, captions: list[str]) -> Any:
        encoder = self.text_encoder
        if getattr(encoder, "trainable", False):
            return encoder.encode(captions)
        with torch.no_grad():
            return encoder.encode(captions)

    def compute_loss(self, images: torch.Tensor, captions: list[str], is_latent: bool = False) -> torch.Tensor:
        """Flow-matching loss of this rank's micro-batch: ``images`` ``(B, C, H, W)`` (pixels, or latents when
        ``is_latent``), ``B`` captions.

        Encodes (codec unless ``is_latent``, text), draws σ and ε for the global micro-batch (keeping this rank's
        slice), and returns :func:`fusedit.train.step.flow_loss` (a float32 scalar, mean over this rank's samples).
        """
        cfg = self.cfg
        images = images.to(self.device, non_blocking=True)
        with torch.no_grad():
            x0 = (self.codec.encode(images) if self.codec is not None and not is_latent else images).float()
        total, mine = self._rank_slice(x0.shape[0])
        sigmas = self.schedule.sample_sigmas(
            total,
            self.generators["sigma"],
            method=cfg.time_sampling,
            logit_mean=cfg.logit_mean,
            logit_std=cfg.logit_std,
            mode_scale=cfg.mode_scale,
            uniform_fraction=cfg.uniform_time_fraction,
        )[mine].to(self.device)
        noise = torch.randn(
            (total, *x0.shape[1:]), generator=self.generators["noise"], device=self.device, dtype=x0.dtype
        )[mine]
        captions = self.drop_captions(captions)
        return flow_loss(
            self.forward_model,
            x0,
            noise,
            sigmas,
            lambda: self._encode_text(captions),
            weights=loss_weighting(sigmas, cfg.loss_weighting),
            autocast_dtype=torch.bfloat16 if self.use_bf16 else None,
        )

    def _micro_loss(self, micro_batches: Iterator[MicroBatch]) -> Callable[[], torch.Tensor]:
        def compute() -> torch.Tensor:
            batch = next(micro_batches)
            if isinstance(batch, tuple):  # (images, captions) from a custom iterator
                batch = MicroBatch(*batch)
            loss = self.compute_loss(batch.images, batch.captions, batch.is_latent)
            self.data.consumed(batch)
            return loss

        return compute

    def optimizer_step(self, micro_batches: Iterator[MicroBatch]) -> tuple[float, float]:
        """One optimiser step over ``gradient_accumulation_steps`` micro-batches (:func:`fusedit.train.step.
        train_step`); returns (mean loss over the global batch, grad norm).

        Raises :class:`NonFiniteLossError` before touching the weights if the loss or gradient norm is not finite.
        """
        reduce = (lambda loss: all_reduce(loss, "mean", self.device)) if self.plan.distributed else None
        try:
            result = train_step(
                self.optimizer,
                list(self.params.values()),
                [self._micro_loss(micro_batches)] * self.cfg.gradient_accumulation_steps,
                grad_clip=self.cfg.grad_clip,
                gradient_sync=self.plan.gradient_sync,
                reduce_loss=reduce,
            )
        except NonFiniteLossError as error:
            raise error.at(self.step + 1, self.last_checkpoint) from None
        self.lr_scheduler.step()
        self.state.step += 1
        if self.ema is not None and self.step % self.cfg.ema_every == 0:
            self.ema.update()
        return result.loss, result.grad_norm

    # ------------------------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------------------------

    def save_checkpoint(self, metrics: dict[str, float] | None = None) -> Path:
        """Write the checkpoint of the current step (atomically; every rank calls it) and return its directory."""
        return self._saved(self.state.save(metrics))

    def load_checkpoint(self, path: str | Path) -> Any:
        """Restore the run from checkpoint ``path`` (either format; see :class:`fusedit.train.state.RunState`)."""
        return self.state.load(Path(path))

    def export_final(self) -> Path:
        """Write ``run_dir/final`` (every rank calls it; rank 0 writes)."""
        return self._saved(self.state.export_final())

    def _saved(self, directory: Path) -> Path:
        if self.after_save is not None and self.plan.env.is_main:
            self.after_save(directory)
        return directory

    # ------------------------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------------------------

    def _seed_everything(self) -> None:
        seed = self.cfg.seed + self.plan.env.rank
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _sample(self, log: TrainLogger | SilentLog) -> None:
        prompts = list(self.cfg.sample_prompts) or list(getattr(self.data.dataset, "sample_prompts", None) or [])
        if not prompts or self.sample_fn is None or not self.plan.samples_on_this_rank:
            return
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        was_training = self.model.training
        with torch.random.fork_rng(devices=devices):
            self.model.eval()
            try:
                images = self.sample_fn(prompts, self.step)
            finally:
                self.model.train(was_training)
        if self.plan.env.is_main:
            path = log.log_image(self.step, "grid", images)
            log.info(f"step {self.step}: samples saved to {path}")

    def _metrics(self, losses: list[float], grad_norm: float, seconds: float) -> dict[str, float]:
        metrics: dict[str, float] = {
            "loss": sum(losses) / len(losses),
            "lr": float(self.lr_scheduler.get_last_lr()[0]),
            "grad_norm": grad_norm,
            "img_per_s": len(losses) * self.cfg.batch_size / max(seconds, 1e-9),
        }
        if self.data.epoch is not None:
            metrics["epoch"] = self.data.epoch
        skipped = self.data.skipped()
        if skipped is not None:
            metrics["data_skipped"] = skipped
        return metrics

    def _open_log(self) -> TrainLogger | SilentLog:
        if not self.plan.env.is_main:
            return SilentLog()
        return TrainLogger(
            self.run_dir, self.cfg.max_steps, self.step, progress=self.progress, tensorboard=self.tensorboard
        )

    def _train_until_done(self, log: TrainLogger | SilentLog, summary: TrainSummary) -> None:
        cfg = self.cfg
        self.model.train()
        data = self.data.batches()
        window_start, window_losses, grad_norm = time.perf_counter(), [], 0.0
        while self.step < cfg.max_steps:
            if note := self.text_phases.note(self.step, started_at=summary.start_step):
                log.info(note)
            loss, grad_norm = self.optimizer_step(data)
            summary.losses[self.step] = loss
            window_losses.append(loss)
            log.advance()
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                log.log(self.step, self._metrics(window_losses, grad_norm, time.perf_counter() - window_start))
                window_start, window_losses = time.perf_counter(), []
            if cfg.sample_every > 0 and self.step % cfg.sample_every == 0:
                self._sample(log)
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps:
                self.save_checkpoint({"loss": loss, "grad_norm": grad_norm})

    def fit(self) -> TrainSummary:
        """Train until ``train.max_steps`` (resuming first, see the constructor), checkpoint the last step and
        export ``run_dir/final``. Returns a :class:`TrainSummary`.

        The run directory is locked meanwhile (:mod:`fusedit.rundir.lock`; rank 0 holds it for the process group):
        a second trainer on it fails with :class:`~fusedit.rundir.lock.RunDirLockedError`."""
        with hold_run_dir(self.run_dir, enabled=self.plan.env.is_main):
            return self._fit()

    def _fit(self) -> TrainSummary:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._seed_everything()
        resumed_from = self.state.resume(self.resume_from, self.resume, dataclasses.asdict(self.cfg))
        if self.on_started is not None and self.plan.env.is_main:
            self.on_started(self.step)
        log = self._open_log()
        try:
            for note in self.notes:
                log.info(note)
            self.notes.clear()
            env = self.plan.env
            if self.plan.distributed:
                log.info(
                    f"{self.plan.mode}: {env.world_size} processes, {self.data.micro_batch} samples per process "
                    f"and micro-batch, {self.cfg.gradient_accumulation_steps} micro-batch(es) per step"
                )
            summary = TrainSummary(start_step=self.step, step=self.step, resumed_from=resumed_from)
            if self.step >= self.cfg.max_steps:
                log.info(f"nothing to do: step {self.step} >= train.max_steps {self.cfg.max_steps}")
            started = time.perf_counter()
            self._train_until_done(log, summary)
            if self.last_checkpoint is None or self.last_checkpoint.name != step_name(self.step):
                self.save_checkpoint()
            summary.step, summary.last_checkpoint = self.step, self.last_checkpoint
            summary.final_dir = self.export_final()
            steps_run = self.step - summary.start_step
            summary.images_per_second = (
                steps_run * self.cfg.batch_size / (time.perf_counter() - started) if steps_run else 0.0
            )
            skipped = self.data.skipped()
            if skipped:
                log.info(f"{int(skipped)} corrupt or unreadable sample(s) were skipped")
            log.info(f"done: step {self.step}, final weights in {summary.final_dir}")
            return summary
        finally:
            log.close()
