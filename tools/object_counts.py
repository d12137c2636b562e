"""How many objects a model draws for a prompt, at several guidance scales.

    python tools/object_counts.py RUN --prompts "a square and a triangle" "a triangle and a square" \
        [--cfg 1 3 5] [--images 48] [--seed 1234] [--steps 25]

For each prompt and CFG scale it samples ``--images`` images (image ``k`` from ``torch.Generator().manual_seed(seed +
k)``, the same noise for every prompt and scale), detects their objects with the shapes-world detector and prints how
many images the benchmark scores correct and how many images show 0, 1, 2, ... objects. It separates "draws the wrong
number of objects" from "draws the right number with wrong shapes or colors", and shows which way guidance pushes.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fusedit.data.shapes_grammar import parse_prompt
from fusedit.eval.shapes_detector import detect
from fusedit.eval.shapes_scorer import as_uint8_images, score_image


@dataclass(frozen=True)
class ObjectCounts:
    """One prompt at one guidance scale: ``correct`` of ``images`` scored right, ``objects[n]`` images with ``n``
    detected objects."""

    prompt: str
    cfg: float
    images: int
    correct: int
    objects: dict[int, int]

    def line(self) -> str:
        return f"{self.prompt!r} cfg {self.cfg:g}: correct {self.correct}/{self.images}, objects {self.objects}"


def count_objects(pipe, prompt: str, cfg: float, images: int, seed: int, steps: int) -> ObjectCounts:
    """Sample ``images`` images of ``prompt`` at CFG ``cfg`` with ``pipe`` and count their detected objects."""
    spec = parse_prompt(prompt)
    generators = [torch.Generator().manual_seed(seed + k) for k in range(images)]
    output = pipe(
        [prompt] * images,
        num_inference_steps=steps,
        guidance_scale=cfg,
        generator=generators,
        output_type="pt",
    )
    uint8 = as_uint8_images(output.images * 2 - 1)  # "pt" output is in [0, 1]
    counts = Counter(len(detect(image)) for image in uint8)
    correct = sum(score_image(image, spec) for image in uint8)
    return ObjectCounts(prompt, cfg, images, correct, dict(sorted(counts.items())))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a training run directory (or exported pipeline folder)")
    parser.add_argument("--prompts", nargs="+", required=True, help="prompts of the shapes world's grammar")
    parser.add_argument("--cfg", nargs="+", type=float, default=[3.0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args(argv)
    from fusedit.sampling.loading import load_pipeline

    pipe = load_pipeline(Path(args.run), device="cpu", use_ema=True)
    for prompt in args.prompts:
        for cfg in args.cfg:
            print(count_objects(pipe, prompt, cfg, args.images, args.seed, args.steps).line(), flush=True)


if __name__ == "__main__":
    main()
