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
* ``dataset``: item ``{"image": (C, H, W) float tensor, "caption": str}``, either

  - map-style (``__len__``/``__getitem__``), read in the seeded permutation order below; a ``set_epoch(epoch)``
    method (``ImageFolderDataset``) is called with each item's epoch (inside the DataLoader workers), or
  - a resumable stream (``IterableDataset`` with ``state_dict``/``load_state_dict``/``mark_consumed``:
    :class:`~fusedit.data.webdataset.WebShardDataset`, :class:`~fusedit.data.latents.LatentShardDataset`): read in
    batches through a DataLoader, every batch taken is passed to ``mark_consumed`` (its ``stream_pos`` rows), and
    ``state_dict()`` is checkpointed (per rank) and restored before the iterator is created.

  Items with ``"is_latent": True`` are already latents (a latent cache): ``codec.encode`` is skipped. Otherwise an
  optional ``codec`` with ``encode(images (B, 3, H, W) in [-1, 1]) -> latents`` is applied under ``no_grad``.
  A data set's ``skipped`` count (corrupt samples) is logged as ``data_skipped``.
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

Distributed (``train.distributed: ddp | fsdp``, launched by torchrun; the process group must exist, see
:func:`fusedit.dist.init_distributed`): the global batch ``train.batch_size`` is split over the accumulation steps
and the ``W`` ranks (micro-batch ``batch_size / (accumulation·W)`` per rank). Map-style data: every rank walks the
same permutation stream in global micro-batches and takes its contiguous slice. Streams: shard-per-rank (the stream's
own split). σ, noise and caption dropout are drawn for the whole global micro-batch on every rank from the shared
generators and each rank keeps its slice, so a ``W``-process run computes the same losses as a 1-process run of the
same global batch (up to float reduction order). The logged loss is all-reduced. ``fsdp``: FSDP2 ``fully_shard`` per
block then the root (bf16 compute on CUDA); ``ddp``: ``DistributedDataParallel``; the text encoder is never
wrapped. Checkpoints are sharded (:mod:`fusedit.dist.checkpoint`) and resume on any number of processes; only rank
0 logs, writes samples and ``final/`` (under FSDP every rank runs ``sample_fn``, which needs all of them).
"""
from __future__ import annotations

import contextlib
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
from torch.utils.data import DataLoader, Dataset, IterableDataset

from fusedit.dist.checkpoint import (
    capture_local_rng,
    is_sharded_checkpoint,
    load_sharded_checkpoint,
    restore_local_rng,
    save_sharded_checkpoint,
)
from fusedit.dist.env import DistEnv, all_reduce, barrier, current_env, is_initialized
from fusedit.dist.parallelize import full_tensor, parallelize
from fusedit.flow import FlowMatchSchedule, flow_matching_loss, interpolate, loss_weighting, velocity_target
from fusedit.train.checkpoint import (
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
    With ``world_size > 1`` the stream is cut into global batches of ``batch_size`` and rank ``r`` yields the
    ``r``-th contiguous slice of ``batch_size / world_size`` indices of each. ``with_epoch``: yield
    ``(epoch, index)`` pairs (for :class:`EpochIndexed`) instead of indices.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, start: int = 0, *, rank: int = 0,
                 world_size: int = 1, with_epoch: bool = False) -> None:
        if num_items <= 0:
            raise ValueError("the dataset is empty")
        if batch_size % world_size:
            raise ValueError(f"global batch {batch_size} cannot be split over {world_size} ranks")
        self.num_items, self.batch_size, self.seed, self.start = num_items, batch_size, seed, start
        self.rank, self.world_size, self.with_epoch = rank, world_size, with_epoch

    def __iter__(self) -> Iterator[list]:
        epoch, index = divmod(self.start, self.num_items)
        order = epoch_permutation(self.num_items, self.seed, epoch)
        share = self.batch_size // self.world_size
        lo = self.rank * share
        while True:
            batch = []
            while len(batch) < self.batch_size:
                if index == self.num_items:
                    epoch, index = epoch + 1, 0
                    order = epoch_permutation(self.num_items, self.seed, epoch)
                take = min(self.batch_size - len(batch), self.num_items - index)
                chunk = order[index:index + take].tolist()
                batch += [(epoch, i) for i in chunk] if self.with_epoch else chunk
                index += take
            yield batch[lo:lo + share]


class EpochIndexed(Dataset):
    """A map-style data set read with ``(epoch, index)`` keys: calls ``dataset.set_epoch(epoch)`` when the epoch
    changes (in whichever process reads the item, so DataLoader workers see it too), then returns
    ``dataset[index]``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self._epoch: Optional[int] = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        if epoch != self._epoch:
            self.dataset.set_epoch(epoch)
            self._epoch = epoch
        return self.dataset[index]


