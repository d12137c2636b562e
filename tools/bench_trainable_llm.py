"""Per-step cost of a trainable LLM against the frozen one on the study preset (studies/frozen-vs-trainable.yaml).

    OMP_NUM_THREADS=1 python tools/bench_trainable_llm.py LLM_DIR [--steps 200] [--warmup 20]

``LLM_DIR``: the study's tiny LLM (``runs/studies/<name>/tiny-llm``, or one pretrained by ``fusedit demo``). Builds
the production trainer twice from ``configs/shapes/study.yaml``: ``frozen`` (the preset: frozen LLM, per-caption
text-context cache, filled with every training caption first, as it is after the first few hundred steps of a run)
and ``trainable`` (``text.trainable=true``, ``train.cache_text_context=false``: the LLM runs forward and backward
every step and its weights join AdamW and the EMA). Both take the same pre-drawn batches; their optimiser steps are
timed in alternation (``a b a b ...``, so a change of machine load hits both alike) on one thread. Data loading is
left out (the same for both). Prints the median milliseconds per step of each, their ratio and the trainable
variant's ``train.max_steps`` at the compute of the preset's 9000 frozen steps.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
from pathlib import Path

import torch

from fusedit.bench.timing import time_interleaved
from fusedit.data.shapes import ShapesWorld
from fusedit.experiment import load_experiment
from fusedit.train.launch import build_trainer

FROZEN_STEPS = 9000


def trainers(llm_dir: str, out: Path) -> dict:
    common = [f"text.llm={llm_dir}", "data.num_workers=0", "train.sample_every=0"]
    variants = {"frozen": [], "trainable": ["text.trainable=true", "train.cache_text_context=false"]}
    built = {}
    for name, extra in variants.items():
        config = load_experiment("shapes/study", common + extra)
        trainer = build_trainer(config, out / name, device=torch.device("cpu"), resume=False, progress=False)
        trainer.model.train()
        built[name] = trainer
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("llm_dir")
    parser.add_argument("--steps", type=int, default=200, help="timed optimiser steps of each variant")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps of each variant first")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        built = trainers(args.llm_dir, Path(tmp))
        frozen = built["frozen"]
        stream = frozen.data.batches()
        batches = [next(stream) for _ in range(64)]
        world = ShapesWorld(frozen.experiment.data.shapes, frozen.experiment.data.resolution)
        captions = [spec.text for spec in world.training_prompts()]
        with torch.no_grad():  # the steady state of a run: every training caption is in the cache
            for start in range(0, len(captions), 64):
                frozen.text_encoder.encode(captions[start : start + 64])
        feeds = {name: itertools.cycle(batches) for name in built}
        fns = {name: (lambda n=name: built[n].optimizer_step(iter([next(feeds[n])]))) for name in built}
        timed = time_interleaved(fns, torch.device("cpu"), warmup=args.warmup, iters=args.steps)
    ms = {name: 1000 * statistics.median(timed[name]["times_s"]) for name in built}
    ratio = ms["trainable"] / ms["frozen"]
    for name, value in ms.items():
        print(f"{name}: {value:.1f} ms per step (median of {args.steps})")
    print(f"ratio trainable / frozen: {ratio:.2f}; equal compute: train.max_steps={round(FROZEN_STEPS / ratio)}")


if __name__ == "__main__":
    main()
