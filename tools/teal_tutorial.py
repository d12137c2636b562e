"""The fine-tuning tutorial's data and scores (docs/finetune.md): a color the shapes world never had, "teal".

    python tools/teal_tutorial.py data data/teal --count 300 --resolution 32
        writes data/teal/00000.png ... and data/teal/captions.jsonl ({"file", "caption"}: the folder source's format):
        the shapes world's scenes with one object repainted teal and its caption saying "teal" (single objects,
        colored objects, two objects in a relation)

    python tools/teal_tutorial.py score runs/demo/fusedit --lora runs/teal/final/adapter --out docs/finetune
        samples the same prompts and seeds with the base model, then with the adapters loaded
        (pipe.load_lora_weights), writes before/after grids (PNG) and scores.json, and prints the scores:
        the mean fraction of pixels within TEAL_RADIUS of teal (RGB) for prompts that name teal (higher is better)
        and for prompts that do not (control: should stay near 0), and for the control prompts the fraction of
        pixels of the color they name (should not drop)

The tiny demo LLM's word-level tokenizer has never seen "teal" either: it reads it as <unk>. A real LLM has a token
for it; either way the DiT's adapters learn what the LLM's keys and values of such prompts mean.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fusedit.data.config import ShapesWorldConfig
from fusedit.data.shapes import BACKGROUND, PALETTE, SHAPES, ShapesWorld, object_side, shape_mask
from fusedit.sampling.loading import load_pipeline

TEAL = (0, 128, 128)
#: A pixel counts as a color when it lies within this Euclidean RGB distance of it (the palette's colors are at
#: least 107 apart from teal and from each other).
TEAL_RADIUS = 50.0
NEW_WORD = "teal"
ADAPTER_NAME = "teal"


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
    objects = world.scene(spec, rng)
    image = np.empty((world.resolution, world.resolution, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for obj in objects:
        side = obj.side or object_side(obj.size, world.resolution)
        mask = shape_mask(obj.shape, side, side)
        region = image[obj.y : obj.y + side, obj.x : obj.x + side]
        region[mask] = TEAL if obj.color == old else PALETTE[obj.color]
    return image, spec.text.replace(old, NEW_WORD)


def write_data(out: Path, count: int, resolution: int, seed: int) -> Path:
    """``count`` teal examples as PNG files plus ``captions.jsonl`` in ``out`` (created)."""
    out.mkdir(parents=True, exist_ok=True)
    world = ShapesWorld(ShapesWorldConfig(), resolution)
    lines = []
    for i in range(count):
        image, caption = teal_example(world, i, seed)
        name = f"{i:05d}.png"
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


def scores(pipe, per_prompt: int, steps: int, cfg: float) -> tuple[dict[str, float], np.ndarray]:
    """The scores of ``pipe`` (see the module docstring) and its images of the teal prompts."""
    teal, control = prompts()
    teal_images = sample_images(pipe, teal, per_prompt, steps, cfg)
    control_images = sample_images(pipe, [text for text, _ in control], per_prompt, steps, cfg)
    named = np.concatenate(
        [
            color_fraction(control_images[i * per_prompt : (i + 1) * per_prompt], PALETTE[c])
            for i, (_, c) in enumerate(control)
        ]
    )
    return {
        "teal_prompts_teal_fraction": float(color_fraction(teal_images, TEAL).mean()),
        "control_prompts_teal_fraction": float(color_fraction(control_images, TEAL).mean()),
        "control_prompts_named_color_fraction": float(named.mean()),
        "teal_samples": int(len(teal_images)),
        "control_samples": int(len(control_images)),
    }, teal_images


def score(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Before (the base model) and after (its pipeline with the adapters loaded): scores.json and two grids."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(args.base, device="cpu")
    result = {}
    for label in ("before", "after"):
        if label == "after":
            pipe.load_lora_weights(args.lora, adapter_name=ADAPTER_NAME)
        result[label], images = scores(pipe, args.per_prompt, args.steps, args.cfg)
        grid(images, columns=args.per_prompt).save(out / f"teal-{label}.png")
    settings = {"base": str(args.base), "lora": str(args.lora), "per_prompt": args.per_prompt, "steps": args.steps}
    (out / "scores.json").write_text(json.dumps({**result, "settings": {**settings, "cfg": args.cfg}}, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="write the teal image folder")
    data.add_argument("out")
    data.add_argument("--count", type=int, default=300)
    data.add_argument("--resolution", type=int, default=32)
    data.add_argument("--seed", type=int, default=0)
    rate = sub.add_parser("score", help="before/after grids and teal-pixel scores")
    rate.add_argument("base", help="the base model: a run, an exported folder or a reference folder")
    rate.add_argument("--lora", required=True, help="the adapter folder (a LoRA run's final/adapter)")
    rate.add_argument("--out", required=True)
    rate.add_argument("--per-prompt", type=int, default=4)
    rate.add_argument("--steps", type=int, default=25)
    rate.add_argument("--cfg", type=float, default=4.0)
    args = parser.parse_args(argv)
    if args.command == "data":
        print(write_data(Path(args.out), args.count, args.resolution, args.seed))
        return 0
    for label, values in score(args).items():
        print(label, json.dumps(values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