@dataclass
class MicroBatch:
    """One rank's micro-batch: ``images`` ``(B, C, H, W)`` (pixels, or latents when ``is_latent``), ``captions`` and,
    for streams, ``stream_pos`` ``(B, 6)`` (see :mod:`fusedit.data.webdataset`)."""

    images: torch.Tensor
    captions: list[str]
    is_latent: bool = False
    stream_pos: Optional[torch.Tensor] = None


def collate_batch(items: Sequence[Mapping[str, Any]]) -> MicroBatch:
    """Stack dataset items ``{"image": (C, H, W), "caption": str[, "is_latent", "stream_pos"]}`` into a
    :class:`MicroBatch` (other keys are ignored)."""
    for item in items:
        if not isinstance(item, Mapping) or "image" not in item or "caption" not in item:
            keys = sorted(item) if isinstance(item, Mapping) else type(item).__name__
            raise TypeError(f"dataset items must be mappings with 'image' and 'caption', got {keys}")
        if not isinstance(item["caption"], str):
            raise TypeError(f"dataset item 'caption' must be a str, got {type(item['caption']).__name__}")
    latent = {bool(item.get("is_latent", False)) for item in items}
    if len(latent) > 1:
        raise ValueError("a batch mixes latent (is_latent=True) and pixel items; use one kind of data per run")
    has_pos = {"stream_pos" in item for item in items}
    if len(has_pos) > 1:
        raise ValueError("some items of a batch carry 'stream_pos' and others do not")
    return MicroBatch(images=torch.stack([torch.as_tensor(item["image"]) for item in items]),
                      captions=[item["caption"] for item in items], is_latent=latent == {True},
                      stream_pos=torch.stack([torch.as_tensor(item["stream_pos"]) for item in items])
                      if has_pos == {True} else None)


def collate_image_caption(items: Sequence[Mapping[str, Any]]) -> tuple[torch.Tensor, list[str]]:
    """Stack dataset items ``{"image": (C, H, W), "caption": str}`` into ``(images (B, C, H, W), captions)``."""
    batch = collate_batch(items)
    return batch.images, batch.captions


def is_resumable_stream(dataset: Any) -> bool:
    """Whether ``dataset`` is an ``IterableDataset`` the trainer can checkpoint (``state_dict``,
    ``load_state_dict``, ``mark_consumed``)."""
    return isinstance(dataset, IterableDataset) and all(
        callable(getattr(dataset, name, None)) for name in ("state_dict", "load_state_dict", "mark_consumed"))


