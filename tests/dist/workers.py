"""Multi-process helpers of the distributed tests: spawn ``world_size`` CPU processes (gloo) that run a Trainer on
the real DiT (a tiny deep-fusion config) with the tiny Gemma 2 LLM as its text encoder.

Each child gets torchrun's environment variables and calls :func:`fusedit.dist.env.init_distributed`, so the launch
path is the one torchrun uses.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from fusedit.data.webdataset import WebShardDataset
from fusedit.dist.env import destroy_distributed, init_distributed
from fusedit.models.config import LLMGeometry, ModelConfig
from fusedit.models.dit import build_model
from fusedit.text.config import TextConfig
from fusedit.text.encoder import TextEncoder
from fusedit.text.llm import load_llm_config
from fusedit.train.config import TrainConfig
from fusedit.train.trainer import Trainer

from tests.train.fakes import ImageCaptionDataset

#: The DiT of these tests: deep fusion over both LLM layers plus one DiT-only layer (three blocks for FSDP to shard
#: one by one), 2D RoPE, 8 px pixel-space images in 16 tokens.
MODEL = ModelConfig(fusion="deep", attention="self", pos_embed="2d-rope", timestep_conditioning="none",
                    in_channels=3, patch_size=2, sample_size=8, pos_embed_max_size=8, dit_hidden_size=32,
                    dit_intermediate_size=48, dit_num_hidden_layers=3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_trainer(cfg: TrainConfig, run_dir, llm_dir, dataset=None, model_seed: int = 0, **kwargs) -> Trainer:
    """The trainer of these tests: the tiny DiT of :data:`MODEL` and the frozen tiny LLM in ``llm_dir``."""
    torch.manual_seed(model_seed)
    model = build_model(MODEL, LLMGeometry.from_hf_config(load_llm_config(str(llm_dir))))
    encoder = TextEncoder.from_config(TextConfig(llm=str(llm_dir), dtype="float32", max_length=12),
                                      model.text_requirements())
    return Trainer(cfg, model, encoder, dataset if dataset is not None else ImageCaptionDataset(n=12),
                   run_dir=run_dir, progress=False, tensorboard=False, **kwargs)


def _child(rank: int, world_size: int, port: int, target: Callable, args: tuple, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    env = init_distributed("cpu")
    try:
        result = target(env, *args)
        Path(out, f"rank-{rank}.json").write_text(json.dumps(result))
    finally:
        destroy_distributed()


def spawn(world_size: int, target: Callable, *args: Any, tmp: Path) -> list[Any]:
    """Run ``target(env, *args)`` in ``world_size`` processes; returns every rank's JSON-able result."""
    out = Path(tmp) / f"results-{free_port()}"
    out.mkdir(parents=True)
    mp.start_processes(_child, args=(world_size, free_port(), target, args, str(out)), nprocs=world_size,
                       join=True, start_method="spawn")
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(world_size)]


# ---- targets (module level: spawned processes import them) ---------------------------------------------------------


def fit_losses(env, cfg_kwargs: dict, run_dir: str, llm_dir: str, dataset_kind: str = "map", shards: str = "") -> dict:
    """Train and return ``{"losses": {step: loss}, "start": start_step}``."""
    cfg = TrainConfig(**cfg_kwargs)
    dataset = WebShardDataset(shards, resolution=8, seed=3, shuffle=True) if dataset_kind == "stream" else None
    summary = make_trainer(cfg, run_dir, llm_dir, dataset=dataset).fit()
    return {"losses": {str(k): v for k, v in summary.losses.items()}, "start": summary.start_step}
