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
  the weight files under the prefix ``llm.``.
* ``dataset``: map-style, item ``{"image": (C, H, W) float tensor, "caption": str}``. Optional ``codec`` with
  ``encode(images (B, 3, H, W) in [-1, 1]) -> latents``, applied on the fly under ``no_grad``.
* ``sample_fn(prompts, step) -> images (N, 3, H, W) in [-1, 1]``: called every ``train.sample_every`` steps (model in
  eval mode, global RNG forked so training randomness is untouched); the grid goes to ``run_dir/samples/``.
  Prompts: ``train.sample_prompts``, else the dataset's ``sample_prompts`` attribute if it has one.

Outputs in ``run_dir`` (see also :mod:`fusedit.train.checkpoint` and :mod:`fusedit.train.logging`):

* ``checkpoints/step-XXXXXX/`` every ``train.checkpoint_every`` steps and at the last step; ``checkpoints/latest``.
* ``final/``: what the pipeline loads — ``model.safetensors`` (the model's trainable parameters under their
  ``model.state_dict()`` names, float32; plus ``llm.*`` if the LLM was trained), ``ema.safetensors`` (same keys,
  when EMA is on) and ``config.yaml`` (the ExperimentConfig as a plain mapping, loadable with
  ``fusedit.experiment.load_experiment``; only a ``train:`` section when the Trainer was given a TrainConfig).
  Load into a model built from the config with :func:`load_trainable_weights`.
* ``metrics.jsonl``, ``logs/`` (TensorBoard), ``samples/``.

Randomness and resume: the data order is a seeded permutation per epoch (``randperm`` seeded by
``(train.seed, epoch)``), consumed as one stream; the position is the number of samples consumed. σ, noise and
caption dropout come from trainer-owned ``torch.Generator`` objects. Their states, the global RNGs, the optimizer,
the LR scheduler, the EMA and the data position are checkpointed, so a resumed run continues exactly as the
uninterrupted one would (bit-exact on CPU).
"""
from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fusedit.flow import FlowMatchSchedule, flow_matching_loss, interpolate, loss_weighting, velocity_target
from fusedit.train.checkpoint import (
    Checkpoint,
    capture_rng_state,
    find_latest,
    load_checkpoint,
    remove_stale_temporaries,
    restore_rng_state,
    save_checkpoint,
    step_name,
    write_weights_dir,
)
from fusedit.train.config import TrainConfig
from fusedit.train.ema import EMA
from fusedit.train.errors import CheckpointError, NonFiniteLossError
from fusedit.train.logging import TrainLogger
from fusedit.train.schedules import build_lr_scheduler

LLM_PREFIX = "llm."
FINAL_DIR = "final"
SampleFn = Callable[[list[str], int], torch.Tensor]


# --------------------------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------------------------


def trainable_named_parameters(model: nn.Module, text_encoder: Any = None) -> dict[str, nn.Parameter]:
    """The parameters the trainer optimises: the model's with ``requires_grad`` (``named_parameters`` names) and,
    if ``text_encoder.trainable``, its ``trainable_parameters()`` under ``llm.<name>``."""
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if text_encoder is not None and getattr(text_encoder, "trainable", False):
        if not hasattr(text_encoder, "named_parameters"):
            raise TypeError(f"a trainable text encoder must have named_parameters() (e.g. be an nn.Module) so its "
                            f"weights can be saved under '{LLM_PREFIX}'; {type(text_encoder).__name__} has not")
        wanted = {id(p) for p in text_encoder.trainable_parameters()}
        llm = {LLM_PREFIX + name: p for name, p in text_encoder.named_parameters() if id(p) in wanted}
        if len(llm) != len(wanted):
            raise ValueError(f"text_encoder.trainable_parameters() yields {len(wanted)} parameters but only {len(llm)} "
                             f"of them appear in text_encoder.named_parameters()")
        if not llm:
            raise ValueError("text_encoder.trainable is True but trainable_parameters() is empty")
        named.update(llm)
    if not named:
        raise ValueError("nothing to train: the model has no parameter with requires_grad=True")
    return named


@torch.no_grad()
def load_trainable_weights(params: Mapping[str, nn.Parameter], weights: Mapping[str, torch.Tensor],
                           source: str = "weights") -> None:
    """Copy ``weights`` into ``params`` (``{name: parameter}``); names and shapes must match exactly.

    For a pipeline: ``load_trainable_weights(dict(model.named_parameters()) restricted to trainable ones, ...)``, or
    simply ``{n: p for n, p in model.named_parameters() if n in weights}`` after checking coverage.
    Raises :class:`CheckpointError` naming ``source`` on any mismatch.
    """
    missing = sorted(set(params) - set(weights))
    unexpected = sorted(set(weights) - set(params))
    if missing or unexpected:
        raise CheckpointError(f"{source}: weights do not match the trainable parameters: missing {missing[:5]}"
                              f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                              f"{'...' if len(unexpected) > 5 else ''}")
    for name, p in params.items():
        if weights[name].shape != p.shape:
            raise CheckpointError(f"{source}: {name!r} has shape {tuple(weights[name].shape)}, the model expects "
                                  f"{tuple(p.shape)}")
        p.copy_(weights[name])


# --------------------------------------------------------------------------------------------------------------------
# Data order
# --------------------------------------------------------------------------------------------------------------------


def epoch_permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of ``epoch``: ``randperm(num_items)`` from a generator seeded by ``(seed, epoch)``."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_items, generator=generator)


class ResumableBatchSampler(torch.utils.data.Sampler):
    """An endless stream of index batches: epoch permutations concatenated, starting after ``start`` samples.

    Batches may straddle epochs (nothing is dropped). Position after ``k`` batches: ``start + k·batch_size``.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, start: int = 0) -> None:
        if num_items <= 0:
            raise ValueError("the dataset is empty")
        self.num_items, self.batch_size, self.seed, self.start = num_items, batch_size, seed, start

    def __iter__(self) -> Iterator[list[int]]:
        epoch, index = divmod(self.start, self.num_items)
        order = epoch_permutation(self.num_items, self.seed, epoch)
        while True:
            batch = []
            while len(batch) < self.batch_size:
                if index == self.num_items:
                    epoch, index = epoch + 1, 0
                    order = epoch_permutation(self.num_items, self.seed, epoch)
                take = min(self.batch_size - len(batch), self.num_items - index)
                batch += order[index:index + take].tolist()
                index += take
            yield batch