class _SilentLog:
    """The logger of ranks other than 0: records nothing."""

    def info(self, message: str) -> None:
        pass

    def advance(self, steps: int = 1) -> None:
        pass

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


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
        device: where the model trains; the text encoder and codec place their outputs themselves. Distributed:
            this rank's device (``cuda:LOCAL_RANK`` or ``cpu``).
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
        cfg = self.cfg
        self.parallel = cfg.distributed
        if self.parallel not in ("none", "ddp", "fsdp"):
            raise ValueError(f"train.distributed: got {self.parallel!r}, expected none, ddp or fsdp")
        if self.parallel != "none" and not is_initialized():
            raise ValueError(f"train.distributed={self.parallel} needs a process group: launch with torchrun and "
                             f"call fusedit.dist.init_distributed() first (`fusedit train` does), or set "
                             f"train.distributed=none for one process")
        if not hasattr(text_encoder, "encode"):
            raise TypeError(f"text_encoder must have encode(prompts) -> context; got {type(text_encoder).__name__}")
        if self.parallel != "none" and getattr(text_encoder, "trainable", False):
            raise ValueError(f"train.distributed={self.parallel} with a trainable text encoder is not supported: the "
                             f"LLM is replicated outside DDP/FSDP; train it with train.distributed=none")

        self.run_dir = Path(run_dir)
        self.device = torch.device(device)
        self.env: DistEnv = current_env(self.device) if self.parallel != "none" else DistEnv(device=self.device)
        world = self.env.world_size
        accumulation = cfg.gradient_accumulation_steps
        if cfg.batch_size % (accumulation * world):
            raise ValueError(f"train.batch_size ({cfg.batch_size}) must be divisible by "
                             f"train.gradient_accumulation_steps ({accumulation}) x the number of processes ({world})")
        self.text_encoder = text_encoder
        self.dataset = dataset
        self.is_stream = isinstance(dataset, IterableDataset)
        if self.is_stream and not is_resumable_stream(dataset):
            raise TypeError(f"{type(dataset).__name__} is an IterableDataset without state_dict/load_state_dict/"
                            f"mark_consumed; the trainer needs a resumable stream (e.g. WebShardDataset, "
                            f"LatentShardDataset) or a map-style data set")
        if self.is_stream:
            split = (getattr(dataset, "rank", 0), getattr(dataset, "world_size", 1))
            if split != (self.env.rank, world):
                raise ValueError(f"the data stream was built for rank {split[0]} of {split[1]} but this process is "
                                 f"rank {self.env.rank} of {world}; build it after the process group exists (or pass "
                                 f"rank/world_size)")
        self.codec = codec
        self.sample_fn = sample_fn
        self.resume = resume
        self.resume_from = Path(resume_from) if resume_from is not None else None
        self.progress, self.tensorboard = progress, tensorboard
        if num_workers is None:
            num_workers = getattr(getattr(self.experiment, "data", None), "num_workers", 0)
        self.num_workers = num_workers

        #: samples per micro-batch over all ranks, and this rank's share of them
        self.global_micro_batch_size = cfg.batch_size // accumulation
        self.micro_batch_size = self.global_micro_batch_size // world
        self.use_bf16 = cfg.mixed_precision == "bf16" and self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        self._notes: list[str] = []
        if cfg.mixed_precision == "bf16" and not self.use_bf16:
            self._notes.append(f"train.mixed_precision=bf16 is not supported on device {self.device}; training in "
                               f"float32")

        self.model = model.to(self.device)
        if cfg.activation_checkpointing:
            enable = getattr(model, "enable_activation_checkpointing", None)
            if enable is None:
                raise ValueError(f"train.activation_checkpointing=true but {type(model).__name__} has no "
                                 f"enable_activation_checkpointing() method")
            enable()
        # DDP wraps the model; FSDP shards it in place (self.model then holds DTensor shards)
        self.train_module = parallelize(self.model, self.parallel, self.device, bf16=self.use_bf16)
        self.forward_model = torch.compile(self.train_module) if cfg.compile else self.train_module

        self.params = trainable_named_parameters(self.model, text_encoder)
        self.optimizer = torch.optim.AdamW(
            list(self.params.values()), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
            weight_decay=cfg.weight_decay, fused=True if cfg.fused_adamw else None)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg.lr_schedule, lr=cfg.lr,
                                               warmup_steps=cfg.warmup_steps, total_steps=cfg.max_steps,
                                               min_lr=cfg.min_lr)
        self.ema = EMA(self.params, cfg.ema_decay) if cfg.ema_every > 0 else None
        self.schedule = FlowMatchSchedule(shift=cfg.shift)

        # shared by all ranks (same seeds, same draws): each rank keeps its slice of every global draw
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

    def _rank_slice(self, size: int) -> tuple[int, slice]:
        """(global micro-batch size, this rank's slice of it) for a local micro-batch of ``size`` samples."""
        return size * self.env.world_size, slice(self.env.rank * size, (self.env.rank + 1) * size)

    def drop_captions(self, captions: list[str]) -> list[str]:
        """Replace each caption by ``""`` with probability ``train.caption_dropout`` (trainer-owned generator; drawn
        for the global micro-batch, this rank's slice kept)."""
        total, mine = self._rank_slice(len(captions))
        drop = torch.rand(total, generator=self.generators["caption_dropout"])[mine] < self.cfg.caption_dropout
        return ["" if d else c for c, d in zip(captions, drop.tolist())]

    def compute_loss(self, images: torch.Tensor, captions: list[str], is_latent: bool = False) -> torch.Tensor:
        """Flow-matching loss of this rank's micro-batch: ``images`` ``(B, C, H, W)`` (pixels, or latents when
        ``is_latent``), ``B`` captions.

        Encodes (codec unless ``is_latent``, text), draws σ and ε for the global micro-batch (keeping this rank's
        slice), runs the model on ``x_σ`` and returns the scalar float32 loss (mean over this rank's samples).
        """
        cfg = self.cfg
        images = images.to(self.device, non_blocking=True)
        with torch.no_grad():
            x0 = (self.codec.encode(images) if self.codec is not None and not is_latent else images).float()
        total, mine = self._rank_slice(x0.shape[0])
        sigmas = self.schedule.sample_sigmas(total, self.generators["sigma"], method=cfg.time_sampling,
                                             logit_mean=cfg.logit_mean, logit_std=cfg.logit_std,
                                             mode_scale=cfg.mode_scale,
                                             uniform_fraction=cfg.uniform_time_fraction)[mine].to(self.device)
        noise = torch.randn((total, *x0.shape[1:]), generator=self.generators["noise"], device=self.device,
                            dtype=x0.dtype)[mine]
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

    def _gradient_sync(self, enabled: bool):
        """Context of one micro-batch's backward: gradient reduction over ranks on (last micro-batch) or off."""
        if self.parallel == "ddp" and not enabled:
            return self.train_module.no_sync()
        if self.parallel == "fsdp":
            self.model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    def optimizer_step(self, micro_batches: Iterator[MicroBatch]) -> tuple[float, float]:
        """One optimiser step over ``gradient_accumulation_steps`` micro-batches; returns (mean loss over the global
        batch, grad norm).

        Raises :class:`NonFiniteLossError` before touching the weights if the loss or gradient norm is not finite.
        """
        cfg = self.cfg
        accumulation = cfg.gradient_accumulation_steps
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for index in range(accumulation):
            batch = next(micro_batches)
            if isinstance(batch, tuple):  # (images, captions) from a custom iterator
                batch = MicroBatch(*batch)
            with self._gradient_sync(index == accumulation - 1):
                loss = self.compute_loss(batch.images, batch.captions, batch.is_latent)
                (loss / accumulation).backward()
            total += loss.detach()
            self.samples_seen += len(batch.captions) * self.env.world_size
            if self.is_stream:
                if batch.stream_pos is None:
                    raise KeyError("the data stream's items carry no 'stream_pos'; its position cannot be tracked")
                self.dataset.mark_consumed({"stream_pos": batch.stream_pos})
        loss_value = all_reduce(total / accumulation, "mean", self.device) if self.env.distributed \
            else (total / accumulation).item()
        params = [p for p in self.params.values() if p.grad is not None]
        grad_norm = full_tensor(torch.nn.utils.get_total_norm([p.grad for p in params]))
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, grad_norm)
        norm_value = float(grad_norm)
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

    def _data_position(self) -> dict[str, Any]:
        """The global data position (``trainer_state.json``)."""
        if self.is_stream:
            return {"kind": "stream", "samples_seen": self.samples_seen}
        n = len(self.dataset)
        return {"kind": "map", "samples_seen": self.samples_seen, "num_items": n,
                "epoch": self.samples_seen // n, "index": self.samples_seen % n}

    def save_checkpoint(self, metrics: Optional[Mapping[str, float]] = None) -> Path:
        """Write the checkpoint of the current step (atomically; every rank calls it) and return its directory."""
        state = {
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "data": self._data_position(),
            "config": self._config_dict(),
            "metrics": dict(metrics or {}),
        }
        if self.parallel != "none":
            rank_state = {"rng": capture_local_rng(self.generators),
                          "data": self.dataset.state_dict() if self.is_stream else None}
            self.last_checkpoint = save_sharded_checkpoint(
                self.run_dir, self.step, model=self.model, optimizer=self.optimizer, state=state,
                rank_state=rank_state, env=self.env, ema=self.ema.state_dict() if self.ema is not None else None,
                keep=self.cfg.keep_checkpoints)
            return self.last_checkpoint
        if self.is_stream:
            state["data"]["stream"] = self.dataset.state_dict()
        self.last_checkpoint = save_checkpoint(
            self.run_dir, self.step, model={n: p.detach() for n, p in self.params.items()},
            ema=self.ema.state_dict() if self.ema is not None else None, optimizer=self.optimizer.state_dict(),
            state=state, rng=capture_rng_state(self.generators), keep=self.cfg.keep_checkpoints)
        return self.last_checkpoint

    def _check_data_position(self, path: Union[str, Path], data: Mapping[str, Any]) -> None:
        kind = data.get("kind", "map")
        mine = "stream" if self.is_stream else "map"
        if kind != mine:
            raise CheckpointError(f"{path}: saved while reading a {kind} data set, this run reads a {mine} data set; "
                                  f"the data position cannot be resumed")
        if kind == "map" and data["num_items"] != len(self.dataset):
            raise CheckpointError(f"{path}: saved with a dataset of {data['num_items']} items, this one has "
                                  f"{len(self.dataset)}; the data position cannot be resumed")

    def _load_stream_state(self, path: Union[str, Path], state: Any) -> None:
        try:
            self.dataset.load_state_dict(state)
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{path}: the saved data-stream position does not fit this data set ({error})") \
                from None

    def load_checkpoint(self, path: Union[str, Path]) -> Any:
        """Restore weights, EMA, optimizer, LR scheduler, data position, RNGs and step from ``path`` (a single-process
        or a sharded checkpoint; a sharded one loads with any number of processes)."""
        if is_sharded_checkpoint(path):
            return self._load_sharded_checkpoint(path)
        if self.parallel != "none":
            raise CheckpointError(f"{path} is a single-process checkpoint; a train.distributed={self.parallel} run "
                                  f"resumes sharded checkpoints only (finish it with train.distributed=none)")
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
        self._check_data_position(path, data)
        if self.is_stream:
            self._load_stream_state(path, data.get("stream"))
        restore_rng_state(checkpoint.rng, self.generators)
        self.samples_seen = data["samples_seen"]
        self.step = checkpoint.step
        self.last_checkpoint = checkpoint.path
        return checkpoint

    def _load_sharded_checkpoint(self, path: Union[str, Path]) -> Any:
        checkpoint = load_sharded_checkpoint(path, model=self.model, optimizer=self.optimizer,
                                             ema=self.ema.state_dict() if self.ema is not None else None)
        try:
            self.lr_scheduler.load_state_dict(checkpoint.state["lr_scheduler"])
            data = checkpoint.state["data"]
        except (KeyError, ValueError) as error:
            raise CheckpointError(f"{path}: scheduler/data state does not fit this run ({error})") from None
        self._check_data_position(path, data)
        saved, world, rank = checkpoint.world_size, self.env.world_size, self.env.rank
        if saved == world:
            mine = checkpoint.rank_states[rank]
            restore_local_rng(mine["rng"], self.generators)
            if self.is_stream:
                self._load_stream_state(path, mine["data"])
        else:
            # the shared generators are identical on every saved rank; the global RNGs (dropout, VAE sampling)
            # continue from rank (r mod saved)'s state
            restore_local_rng(checkpoint.rank_states[rank % saved]["rng"])
            restore_local_rng(checkpoint.rank_states[0]["rng"], self.generators)
            self._notes.append(f"the checkpoint was written by {saved} process(es), this run has {world}")
            if self.is_stream:
                self._restart_stream(path, [s["data"] for s in checkpoint.rank_states])
        self.samples_seen = data["samples_seen"]
        self.step = checkpoint.step
        self.last_checkpoint = checkpoint.path
        return checkpoint

    def _restart_stream(self, path: Union[str, Path], saved: list[Any]) -> None:
        """World size changed: the shard-per-rank split differs, so per-rank positions do not apply. Every rank
        restarts at the beginning of the first epoch no saved worker had started reading (the rest of the
        interrupted epoch is skipped; nothing is read twice); the skipped-sample count carries over on rank 0."""
        epoch, skipped = 0, 0
        for state in saved:
            for position in (state or {}).get("workers", {}).values():
                started = position["cursor"] > 0 or position["offset"] > 0
                epoch = max(epoch, position["epoch"] + (1 if started else 0))
                skipped += position.get("skipped", 0)
        workers = max(self.num_workers, 1)
        state = self.dataset.state_dict()
        state["num_workers"] = workers
        state["workers"] = {str(k): {"epoch": epoch, "cursor": 0, "offset": 0,
                                     "skipped": skipped if (k == 0 and self.env.is_main) else 0}
                            for k in range(workers)}
        self._load_stream_state(path, state)
        self._notes.append(f"data stream: the shard split changed with the number of processes; restarting at the "
                           f"beginning of epoch {epoch} (the rest of the interrupted epoch is skipped)")

    def _gather_full(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Whole float32 CPU copies of (possibly sharded) tensors; a collective under FSDP (rank 0 keeps them)."""
        out = {}
        for name, tensor in tensors.items():
            whole = full_tensor(tensor.detach())
            if self.env.is_main:
                out[name] = whole.float().cpu()
        return out

    def export_final(self) -> Path:
        """Write ``run_dir/final`` (weights, EMA weights, config.yaml; see the module docstring). Every rank calls
        it; rank 0 writes."""
        target = self.run_dir / FINAL_DIR
        files: dict[str, Any] = {"model.safetensors": self._gather_full(self.params)}
        if self.ema is not None:
            files["ema.safetensors"] = self._gather_full(self.ema.state_dict())
        if self.env.is_main:
            files["config.yaml"] = yaml.safe_dump(self._config_dict(), sort_keys=False)
            write_weights_dir(target, files)
        barrier()
        return target

    # ------------------------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------------------------

    def _seed_everything(self) -> None:
        seed = self.cfg.seed + self.env.rank
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _resume(self) -> Optional[Path]:
        """Load the checkpoint to resume from (explicit, else ``latest`` if ``resume``); notes go to ``_notes``."""
        if self.env.is_main:
            remove_stale_temporaries(self.run_dir)
        barrier()
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

    def _sample(self, log: Any) -> None:
        prompts = self._sample_prompts()
        if not prompts:
            return
        if not self.env.is_main and self.parallel != "fsdp":  # FSDP: every rank takes part in the forward passes
            return
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        was_training = self.model.training
        with torch.random.fork_rng(devices=devices):
            self.model.eval()
            try:
                images = self.sample_fn(prompts, self.step)
            finally:
                self.model.train(was_training)
        if self.env.is_main:
            path = log.log_image(self.step, "grid", images)
            log.info(f"step {self.step}: samples saved to {path}")

    def _data_skipped(self) -> Optional[float]:
        """Corrupt samples skipped so far (streams: summed over ranks; map-style: the largest rank count)."""
        skipped = getattr(self.dataset, "skipped", None)
        if not isinstance(skipped, int):
            return None
        if not self.env.distributed:
            return float(skipped)
        return all_reduce(skipped, "sum" if self.is_stream else "max", self.device)

    def _data_iterator(self) -> Iterator[MicroBatch]:
        generator = torch.Generator().manual_seed(self.cfg.seed + self.samples_seen)  # iterator creation must not
        pin = self.device.type == "cuda"                                                # draw from the global RNG
        if self.is_stream:
            loader = DataLoader(self.dataset, batch_size=self.micro_batch_size, collate_fn=collate_batch,
                                num_workers=self.num_workers, pin_memory=pin, persistent_workers=False,
                                generator=generator)
            return _endless(loader)
        with_epoch = callable(getattr(self.dataset, "set_epoch", None))
        sampler = ResumableBatchSampler(len(self.dataset), self.global_micro_batch_size, self.cfg.seed,
                                        self.samples_seen, rank=self.env.rank, world_size=self.env.world_size,
                                        with_epoch=with_epoch)
        source = EpochIndexed(self.dataset) if with_epoch else self.dataset
        loader = DataLoader(source, batch_sampler=sampler, collate_fn=collate_batch, num_workers=self.num_workers,
                            pin_memory=pin, persistent_workers=False, generator=generator)
        return iter(loader)

    def fit(self) -> TrainSummary:
        """Train until ``train.max_steps`` (resuming first, see the constructor), checkpoint the last step and
        export ``run_dir/final``. Returns a :class:`TrainSummary`."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._seed_everything()
        resumed_from = self._resume()
        log = TrainLogger(self.run_dir, cfg.max_steps, self.step, progress=self.progress,
                          tensorboard=self.tensorboard) if self.env.is_main else _SilentLog()
        try:
            for note in self._notes:
                log.info(note)
            self._notes.clear()
            if self.env.distributed:
                log.info(f"{self.parallel}: {self.env.world_size} processes, {self.micro_batch_size} samples per "
                         f"process and micro-batch, {cfg.gradient_accumulation_steps} micro-batch(es) per step")
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
                    metrics = {"loss": sum(window_losses) / len(window_losses),
                               "lr": self.lr_scheduler.get_last_lr()[0], "grad_norm": last_norm,
                               "img_per_s": len(window_losses) * cfg.batch_size / max(elapsed, 1e-9)}
                    if not self.is_stream:
                        metrics["epoch"] = self.samples_seen / len(self.dataset)
                    skipped = self._data_skipped()
                    if skipped is not None:
                        metrics["data_skipped"] = skipped
                    log.log(self.step, metrics)
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
            skipped = self._data_skipped()
            if skipped:
                log.info(f"{int(skipped)} corrupt or unreadable sample(s) were skipped")
            log.info(f"done: step {self.step}, final weights in {summary.final_dir}")
            return summary
        finally:
            log.close()


def _endless(loader: DataLoader) -> Iterator[MicroBatch]:
    """The batches of a stream's DataLoader; a clear error if the stream ends before training does."""
    yield from loader
    raise RuntimeError("the training data stream ended before train.max_steps; build shard streams with epochs=None "
                       "(repeat forever) for training")
