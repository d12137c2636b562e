"""Time one optimizer step of the study preset's DiT for AdamW and Muon (docs/results/demo.md, docs/performance.md).

    python tools/bench_optimizer_step.py LLM_DIR [--repeats 5] [--steps 40]

``LLM_DIR``: a shapes-world tiny LLM (``runs/demo/tiny-llm`` after ``make demo``). Builds the trainer of
``configs/shapes/study.yaml`` with ``adamw``, ``muon`` (5 Newton–Schulz steps) and ``muon`` with 3, gives every trained
parameter a fixed random gradient, and prints the median over ``--repeats`` of the mean time of ``--steps`` calls to
``optimizer.step()`` (one thread).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fusedit.experiment import load_experiment
from fusedit.train.launch import build_trainer

VARIANTS = {
    "adamw": ["train.optimizer=adamw"],
    "muon, 5 Newton-Schulz steps": ["train.optimizer=muon", "train.muon_ns_steps=5"],
    "muon, 3 Newton-Schulz steps": ["train.optimizer=muon", "train.muon_ns_steps=3"],
}


def time_step(llm_dir: str, overrides: list[str], repeats: int, steps: int) -> float:
    """Median milliseconds per ``optimizer.step()`` of the study preset with ``overrides``."""
    config = load_experiment("shapes/study", [f"text.llm={llm_dir}", "data.num_workers=0", *overrides])
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_trainer(config, Path(run_dir), device=torch.device("cpu"), resume=False, progress=False)
        generator = torch.Generator().manual_seed(0)
        for param in trainer.params.values():
            param.grad = torch.randn(param.shape, generator=generator) * 1e-3
        for _ in range(10):  # states created, caches warm
            trainer.optimizer.step()
        means = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(steps):
                trainer.optimizer.step()
            means.append((time.perf_counter() - start) / steps * 1000)
    return statistics.median(means)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("llm_dir")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name, overrides in VARIANTS.items():
        print(f"{name}: {time_step(args.llm_dir, overrides, args.repeats, args.steps):.1f} ms per optimizer step")


if __name__ == "__main__":
    main()
