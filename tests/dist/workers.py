"""Multi-process helpers of the distributed tests: spawn ``world_size`` CPU processes (gloo) that run a Trainer.

Each child gets torchrun's environment variables and calls :func:`fusedit.dist.init_distributed`, so the launch
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

from fusedit.dist.env import destroy_distributed, init_distributed
from fusedit.train.config import TrainConfig
from fusedit.train.trainer import Trainer

from train.fakes import FrozenTextEncoder, ImageCaptionDataset, TinyVelocityModel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_trainer(cfg: TrainConfig, run_dir, dataset=None, model_seed: int = 0, **kwargs) -> Trainer:
    """The trainer of these tests: a dropout-free tiny model with 2 blocks and the fake frozen text encoder."""
    torch.manual_seed(1000)
    encoder = FrozenTextEncoder()
    torch.manual_seed(model_seed)
    model = TinyVelocityModel(dropout=0.0, blocks=2)
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


def fit_losses(env, cfg_kwargs: dict, run_dir: str, dataset_kind: str = "map", shards: str = "") -> dict:
    """Train and return ``{"losses": {step: loss}, "start": start_step}``."""
    cfg = TrainConfig(**cfg_kwargs)
    dataset = None
    if dataset_kind == "stream":
        from fusedit.data.webdataset import WebShardDataset

        dataset = WebShardDataset(shards, resolution=8, seed=3, shuffle=True)
    summary = make_trainer(cfg, run_dir, dataset=dataset).fit()
    return {"losses": {str(k): v for k, v in summary.losses.items()}, "start": summary.start_step}
