"""Launch a training run from an :class:`~fusedit.experiment.ExperimentConfig`: build the model, text encoder, codec
and data, then hand them to the :class:`~fusedit.train.trainer.Trainer` (what ``fusedit train`` does)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fusedit.builders import build_components, check_training_size, default_device, resolve_relative_paths
from fusedit.data.buckets import training_buckets
from fusedit.data.factory import build_dataset
from fusedit.dist.env import barrier, destroy_distributed, init_distributed, is_initialized
from fusedit.experiment import ExperimentConfig
from fusedit.finetune.setup import AdapterWriter, apply_finetune
from fusedit.rundir.config_guard import CONFIG_FILE, record_changes, write_config_once
from fusedit.rundir.lock import hold_run_dir
from fusedit.rundir.opening import open_run
from fusedit.sampling.pipeline import FuseDiTPipeline, make_scheduler
from fusedit.train.setup import TrainSummary
from fusedit.train.trainer import Trainer

logger = logging.getLogger(__name__)


def save_run_config(config: ExperimentConfig, run_dir: Path) -> Path:
    """Write ``run_dir/config.yaml`` (what ``fusedit sample``/``export``/``eval`` rebuild the model from) if the run
    has none: a run's config is written once (:mod:`fusedit.rundir.config_guard`)."""
    write_config_once(Path(run_dir), config)
    return Path(run_dir) / CONFIG_FILE


def make_sample_fn(pipeline: FuseDiTPipeline, config: ExperimentConfig, seed: int = 0):
    """``sample_fn(prompts, step) -> images (N, 3, H, W) in [-1, 1]`` for the trainer's sample grids (fixed seed)."""
    size = config.data.resolution

    def sample(prompts: list[str], step: int) -> torch.Tensor:
        generator = torch.Generator(device=pipeline.device).manual_seed(seed)
        out = pipeline(
            prompts,
            height=size,
            width=size,
            num_inference_steps=config.train.sample_steps,
            guidance_scale=config.train.sample_cfg,
            generator=generator,
            output_type="pt",
        )
        return out.images * 2 - 1

    return sample


def build_trainer(
    config: ExperimentConfig,
    run_dir: Path,
    *,
    device: torch.device,
    resume: bool,
    progress: bool,
    resume_from: Path | None = None,
) -> Trainer:
    """The :class:`Trainer` of ``config`` on ``device``: model, text encoder and codec built from the config (with
    the same initial weights in every process), the data set, and the pipeline that draws the sample grids."""
    torch.manual_seed(config.train.seed)  # the same initial weights in every process (and every run)
    parts = build_components(config, device=device)
    finetune = apply_finetune(config.finetune, parts.model, parts.text_encoder)  # init_from, LoRA adapters
    check_training_size(config, parts.codec)
    dataset = build_dataset(
        config.data, seed=config.train.seed, codec=parts.codec, buckets=training_buckets(config, parts.codec)
    )
    scheduler = make_scheduler(config.sample.shift)
    pipeline = FuseDiTPipeline(
        parts.model, parts.text_encoder, scheduler, parts.codec, defaults=config.sample, config=config
    )
    return Trainer(
        config,
        parts.model,
        parts.text_encoder,
        dataset,
        run_dir=run_dir,
        codec=parts.codec,
        sample_fn=make_sample_fn(pipeline, config),
        device=device,
        resume=resume,
        resume_from=resume_from,
        progress=progress,
        after_save=AdapterWriter(finetune.lora) if finetune.lora is not None else None,
    )


def train_run(
    config: ExperimentConfig,
    run_dir: str | Path,
    *,
    device: Any = None,
    resume: bool = True,
    progress: bool = True,
    resume_from: str | Path | None = None,
    allow_change: Sequence[str] = (),
) -> TrainSummary:
    """Train ``config`` in ``run_dir`` (resuming from its latest checkpoint) and return the ``TrainSummary``.

    The run directory is locked for the whole call (rank 0 holds the lock for the process group; a second trainer
    on it fails with :class:`~fusedit.rundir.lock.RunDirLockedError`). ``resume=False`` moves an existing run aside
    to ``<run_dir>.previous-<timestamp>``. A resume whose config differs from the run's is refused before anything
    is written unless every difference may change (:mod:`fusedit.rundir.config_guard`; ``allow_change``: the keys
    named with ``--allow-change``). ``resume_from``: a checkpoint directory to resume from instead of the newest
    intact one.

    With ``train.distributed`` ``ddp``/``fsdp`` this runs in every process started by torchrun: it initialises the
    process group from torchrun's environment (``device``: ``cuda``/``cpu`` or ``None`` = CUDA when available; each
    process takes ``cuda:LOCAL_RANK``), and tears it down at the end. Only rank 0 writes ``config.yaml``, logs,
    samples and ``final/``.
    """
    run_dir = Path(run_dir)
    # local LLM/tokenizer/VAE folders given relative to the working directory are recorded absolute, so that the
    # run loads (fusedit sample/eval/export) from any directory
    config = resolve_relative_paths(config, Path.cwd())
    created_group = False
    if config.train.distributed != "none":
        created_group = not is_initialized()
        env = init_distributed(device)
        device, is_main = env.device, env.is_main
    else:
        device, is_main = default_device(device), True
    try:
        with hold_run_dir(run_dir, enabled=is_main):
            opening = open_run(run_dir, config, resume=resume, allow_change=tuple(allow_change)) if is_main else None
            barrier()
            trainer = build_trainer(
                config,
                run_dir,
                device=device,
                resume=resume,
                progress=progress and is_main,
                resume_from=Path(resume_from) if resume_from is not None else None,
            )
            if opening is not None:
                trainer.on_started = lambda step: record_changes(run_dir, opening.changes, step, opening.allowed)
            summary = trainer.fit()
    finally:
        if created_group:
            destroy_distributed()
    dataset = trainer.data.dataset
    skipped = getattr(dataset, "skipped", None)
    if skipped and is_main:
        logger.warning(
            "%d unreadable or corrupt samples were skipped", skipped if isinstance(skipped, int) else len(skipped)
        )
    return summary
