"""Score a folder of images in GenEval's sample layout against the shapes world's grammar, and the controls alone.

Layout (what :func:`fusedit.eval.benchmarks.sample_geneval` writes, and GenEval's own sampler)::

    DIR/00000/metadata.jsonl      {"prompt": "a red circle to the left of a blue square", ...}
    DIR/00000/samples/0000.png
    DIR/00000/samples/0001.png
    DIR/00001/...

Any prompt of the grammar is accepted (:func:`~fusedit.data.shapes.parse_prompt`), not only held-out ones, and any
square image size of at least 16 px. The controls are drawn for the same prompts, the same number of images each,
at the images' resolution, with a shapes world of default settings (only its drawing rules matter for them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from fusedit.data.config import ShapesWorldConfig
from fusedit.data.shapes import MIN_RESOLUTION, PromptSpec, ShapesWorld, parse_prompt
from fusedit.eval.images import list_images
from fusedit.eval.manifest import code_version, prompt_set_hash
from fusedit.eval.shapes_controls import control_images
from fusedit.eval.shapes_eval import images_per_prompt
from fusedit.eval.shapes_report import score_and_report
from fusedit.eval.shapes_stats import check_category_sizes


def read_sample_folder(folder: str | Path) -> tuple[list[np.ndarray], list[PromptSpec], list[str]]:
    """``(images, specs, paths)`` of a GenEval-layout folder, in folder order.

    Raises:
        FileNotFoundError / ValueError: a missing folder, no prompt folders, an unreadable or malformed
            ``metadata.jsonl``, a prompt outside the grammar, an unreadable image, a non-square image, images of
            different sizes or smaller than 16 px — each naming the file.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    prompt_dirs = sorted(p for p in root.iterdir() if p.is_dir() and (p / "metadata.jsonl").is_file())
    if not prompt_dirs:
        raise ValueError(
            f"{root} has no prompt folders in GenEval's layout (DIR/00000/metadata.jsonl with "
            '{"prompt": ...} and images in DIR/00000/samples/)'
        )
    images, specs, paths = [], [], []
    for prompt_dir in prompt_dirs:
        spec = parse_prompt(_read_prompt(prompt_dir / "metadata.jsonl"))
        files = list_images(prompt_dir / "samples") if (prompt_dir / "samples").is_dir() else []
        if not files:
            raise ValueError(f"{prompt_dir / 'samples'} holds no images for the prompt {spec.text!r}")
        for path in files:
            images.append(_read_image(path))
            specs.append(spec)
            paths.append(str(path))
    sizes = {im.shape[:2] for im in images}
    if len(sizes) > 1:
        raise ValueError(f"the images of {root} have different sizes {sorted(sizes)}; score one resolution at a time")
    return images, specs, paths


def _read_prompt(path: Path) -> str:
    try:
        first = path.read_text(encoding="utf-8").strip().splitlines()[0]
        prompt = json.loads(first)["prompt"]
    except (UnicodeDecodeError, IndexError, json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f'{path}: expected a first line of JSON with a "prompt" string') from None
    if not isinstance(prompt, str):
        raise ValueError(f'{path}: "prompt" must be a string, got {type(prompt).__name__}')
    return prompt


def _read_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"{path} is not a readable image ({error})") from None
    height, width = array.shape[:2]
    if height != width or height < MIN_RESOLUTION:
        raise ValueError(
            f"{path} is {width}x{height}; the shapes benchmark scores square images of at least {MIN_RESOLUTION} px"
        )
    return array


def evaluate_image_folder(
    folder: str | Path, *, controls: bool = True, allow_small: bool = False, seed: int = 0
) -> dict[str, Any]:
    """Score every image of a GenEval-layout folder (and the controls on its prompts): the
    :func:`~fusedit.eval.shapes_report.summary_json` document plus ``per_image`` results."""
    images, specs, paths = read_sample_folder(folder)
    prompts, counts = _prompt_counts(specs)
    check_category_sizes(_images_per_category(specs), allow_small)
    world = ShapesWorld(ShapesWorldConfig(), images[0].shape[0])
    manifest = {
        **code_version(),
        "source": str(Path(folder).resolve()),
        "prompts": "folder",
        "num_prompts": len(prompts),
        "prompt_set_hash": prompt_set_hash(prompts, counts),
        "images_per_category": _images_per_category(specs),
        "resolution": images[0].shape[0],
        "seed": seed,
    }
    result = score_and_report(world, images, specs, manifest, controls, {"suite": "shapes", "source": "images"})
    result["per_image"] = [
        {"path": p, "prompt": s.text, "category": s.category, "correct": c}
        for p, s, c in zip(paths, specs, result.pop("correct_per_image"), strict=False)
    ]
    return result


def evaluate_controls_only(
    world: ShapesWorld,
    per_prompt: int,
    min_per_category: int,
    seed: int = 0,
    allow_small: bool = False,
    source: str | None = None,
) -> dict[str, Any]:
    """The controls alone, on the held-out prompts of ``world``: the summary document's top-level scores are the
    ground-truth control's, ``controls`` holds them all."""
    specs = world.held_out_prompts()
    counts = images_per_prompt(specs, per_prompt, min_per_category)
    expanded = [spec for spec, n in zip(specs, counts, strict=False) for _ in range(n)]
    check_category_sizes(_images_per_category(expanded), allow_small)
    manifest = {
        **code_version(),
        "source": source,
        "prompts": "held_out",
        "num_prompts": len(specs),
        "prompt_set_hash": prompt_set_hash([s.text for s in specs], counts),
        "images_per_category": _images_per_category(expanded),
        "resolution": world.resolution,
        "seed": seed,
    }
    truth = control_images("ground_truth", world, expanded, seed)
    result = score_and_report(world, truth, expanded, manifest, True, {"suite": "shapes", "source": "controls"})
    result.pop("correct_per_image")
    return result


def _prompt_counts(specs: list[PromptSpec]) -> tuple[list[str], list[int]]:
    counts: dict[str, int] = {}
    for spec in specs:
        counts[spec.text] = counts.get(spec.text, 0) + 1
    return list(counts), list(counts.values())


def _images_per_category(specs: list[PromptSpec]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for spec in specs:
        totals[spec.category] = totals.get(spec.category, 0) + 1
    return totals