def collate_image_caption(items: Sequence[Mapping[str, Any]]) -> tuple[torch.Tensor, list[str]]:
    """Stack dataset items ``{"image": (C, H, W), "caption": str}`` into ``(images (B, C, H, W), captions)``."""
    for item in items:
        if not isinstance(item, Mapping) or "image" not in item or "caption" not in item:
            keys = sorted(item) if isinstance(item, Mapping) else type(item).__name__
            raise TypeError(f"dataset items must be mappings with 'image' and 'caption', got {keys}")
        if not isinstance(item["caption"], str):
            raise TypeError(f"dataset item 'caption' must be a str, got {type(item['caption']).__name__}")
    return torch.stack([torch.as_tensor(item["image"]) for item in items]), [item["caption"] for item in items]


# --------------------------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------------------------


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
    last_checkpoint: Optional[Path] = None
    final_dir: Optional[Path] = None
    resumed_from: Optional[Path] = None
    images_per_second: float = 0.0


class Trainer:
    """Trains ``model`` (and optionally the text encoder) with the rectified-flow objective of :mod:`fusedit.flow`.

    Args:
        config: an ``ExperimentConfig`` (its ``train`` section is used, the rest is saved with the weights) or a
            :class:`TrainConfig`.
        model, text_encoder, dataset, codec, sample_fn: see the module docstring.
        run_dir: the run directory (created).
        device: where the model trains; the text encoder and codec place their outputs themselves.
        resume: resume from ``run_dir/checkpoints/latest`` if it exists.
        resume_from: resume from this checkpoint directory instead (an error if it cannot be loaded).
        num_workers: DataLoader workers (default: ``config.data.num_workers`` for an ExperimentConfig, else 0).
        progress, tensorboard: console bar / TensorBoard on or off.
    """

    def __init__(
        self,
        config: Any,
        model: nn.Module,
        text_encoder: Any,
        dataset: Dataset,
        *,
        run_dir: Union[str, Path],
        codec: Any = None,
        sample_fn: Optional[SampleFn] = None,
        device: Union[str, torch.device] = "cpu",
        resume: bool = True,
        resume_from: Union[str, Path, None] = None,
        num_workers: Optional[int] = None,
        progress: bool = True,
        tensorboard: bool = True,
    ) -> None:
        if isinstance(config, TrainConfig):
            self.experiment, self.cfg = None, config
        elif isinstance(getattr(config, "train", None), TrainConfig):
            self.experiment, self.cfg = config, config.train
        else:
            raise TypeError(f"Trainer config must be an ExperimentConfig (with a .train TrainConfig) or a TrainConfig, "
                            f"got {type(config).__name__}")
        self.cfg.validate()
        if self.cfg.distributed != "none":
            raise ValueError(f"train.distributed={self.cfg.distributed!r}: this Trainer runs one process; "
                             f"use train.distributed=none (multi-GPU launch lives in fusedit.dist)")
        if not hasattr(text_encoder, "encode"):
            raise TypeError(f"text_encoder must have encode(prompts) -> context; got {type(text_encoder).__name__}")

        self.run_dir = Path(run_dir)
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.text_encoder = text_encoder
        self.dataset = dataset
        self.codec = codec
        self.sample_fn = sample_fn
        self.resume = resume
        self.resume_from = Path(resume_from) if resume_from is not None else None
        self.progress, self.tensorboard = progress, tensorboard
        if num_workers is None:
            num_workers = getattr(getattr(self.experiment, "data", None), "num_workers", 0)
        self.num_workers = num_workers

        cfg = self.cfg
        self.micro_batch_size = cfg.batch_size // cfg.gradient_accumulation_steps
        self.use_bf16 = cfg.mixed_precision == "bf16" and self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        self._notes: list[str] = []
        if cfg.mixed_precision == "bf16" and not self.use_bf16:
            self._notes.append(f"train.mixed_precision=bf16 is not supported on device {self.device}; training in "
                               f"float32")

        if cfg.activation_checkpointing:
            enable = getattr(model, "enable_activation_checkpointing", None)
            if enable is None:
                raise ValueError(f"train.activation_checkpointing=true but {type(model).__name__} has no "
                                 f"enable_activation_checkpointing() method")
            enable()
        self.forward_model = torch.compile(model) if cfg.compile else model

        self.params = trainable_named_parameters(model, text_encoder)
        self.optimizer = torch.optim.AdamW(
            list(self.params.values()), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
            weight_decay=cfg.weight_decay, fused=True if cfg.fused_adamw else None)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg.lr_schedule, lr=cfg.lr,
                                               warmup_steps=cfg.warmup_steps, total_steps=cfg.max_steps,
                                               min_lr=cfg.min_lr)
        self.ema = EMA(self.params, cfg.ema_decay) if cfg.ema_every > 0 else None
        self.schedule = FlowMatchSchedule(shift=cfg.shift)

        self.generators = {
            "sigma": torch.Generator().manual_seed(cfg.seed + 1),
            "caption_dropout": torch.Generator().manual_seed(cfg.seed + 2),
            "noise": torch.Generator(device=self.device).manual_seed(cfg.seed + 3),
        }
        self.step = 0
        self.samples_seen = 0
        self.last_checkpoint: Optional[Path] = None

    # ------------------------------------------------------------------------------------------------------------
    # the training step (one function for every model)
    # ------------------------------------------------------------------------------------------------------------

    def drop_captions(self, captions: list[str]) -> list[str]:
        """Replace each caption by ``""`` with probability ``train.caption_dropout`` (trainer-owned generator)."""
        drop = torch.rand(len(captions), generator=self.generators["caption_dropout"]) < self.cfg.caption_dropout
        return ["" if d else c for c, d in zip(captions, drop.tolist())]

    def compute_loss(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Flow-matching loss of one micro-batch: ``images`` ``(B, C, H, W)`` (pixels or latents), ``B`` captions.

        Encodes (codec, text), draws σ and ε, runs the model on ``x_σ`` and returns the scalar float32 loss.
        """
        cfg = self.cfg
        images = images.to(self.device, non_blocking=True)
        with torch.no_grad():
            x0 = (self.codec.encode(images) if self.codec is not None else images).float()
        batch = x0.shape[0]
        sigmas = self.schedule.sample_sigmas(batch, self.generators["sigma"], method=cfg.time_sampling,
                                             logit_mean=cfg.logit_mean, logit_std=cfg.logit_std,
                                             mode_scale=cfg.mode_scale).to(self.device)
        noise = torch.randn(x0.shape, generator=self.generators["noise"], device=self.device, dtype=x0.dtype)
        captions = self.drop_captions(captions)
        x_t = interpolate(x0, noise, sigmas)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            if getattr(self.text_encoder, "trainable", False):
                context = self.text_encoder.encode(captions)
            else:
                with torch.no_grad():
                    context = self.text_encoder.encode(captions)
            pred = self.forward_model(x_t, self.schedule.timesteps_for(sigmas), context)
        if pred.shape != x0.shape:
            raise ValueError(f"the model returned {tuple(pred.shape)} for inputs of shape {tuple(x0.shape)}; it must "
                             f"predict a velocity of the input's shape")
        return flow_matching_loss(pred, velocity_target(x0, noise), loss_weighting(sigmas, cfg.loss_weighting))

    def optimizer_step(self, micro_batches: Iterator[tuple[torch.Tensor, list[str]]]) -> tuple[float, float]:
        """One optimiser step over ``gradient_accumulation_steps`` micro-batches; returns (mean loss, grad norm).

        Raises :class:`NonFiniteLossError` before touching the weights if the loss or gradient norm is not finite.
        """
        cfg = self.cfg
        accumulation = cfg.gradient_accumulation_steps
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for _ in range(accumulation):
            images, captions = next(micro_batches)
            loss = self.compute_loss(images, captions)
            (loss / accumulation).backward()
            total += loss.detach()
            self.samples_seen += len(captions)
        loss = total / accumulation
        params = [p for p in self.params.values() if p.grad is not None]
        if cfg.grad_clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        loss_value, norm_value = loss.item(), float(grad_norm)
        step = self.step + 1
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            what = "loss" if not math.isfinite(loss_value) else "gradient norm"
            raise NonFiniteLossError(
                f"non-finite {what} at step {step} (loss {loss_value}, grad norm {norm_value}); the weights were not "
                f"updated. Last good checkpoint: {self.last_checkpoint or 'none (no checkpoint written yet)'}",
                step=step, last_checkpoint=self.last_checkpoint)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.step = step
        if self.ema is not None and step % cfg.ema_every == 0:
            self.ema.update()
        return loss_value, norm_value

    # ------------------------------------------------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------------------------------------------------

    def _config_dict(self) -> dict[str, Any]:
        if self.experiment is not None and dataclasses.is_dataclass(self.experiment):
            return dataclasses.asdict(self.experiment)
        return {"train": dataclasses.asdict(self.cfg)}

    def save_checkpoint(self, metrics: Optional[Mapping[str, float]] = None) -> Path:
        """Write the checkpoint of the current step (atomically) and return its directory."""
        state = {
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "data": {"samples_seen": self.samples_seen, "num_items": len(self.dataset),
                     "epoch": self.samples_seen // len(self.dataset), "index": self.samples_seen % len(self.dataset)},
            "config": self._config_dict(),
            "metrics": dict(metrics or {}),
        }
        self.last_checkpoint = save_checkpoint(
            self.run_dir, self.step, model={n: p.detach() for n, p in self.params.items()},
            ema=self.ema.state_dict() if self.ema is not None else None, optimizer=self.optimizer.state_dict(),
            state=state, rng=capture_rng_state(self.generators), keep=self.cfg.keep_checkpoints)
        return self.last_checkpoint

    def load_checkpoint(self, path: Union[str, Path]) -> Checkpoint:
        """Restore weights, EMA, optimizer, LR scheduler, data position, RNGs and step from ``path``."""
        checkpoint = load_checkpoint(path)
        load_trainable_weights(self.params, checkpoint.model, source=str(Path(path) / "model.safetensors"))
        if self.ema is not None:
            if checkpoint.ema is None:
                raise CheckpointError(f"{path}: EMA is enabled (train.ema_every={self.cfg.ema_every}) but the "
                                      f"checkpoint has no ema.safetensors")
            self.ema.load_state_dict(checkpoint.ema)
        try:
            self.optimizer.load_state_dict(checkpoint.optimizer)
            self.lr_scheduler.load_state_dict(checkpoint.state["lr_scheduler"])
            data = checkpoint.state["data"]
        except (KeyError, ValueError) as error:
            raise CheckpointError(f"{path}: optimizer/scheduler/data state does not fit this run ({error})") from None
        if data["num_items"] != len(self.dataset):
            raise CheckpointError(f"{path}: saved with a dataset of {data['num_items']} items, this one has "
                                  f"{len(self.dataset)}; the data position cannot be resumed")
        restore_rng_state(checkpoint.rng, self.generators)
        self.samples_seen = data["samples_seen"]
        self.step = checkpoint.step
        self.last_checkpoint = checkpoint.path
        return checkpoint

    def export_final(self) -> Path:
        """Write ``run_dir/final`` (weights, EMA weights, config.yaml; see the module docstring)."""
        files: dict[str, Any] = {"model.safetensors": {n: p.detach().float() for n, p in self.params.items()}}
        if self.ema is not None:
            files["ema.safetensors"] = self.ema.state_dict()
        files["config.yaml"] = yaml.safe_dump(self._config_dict(), sort_keys=False)
        target = self.run_dir / FINAL_DIR
        write_weights_dir(target, files)
        return target

    # ------------------------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------------------------

    def _seed_everything(self) -> None:
        seed = self.cfg.seed
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _resume(self) -> Optional[Path]:
        """Load the checkpoint to resume from (explicit, else ``latest`` if ``resume``); notes go to ``_notes``."""
        remove_stale_temporaries(self.run_dir)
        path = self.resume_from
        if path is None and self.resume:
            path = find_latest(self.run_dir)
        if path is None:
            return None
        checkpoint = self.load_checkpoint(path)
        saved = checkpoint.state.get("config", {}).get("train", {})
        changed = sorted(k for k, v in dataclasses.asdict(self.cfg).items() if k in saved and saved[k] != v)
        if changed:
            self._notes.append("resuming with changed train settings: " + ", ".join(
                f"{k}: {saved[k]!r} -> {getattr(self.cfg, k)!r}" for k in changed))
        self._notes.append(f"resumed from {checkpoint.path} (step {self.step}, {self.samples_seen} samples seen)")
        return checkpoint.path

    def _sample_prompts(self) -> list[str]:
        return list(self.cfg.sample_prompts) or list(getattr(self.dataset, "sample_prompts", None) or [])

    def _sample(self, log: TrainLogger) -> None:
        prompts = self._sample_prompts()
        if not prompts:
            return
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        was_training = self.model.training
        with torch.random.fork_rng(devices=devices):
            self.model.eval()
            try:
                images = self.sample_fn(prompts, self.step)
            finally:
                self.model.train(was_training)
        path = log.log_image(self.step, "grid", images)
        log.info(f"step {self.step}: samples saved to {path}")

    def _data_iterator(self) -> Iterator[tuple[torch.Tensor, list[str]]]:
        sampler = ResumableBatchSampler(len(self.dataset), self.micro_batch_size, self.cfg.seed, self.samples_seen)
        loader = DataLoader(self.dataset, batch_sampler=sampler, collate_fn=collate_image_caption,
                            num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
                            persistent_workers=False,
                            # its own generator: creating the iterator must not draw from the global RNG
                            generator=torch.Generator().manual_seed(self.cfg.seed + self.samples_seen))
        return iter(loader)

    def fit(self) -> TrainSummary:
        """Train until ``train.max_steps`` (resuming first, see the constructor), checkpoint the last step and
        export ``run_dir/final``. Returns a :class:`TrainSummary`."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._seed_everything()
        resumed_from = self._resume()
        log = TrainLogger(self.run_dir, cfg.max_steps, self.step, progress=self.progress,
                          tensorboard=self.tensorboard)
        try:
            for note in self._notes:
                log.info(note)
            self._notes.clear()
            summary = TrainSummary(start_step=self.step, step=self.step, resumed_from=resumed_from)
            if self.step >= cfg.max_steps:
                log.info(f"nothing to do: step {self.step} >= train.max_steps {cfg.max_steps}")
            self.model.train()
            data = self._data_iterator()
            started, window_start, window_losses = time.perf_counter(), time.perf_counter(), []
            last_norm = 0.0
            while self.step < cfg.max_steps:
                loss, last_norm = self.optimizer_step(data)
                summary.losses[self.step] = loss
                window_losses.append(loss)
                log.advance()
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    elapsed = time.perf_counter() - window_start
                    log.log(self.step, {"loss": sum(window_losses) / len(window_losses),
                                        "lr": self.lr_scheduler.get_last_lr()[0], "grad_norm": last_norm,
                                        "img_per_s": len(window_losses) * cfg.batch_size / max(elapsed, 1e-9),
                                        "epoch": self.samples_seen / len(self.dataset)})
                    window_start, window_losses = time.perf_counter(), []
                if self.sample_fn is not None and cfg.sample_every > 0 and self.step % cfg.sample_every == 0:
                    self._sample(log)
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps:
                    self.save_checkpoint({"loss": loss, "grad_norm": last_norm})
            steps_run = self.step - summary.start_step
            if self.last_checkpoint is None or self.last_checkpoint.name != step_name(self.step):
                self.save_checkpoint()
            summary.step = self.step
            summary.last_checkpoint = self.last_checkpoint
            summary.final_dir = self.export_final()
            elapsed = time.perf_counter() - started
            summary.images_per_second = steps_run * cfg.batch_size / elapsed if steps_run else 0.0
            log.info(f"done: step {self.step}, final weights in {summary.final_dir}")
            return summary
        finally:
            log.close()
