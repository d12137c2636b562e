"""Why a shapes evaluation's images fail, re-scored from its saved samples, with a closer look at shape binding.

    python tools/shapes_binding.py RUN/eval-shapes [RUN/eval-shapes-training ...]

For each evaluation folder (written by ``fusedit eval --suite shapes``, with or without ``--prompt-set training``)
it reads ``images.npz`` and the world of ``scores.json``'s settings, detects the objects of every image again and
prints, per category, the accuracy and the share of images failing for each reason of
:data:`fusedit.eval.shapes_scorer.FAILURES`. Then, over the two-object prompts that name two different colors
(``position``, ``color_attr``) in images where each of the two colors was found exactly once, i.e. where it is known
which drawn object is meant to be which:

* per-object shape accuracy (the object of each color has the shape the prompt gives that color);
* for prompts whose two shapes differ, in images where both objects have a recognised shape, how often the two
  share one shape anyway (a model that binds
  colors and places but not shapes draws "a blue circle above a red square" as two circles or two squares), how
  often each shape goes to its own color, and how often the two are swapped (as often as paired: no binding).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np

from fusedit.data.config import ShapesWorldConfig
from fusedit.data.shapes import CATEGORIES, ShapesWorld
from fusedit.eval.shapes_detector import detect
from fusedit.eval.shapes_scorer import FAILURES, diagnose


def load_evaluation(folder: Path) -> tuple[ShapesWorld, np.ndarray, list[str]]:
    """The world, images ``uint8 (N, R, R, 3)`` and prompts of an evaluation folder."""
    settings = json.loads((folder / "scores.json").read_text())["settings"]
    world = ShapesWorld(ShapesWorldConfig(**settings["shapes"]), int(settings["resolution"]))
    saved = np.load(folder / "images.npz")
    return world, saved["images"], [str(p) for p in saved["prompts"]]


def analyse_binding(world: ShapesWorld, images: np.ndarray, prompts: list[str]) -> dict:
    """``{"failures": {category: Counter}, "total": Counter, "right": Counter, "shape_hits": int,
    "shape_objects": int, "distinct_prompts": int, "distinct_drawn_same": int, "distinct_paired": int,
    "distinct_swapped": int}`` (see the module docstring)."""
    failures: dict[str, Counter] = {c: Counter() for c in CATEGORIES}
    total, right = Counter(), Counter()
    binding = Counter()
    for image, prompt in zip(images, prompts, strict=True):
        spec = world.spec(prompt)
        objects = detect(image)
        reason = diagnose(objects, spec)
        total[spec.category] += 1
        if reason is None:
            right[spec.category] += 1
        else:
            failures[spec.category][reason] += 1
        if spec.category not in ("position", "color_attr") or spec.objects[0].color == spec.objects[1].color:
            continue
        by_color = Counter(o.color for o in objects)
        wanted = [o.color for o in spec.objects]
        if len(objects) != 2 or any(by_color[c] != 1 for c in wanted):
            continue
        drawn = {o.color: o.shape for o in objects}
        binding["shape_objects"] += 2
        binding["shape_hits"] += sum(drawn[o.color] == o.shape for o in spec.objects)
        first, second = drawn[wanted[0]], drawn[wanted[1]]
        if spec.objects[0].shape != spec.objects[1].shape and first is not None and second is not None:
            binding["distinct_prompts"] += 1
            binding["distinct_drawn_same"] += int(first == second)
            binding["distinct_paired"] += int((first, second) == (spec.objects[0].shape, spec.objects[1].shape))
            binding["distinct_swapped"] += int((first, second) == (spec.objects[1].shape, spec.objects[0].shape))
    return {"failures": failures, "total": total, "right": right, **binding}


def format_analysis(name: str, result: dict) -> list[str]:
    """Markdown lines: the failure table and the binding numbers."""
    header = "| category | images | right | " + " | ".join(r.replace("_", " ") for r in FAILURES) + " |"
    lines = [f"### {name}", "", header, "|---" * (len(FAILURES) + 3) + "|"]
    for category in CATEGORIES:
        n = result["total"][category]
        if not n:
            continue
        shares = [f"{result['failures'][category][r] / n:.2f}" for r in FAILURES]
        lines.append(f"| {category} | {n} | {result['right'][category] / n:.2f} | " + " | ".join(shares) + " |")
    objects, distinct = result.get("shape_objects", 0), result.get("distinct_prompts", 0)
    lines.append("")
    if objects:
        lines.append(
            f"Two-color prompts with each color drawn once: {objects // 2} images; the object of each color has its "
            f"shape in {result['shape_hits'] / objects:.2f} of {objects} objects (chance 1/3); of {distinct} images "
            f"asking for two different shapes (both drawn as a recognised shape), "
            f"{result['distinct_drawn_same'] / max(distinct, 1):.2f} show one shape twice, "
            f"{result.get('distinct_paired', 0) / max(distinct, 1):.2f} the two shapes each with its color and "
            f"{result.get('distinct_swapped', 0) / max(distinct, 1):.2f} the two shapes swapped (a model that does "
            "not bind shapes to colors swaps them as often as it pairs them)."
        )
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="evaluation folders (scores.json + images.npz)")
    args = parser.parse_args(argv)
    for folder in args.folders:
        if not (folder / "images.npz").is_file() or not (folder / "scores.json").is_file():
            parser.error(f"{folder} holds no images.npz and scores.json of a shapes evaluation")
        world, images, prompts = load_evaluation(folder)
        print("\n".join(format_analysis(str(folder), analyse_binding(world, images, prompts))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
