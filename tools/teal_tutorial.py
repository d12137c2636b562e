"""The fine-tuning tutorial's data and scores (docs/finetune.md): a color the shapes world never had, "teal".

    python tools/teal_tutorial.py data data/teal --count 300 --prior 200 --resolution 32
        writes data/teal/00000.png ... and data/teal/captions.jsonl ({"file", "caption"}: the folder source's format):
        the shapes world's scenes with one object repainted teal and its caption saying "teal" (single objects,
        colored objects, two objects in a relation); with --prior N also N of the world's own scenes with their own
        captions (prior-00000.png ...: prior preservation, so that the adapters keep the colors the model knew)

    python tools/teal_tutorial.py score runs/demo/fusedit --lora runs/teal/final/adapter --out docs/finetune
        samples the same prompts and seeds with the base model ("before"), then with the adapters loaded
        (pipe.load_lora_weights, "after"), and renders the same prompts with the shapes world itself at the model's
        resolution ("ground_truth": what a perfect model would score); writes grids of the teal and the control
        prompts per row (PNG), scores.json and scores.md, and prints the table: the mean fraction of pixels within
        TEAL_RADIUS of teal (RGB) for prompts that name teal (higher is better) and for prompts that do not
        (control: should stay near 0), and for the control prompts the fraction of pixels of the color they name
        (should not drop); each with a 95 % bootstrap interval over the images and the number of images

The tiny demo LLM's word-level tokenizer has never seen "teal" either: it reads it as <unk>. A real LLM has a token
for it; either way the DiT's adapters learn what the LLM's keys and values of such prompts mean.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fusedit.data.config import ShapesWorldConfig
from fusedit.data.shapes import (
    PALETTE,
    SHAPES,
    PlacedObject,
    ShapesWorld,
    parse_prompt,
)
from fusedit.sampling.loading import load_pipeline

TEAL = (0, 128, 128)
#: A pixel counts as a color when it lies within this Euclidean RGB distance of it (the palette's colors are at
#: least 107 apart from teal and from each other).
TEAL_RADIUS = 50.0
NEW_WORD = "teal"
ADAPTER_NAME = "teal"


def paint(world: ShapesWorld, objects: list[PlacedObject], recolor: str | None) -> np.ndarray:
    """``objects`` drawn as :meth:`ShapesWorld.draw` draws them, except those of color ``recolor``, which are
    painted teal: ``np.uint8 (R, R, 3)``."""
    return world.draw(objects, palette={**PALETTE, recolor: TEAL} if recolor else PALETTE)


def teal_example(world: ShapesWorld, index: int, seed: int) -> tuple[np.ndarray, str]:
    """Example ``index``: a training scene of ``world`` with one of its colored objects (and its caption's word)
    turned teal; scenes without a named color are drawn again with the next index."""
    rng = np.random.default_rng([seed, index])
    for attempt in range(100):
        _, spec = world.example(int(rng.integers(1 << 30)) + attempt)
        colored = [obj.color for obj in spec.objects if obj.color is not None]
        if colored:
            break
    else:  # pragma: no cover - the world always has colored prompts
        raise RuntimeError("no colored prompt found")
    old = colored[int(rng.integers(len(colored)))]
    return paint(world, world.scene(spec, rng), old), spec.text.replace(old, NEW_WORD)


def prior_example(world: ShapesWorld, index: int, seed: int) -> tuple[np.ndarray, str]:
    """Prior-preservation example ``index``: a scene of the shapes world itself (a training prompt, drawn as the
    demo's data draws them) with its own caption."""
    image, spec = world.example(int(np.random.default_rng([seed, 7, index]).integers(1 << 30)))
    return image, spec.text


def write_data(out: Path, count: int, resolution: int, seed: int, prior: int = 0) -> Path:
    """``count`` teal examples (``00000.png`` ...) and ``prior`` examples of the shapes world itself
    (``prior-00000.png`` ...) as PNG files plus ``captions.jsonl`` in ``out`` (created)."""
    out.mkdir(parents=True, exist_ok=True)
    world = ShapesWorld(ShapesWorldConfig(), resolution)
    lines = []
    for prefix, n, make in (("", count, teal_example), ("prior-", prior, prior_example)):
        for i in range(n):
            image, caption = make(world, i, seed)
            name = f"{prefix}{i:05d}.png"
            Image.fromarray(image).save(out / name)
            lines.append(json.dumps({"file": name, "caption": caption}))
    (out / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return out


def color_fraction(images: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    """Per image of ``images`` ``(N, H, W, 3)`` uint8: the fraction of pixels within :data:`TEAL_RADIUS` of
    ``rgb``."""
    distance = np.linalg.norm(images.astype(np.float32) - np.asarray(rgb, np.float32), axis=-1)
    return (distance < TEAL_RADIUS).mean(axis=(1, 2))


def prompts() -> tuple[list[str], list[tuple[str, str]]]:
    """The teal prompts (one per shape, alone and beside a red object) and the control prompts with the color each
    names."""
    teal = [f"a {NEW_WORD} {shape}" for shape in SHAPES]
    teal += [
        f"a {NEW_WORD} {shape} to the left of a red {other}" for shape, other in zip(SHAPES, SHAPES[1:], strict=False)
    ]
    control = [(f"a {color} {shape}", color) for color in ("red", "blue", "green") for shape in SHAPES]
    return teal, control


def sample_images(pipe, texts: list[str], per_prompt: int, steps: int, cfg: float) -> np.ndarray:
    """``per_prompt`` images of every prompt, seeds 0.. per prompt: ``(len(texts) · per_prompt, H, W, 3)`` uint8."""
    size = pipe.default_size
    out = []
    for text in texts:
        generators = [torch.Generator().manual_seed(s) for s in range(per_prompt)]
        result = pipe(
            text,
            num_images_per_prompt=per_prompt,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=cfg,
            generator=generators,
            output_type="np",
        )
        out.append((np.clip(result.images, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)


def grid(images: np.ndarray, columns: int, scale: int = 4) -> Image.Image:
    """Images ``(N, H, W, 3)`` in rows of ``columns``, each upscaled ``scale`` times (nearest)."""
    n, h, w, _ = images.shape
    rows = -(-n // columns)
    canvas = np.zeros((rows * h, columns * w, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = image
    return Image.fromarray(canvas).resize((columns * w * scale, rows * h * scale), Image.NEAREST)


def real_images(texts: list[str], per_prompt: int, resolution: int, seed: int) -> np.ndarray:
    """The ground truth: ``per_prompt`` renders of every prompt by the shapes world itself at ``resolution``
    (teal prompts drawn as the tutorial's data draws them), ``(len(texts) · per_prompt, R, R, 3)`` uint8."""
    world = ShapesWorld(ShapesWorldConfig(), resolution)
    out = []
    for i, text in enumerate(texts):
        # a teal prompt is parsed with a palette color it does not name in teal's place, which is then painted teal
        stand_in = next(c for c in PALETTE if c not in text.split()) if NEW_WORD in text.split() else None
        spec = parse_prompt(text.replace(NEW_WORD, stand_in) if stand_in else text)
        for s in range(per_prompt):
            out.append(paint(world, world.scene(spec, np.random.default_rng([seed, 4099, i, s])), stand_in))
    return np.stack(out)


def bootstrap_ci(values: np.ndarray, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """The 95 % percentile-bootstrap interval of the mean of ``values`` (N,) (samples drawn with replacement)."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(len(values), size=(resamples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def rate(teal_images: np.ndarray, control_images: np.ndarray, per_prompt: int) -> dict[str, Any]:
    """The scores of one row (see the module docstring): each metric's mean over its images, its 95 % bootstrap
    interval (``<metric>_ci95``) and the number of images behind it."""
    _, control = prompts()
    named = np.concatenate(
        [
            color_fraction(control_images[i * per_prompt : (i + 1) * per_prompt], PALETTE[c])
            for i, (_, c) in enumerate(control)
        ]
    )
    values = {
        "teal_prompts_teal_fraction": color_fraction(teal_images, TEAL),
        "control_prompts_teal_fraction": color_fraction(control_images, TEAL),
        "control_prompts_named_color_fraction": named,
    }
    row: dict[str, Any] = {}
    for key, per_image in values.items():
        row[key] = float(per_image.mean())
        row[f"{key}_ci95"] = bootstrap_ci(per_image)
    return {**row, "teal_samples": int(len(teal_images)), "control_samples": int(len(control_images))}


def table(result: dict[str, dict[str, Any]]) -> str:
    """The rows of ``result`` as the Markdown table of docs/finetune.md (percent of pixels, 95 % intervals)."""
    keys = ("teal_prompts_teal_fraction", "control_prompts_teal_fraction", "control_prompts_named_color_fraction")
    lines = [
        "| | teal prompts: teal pixels | control prompts: teal pixels | control prompts: pixels of the named color |",
        "|---|---|---|---|",
    ]
    for label, row in result.items():
        cells = []
        for key in keys:
            low, high = row[f"{key}_ci95"]
            n = row["teal_samples" if key.startswith("teal") else "control_samples"]
            cells.append(f"{100 * row[key]:.2f} % [{100 * low:.2f}, {100 * high:.2f}] ({n})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def score(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Before (the base model), after (its pipeline with the adapters loaded) and the ground truth (the shapes
    world's own renders of the same prompts): scores.json, a teal-prompt grid and a control-prompt grid per row."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(args.base, device="cpu")
    teal, control = prompts()
    controls = [text for text, _ in control]
    result = {}
    for label in ("before", "after", "ground_truth"):
        if label == "ground_truth":
            images = [real_images(texts, args.per_prompt, pipe.default_size, args.seed) for texts in (teal, controls)]
        else:
            if label == "after":
                pipe.load_lora_weights(args.lora, adapter_name=ADAPTER_NAME)
            images = [sample_images(pipe, texts, args.per_prompt, args.steps, args.cfg) for texts in (teal, controls)]
        result[label] = rate(*images, args.per_prompt)
        name = "real" if label == "ground_truth" else label
        grid(images[0], columns=args.per_prompt).save(out / f"teal-{name}.png", optimize=True)
        grid(images[1], columns=args.per_prompt).save(out / f"control-{name}.png", optimize=True)
    settings = {"base": str(args.base), "lora": str(args.lora), "per_prompt": args.per_prompt, "steps": args.steps}
    settings |= {"cfg": args.cfg, "ground_truth_seed": args.seed, "teal_prompts": teal, "control_prompts": controls}
    (out / "scores.json").write_text(json.dumps({**result, "settings": settings}, indent=2))
    (out / "scores.md").write_text(table(result) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="write the teal image folder")
    data.add_argument("out")
    data.add_argument("--count", type=int, default=300)
    data.add_argument("--resolution", type=int, default=32)
    data.add_argument("--seed", type=int, default=0)
    data.add_argument(
        "--prior",
        type=int,
        default=0,
        help="also this many of the shapes world's own images with their captions (prior preservation)",
    )
    rate = sub.add_parser("score", help="before/after grids and teal-pixel scores")
    rate.add_argument("base", help="the base model: a run, an exported folder or a reference folder")
    rate.add_argument("--lora", required=True, help="the adapter folder (a LoRA run's final/adapter)")
    rate.add_argument("--out", required=True)
    rate.add_argument("--per-prompt", type=int, default=4)
    rate.add_argument("--steps", type=int, default=25)
    rate.add_argument("--cfg", type=float, default=4.0)
    rate.add_argument("--seed", type=int, default=0, help="of the ground truth's renders")
    args = parser.parse_args(argv)
    if args.command == "data":
        print(write_data(Path(args.out), args.count, args.resolution, args.seed, args.prior))
        return 0
    print(table(score(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
