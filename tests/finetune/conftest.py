"""Fine-tuning fixtures: a base model (the tiny demo model with random weights large enough that the output depends
on the text, saved as a diffusers pipeline folder) and helpers to train LoRA runs from it on CPU in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fusedit.experiment import ExperimentConfig, load_experiment
from fusedit.train.launch import build_trainer, save_run_config
from fusedit.train.trainer import Trainer
from tests.conftest import overrides_for
from tests.diffusers_native.conftest import tiny_pipeline

PROMPTS = ["a red circle to the left of a blue square", "two green triangles"]


@pytest.fixture(scope="module")
def base_folder(tiny_llm_dir, tmp_path_factory) -> Path:
    """The base model as an exported pipeline folder (diffusers' format)."""
    pipe = tiny_pipeline(tiny_llm_dir, overrides_for(tiny_llm_dir))
    path = tmp_path_factory.mktemp("base") / "pipeline"
    pipe.save_pretrained(path)
    return path


def lora_config(llm_dir: Path, base: Path, *extra: str) -> ExperimentConfig:
    """The tiny demo config fine-tuning ``base`` with rank-4 adapters at a high learning rate, so that four steps
    move the adapted model well away from the base (alpha 12: not peft's default 8, so a lost alpha shows)."""
    overrides = overrides_for(llm_dir) + [
        f"finetune.init_from={base}",
        "finetune.lora.rank=4",
        "finetune.lora.alpha=12",
        "train.lr=0.05",
        "train.warmup_steps=0",
        "train.caption_dropout=0.0",
    ]
    return load_experiment("demo", overrides + list(extra))


def train(config: ExperimentConfig, run_dir: Path) -> Trainer:
    save_run_config(config, run_dir)  # what train_run writes first, and loading a run reads
    trainer = build_trainer(config, run_dir, device=torch.device("cpu"), resume=True, progress=False)
    trainer.tensorboard = False
    trainer.fit()
    return trainer


def fixed_latents(n: int = len(PROMPTS)) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(7))


def sample(pipe, prompts=PROMPTS) -> torch.Tensor:
    """Final latents of ``pipe`` for ``prompts`` from fixed noise (3 Euler steps, CFG 3)."""
    out = pipe(
        list(prompts),
        height=16,
        width=16,
        num_inference_steps=3,
        guidance_scale=3.0,
        latents=fixed_latents(len(prompts)),
        output_type="latent",
    )
    return out.images
