"""Time the frozen text encoder against its per-caption cache on demo-sized batches (docs/results/demo.md).

    python tools/bench_text_cache.py LLM_DIR [--batches 100]

``LLM_DIR``: the demo's tiny LLM (``runs/demo/tiny-llm`` after ``make demo``). Fills the cache with every training
caption of the shapes world (printing how long that takes: each caption is encoded alone), then prints the mean time
per batch of 32 random training captions for ``TextEncoder.encode`` and ``CachedTextEncoder.encode`` (one thread).
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from fusedit.builders import build_components
from fusedit.data.shapes import ShapesWorld
from fusedit.experiment import load_experiment
from fusedit.text.cache import CachedTextEncoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("llm_dir")
    parser.add_argument("--batches", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = load_experiment("demo", [f"text.llm={args.llm_dir}"])
    encoder = build_components(config).text_encoder
    captions = [spec.text for spec in ShapesWorld(config.data.shapes, config.data.resolution).training_prompts()]
    cache = CachedTextEncoder(encoder)
    start = time.perf_counter()
    for i in range(0, len(captions), config.train.batch_size):
        cache.encode(captions[i : i + config.train.batch_size])
    print(f"filled the cache with {len(cache)} captions in {time.perf_counter() - start:.1f} s")
    rng = random.Random(0)
    batches = [rng.sample(captions, config.train.batch_size) for _ in range(args.batches)]
    with torch.no_grad():
        for name, encode in (("TextEncoder.encode", encoder.encode), ("CachedTextEncoder.encode", cache.encode)):
            start = time.perf_counter()
            for batch in batches:
                encode(batch)
            per_batch = (time.perf_counter() - start) / len(batches) * 1000
            print(f"{name}: {per_batch:.1f} ms per batch of {config.train.batch_size}")


if __name__ == "__main__":
    main()
