"""The shapes-world evaluation suite: sample every held-out prompt, score it with the detector, save grids.

The held-out prompts of a shapes world (:meth:`fusedit.data.shapes.ShapesWorld.held_out_prompts`) never appear in
training, so the suite measures compositional generalisation, GenEval style, per category.

Images per prompt. Every prompt gets ``per_prompt`` images, or more in a category with few held-out prompts when
``min_per_category`` is set: ``n_c = max(per_prompt, ceil(min_per_category / prompts in c))`` (GenEval's overall
score weighs every category equally, so a category of one prompt would otherwise decide it with a few images).

Seeds. Prompt ``i`` (in the world's held-out order) has stride ``s = max_c n_c`` (``per_prompt`` without minimum); its
``k``-th image starts from the noise of ``torch.Generator().manual_seed(seed + i * s + k)`` (the convention of
:mod:`fusedit.eval.benchmarks`), so every image can be regenerated alone.

Outputs in ``out_dir``:

* ``scores.json``: ``overall`` (mean of the per-category accuracies), ``accuracy``/``correct``/``total`` per
  category, ``num_images``, ``settings`` (seed, images per prompt, steps, CFG, negative prompt, resolution, the
  shapes world's settings, the model path) and ``per_prompt`` (prompt, category, seeds, per-image correctness);
  ``color_recall``/``color_precision`` (:func:`color_alignment`, over images of prompts that name colors);
  optionally ``fd_pixels`` (see :func:`pixel_frechet_distance`);
* ``images.npz``: every sample (``images`` ``uint8 (N, R, R, 3)``, prompt-major, and their ``prompts``), for
  re-scoring without re-sampling;
* ``grid-<category>.png``: one row per example prompt (up to ``grid_prompts``), its first images (up to 8) side by
  side, and ``grid-<category>.txt`` naming each row's prompt.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from fusedit.data.shapes import PromptSpec, ShapesWorld

SCORES_NAME = "scores.json"


@dataclass(frozen=True)
class ShapesEvalSettings:
    """Sampling settings of the shapes suite (``None``: the pipeline's defaults, i.e. the run's ``sample`` section).

    Attributes:
        per_prompt: images per held-out prompt.
        seed: base seed (see the module docstring).
        num_inference_steps: Euler steps.
        guidance_scale: CFG scale.
        negative_prompt: unconditional prompt.
        batch_size: images per pipeline call.
        grid_prompts: prompts shown per category grid.
        pixel_fd: also compute :func:`pixel_frechet_distance` against renders of the same prompts.
        min_per_category: at least this many images per category (more images per prompt where needed; 0: off).
    """

    per_prompt: int = 4
    seed: int = 0
    num_inference_steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    negative_prompt: Optional[str] = None
    batch_size: int = 64
    grid_prompts: int = 8
    pixel_fd: bool = True
    min_per_category: int = 0

    def validate(self) -> None:
        if self.per_prompt < 1:
            raise ValueError(f"per_prompt must be >= 1, got {self.per_prompt}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.num_inference_steps}")
        if self.guidance_scale is not None and self.guidance_scale < 0:
            raise ValueError(f"cfg must be >= 0, got {self.guidance_scale}")
        if self.min_per_category < 0:
            raise ValueError(f"min_per_category must be >= 0, got {self.min_per_category}")
        if self.grid_prompts < 1:
            raise ValueError(f"grid_prompts must be >= 1, got {self.grid_prompts}")


def world_from_config(config) -> ShapesWorld:
    """The :class:`ShapesWorld` a run was trained on, from its :class:`~fusedit.experiment.ExperimentConfig`.

    Raises:
        ValueError: ``config`` is missing (a reference folder) or the run was not trained on the shapes world.
    """
    if config is None:
        raise ValueError("the shapes suite needs a fusedit run or exported pipeline (its config.yaml names the shapes "
                         "world); this model has no fusedit config (a reference folder?)")
    if config.data.source != "shapes":
        raise ValueError(f"the shapes suite evaluates models trained on the shapes world, but this model was trained "
                         f"on data.source={config.data.source!r}; use --suite geneval/dpgbench/fid/clip instead")
    return ShapesWorld(config.data.shapes, config.data.resolution)


def images_per_prompt(specs: Sequence[PromptSpec], per_prompt: int, min_per_category: int = 0) -> list[int]:
    """How many images each prompt gets (see the module docstring)."""
    counts: dict[str, int] = {}
    for spec in specs:
        counts[spec.category] = counts.get(spec.category, 0) + 1
    return [max(per_prompt, math.ceil(min_per_category / counts[spec.category])) for spec in specs]


def prompt_seeds(seed: int, index: int, count: int, stride: Optional[int] = None) -> list[int]:
    """Seeds of the ``count`` images of the ``index``-th prompt (``stride``: seeds reserved per prompt)."""
    stride = count if stride is None else stride
    return [seed + index * stride + k for k in range(count)]


def sample_jobs(pipe, jobs: Sequence[tuple[str, int]], resolution: int, settings: "ShapesEvalSettings",
                progress: bool = False) -> torch.Tensor:
    """Images ``(len(jobs), 3, R, R)`` in ``[-1, 1]`` for ``(prompt, seed)`` jobs, one generator per image."""
    out = []
    for start in range(0, len(jobs), settings.batch_size):
        batch = jobs[start:start + settings.batch_size]
        generators = [torch.Generator(device=pipe.device).manual_seed(s) for _, s in batch]
        result = pipe([p for p, _ in batch], negative_prompt=settings.negative_prompt, height=resolution,
                      width=resolution, num_inference_steps=settings.num_inference_steps,
                      guidance_scale=settings.guidance_scale, generator=generators, output_type="pt")
        out.append(result.images.float().cpu() * 2 - 1)
        if progress:
            print(f"  sampled {min(start + len(batch), len(jobs))}/{len(jobs)} images", flush=True)
    return torch.cat(out)


def render_specs(world: ShapesWorld, specs: Sequence[PromptSpec], counts: Sequence[int], seed: int) -> np.ndarray:
    """Real shapes-world images of ``specs`` (``counts[i]`` of prompt ``i``, prompt-major), ``uint8 (N, R, R, 3)``."""
    rng = np.random.default_rng([seed, 4242])
    return np.stack([world.render(spec, rng) for spec, n in zip(specs, counts) for _ in range(n)])


def _pooled_pixels(images: np.ndarray, cells: int = 8) -> np.ndarray:
    """``uint8 (N, R, R, 3)`` → ``(N, cells·cells·3)`` mean colors of a ``cells × cells`` grid, in [0, 1]."""
    n, r, _, _ = images.shape
    if r % cells:
        raise ValueError(f"pixel FD needs a resolution divisible by {cells}, got {r}")
    x = images.astype(np.float64).reshape(n, cells, r // cells, cells, r // cells, 3).mean(axis=(2, 4)) / 255.0
    return x.reshape(n, -1)


def pixel_frechet_distance(fake: np.ndarray, real: np.ndarray) -> float:
    """A small image-statistics distance for the shapes world (NOT Inception FID).

    The Fréchet distance between Gaussians fitted to 8×8 mean-pooled RGB (192-d, values in [0, 1]) of generated
    and of real images. It reacts to blur, wrong colors, noise and layout statistics; it does not look at the
    prompts. Lower is better.
    """
    from fusedit.eval.fid import fid_from_features

    return fid_from_features(_pooled_pixels(fake), _pooled_pixels(real))


def color_alignment(image: np.ndarray, spec: PromptSpec, min_pixels: Optional[int] = None) -> Optional[tuple[float, float]]:
    """``(recall, precision)`` of the prompt's colors in ``image`` (``uint8 (H, W, 3)``); ``None`` for prompts
    that name no color.

    A softer text-alignment signal than the detector's all-or-nothing rules, useful early in training when shapes
    are still blotchy: foreground pixels (as the detector defines them) are assigned their nearest palette color; a
    color is *drawn* when it covers at least ``min_pixels`` pixels (default: the detector's minimum object area).
    Recall: drawn prompt colors / prompt colors; precision: drawn prompt colors / drawn colors (0 when nothing is
    drawn).
    """
    from fusedit.data.shapes import BACKGROUND, COLORS, PALETTE
    from fusedit.eval.shapes_scorer import DEFAULT_SETTINGS

    wanted = {obj.color for obj in spec.objects if obj.color is not None}
    if not wanted:
        return None
    pixels = image.astype(np.float32)
    height, width = image.shape[:2]
    if min_pixels is None:
        min_pixels = int(max(4.0, DEFAULT_SETTINGS.min_area_fraction * height * width))
    foreground = np.linalg.norm(pixels - np.array(BACKGROUND, np.float32), axis=-1) > DEFAULT_SETTINGS.background_threshold
    palette = np.array([PALETTE[c] for c in COLORS], np.float32)
    nearest = np.linalg.norm(pixels[foreground][:, None, :] - palette, axis=-1).argmin(axis=-1)
    counts = np.bincount(nearest, minlength=len(COLORS))
    drawn = {COLORS[i] for i in range(len(COLORS)) if counts[i] >= min_pixels}
    hit = len(wanted & drawn)
    return hit / len(wanted), (hit / len(drawn) if drawn else 0.0)


def save_category_grids(images: torch.Tensor, specs: Sequence[PromptSpec], counts: Sequence[int], out_dir: Path,
                        grid_prompts: int, max_columns: int = 8) -> dict[str, str]:
    """``grid-<category>.png`` (+ ``.txt`` with the row prompts) for every category; returns category → file name.

    ``images`` are prompt-major, ``counts[i]`` of prompt ``i``; a row shows a prompt's first images.
    """
    from fusedit.train.logging import save_image_grid

    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)
    grids = {}
    for category in dict.fromkeys(spec.category for spec in specs):
        rows = [i for i, spec in enumerate(specs) if spec.category == category][:grid_prompts]
        columns = min(max_columns, min(counts[i] for i in rows))
        tiles = torch.cat([images[starts[i]:starts[i] + columns] for i in rows])
        name = f"grid-{category}.png"
        save_image_grid(tiles, out_dir / name, nrow=columns)
        (out_dir / f"grid-{category}.txt").write_text(
            "".join(f"row {r}: {specs[i].text}\n" for r, i in enumerate(rows)))
        grids[category] = name
    return grids


def evaluate_shapes(pipe, world: ShapesWorld, out_dir: Union[str, os.PathLike],
                    settings: ShapesEvalSettings = ShapesEvalSettings(), *, model_path: Optional[str] = None,
                    progress: bool = False) -> dict[str, Any]:
    """Sample and score every held-out prompt of ``world``; write ``scores.json`` and grids into ``out_dir``.

    Args:
        pipe: a :class:`~fusedit.pipeline.FuseDiTPipeline` (or any callable with its conventions).
        world: the shapes world the model was trained on (:func:`world_from_config`).
        out_dir: output folder (created).
        settings: sampling settings.
        model_path: recorded in ``scores.json``.

    Returns:
        The contents of ``scores.json``.
    """
    from fusedit.eval.shapes_scorer import as_uint8_images, score_image, score_images

    settings.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = world.held_out_prompts()
    if not specs:
        raise ValueError("this shapes world holds out no prompts (data.shapes.held_out_fraction is 0); "
                         "there is nothing to evaluate on")
    defaults = getattr(pipe, "defaults", None)
    steps = settings.num_inference_steps or getattr(defaults, "num_inference_steps", None)
    cfg = settings.guidance_scale if settings.guidance_scale is not None else getattr(defaults, "guidance_scale", None)
    negative = settings.negative_prompt if settings.negative_prompt is not None else getattr(defaults, "negative_prompt", "")
    resolved = ShapesEvalSettings(**{**asdict(settings), "num_inference_steps": steps, "guidance_scale": cfg,
                                     "negative_prompt": negative})
    counts = images_per_prompt(specs, settings.per_prompt, settings.min_per_category)
    stride = max(counts)
    seeds = [prompt_seeds(settings.seed, i, n, stride) for i, n in enumerate(counts)]
    jobs = [(spec.text, s) for spec, prompt_seeds_ in zip(specs, seeds) for s in prompt_seeds_]
    images = sample_jobs(pipe, jobs, world.resolution, resolved, progress=progress)
    expanded = [spec for spec, n in zip(specs, counts) for _ in range(n)]
    scores = score_images(images, expanded)
    uint8 = as_uint8_images(images)
    per_prompt, start, recalls, precisions = [], 0, [], []
    for spec, n, prompt_seeds_ in zip(specs, counts, seeds):
        chunk = uint8[start:start + n]
        start += n
        entry = {"prompt": spec.text, "category": spec.category, "seeds": prompt_seeds_,
                 "correct": [bool(score_image(im, spec)) for im in chunk]}
        alignment = [color_alignment(im, spec) for im in chunk]
        if alignment[0] is not None:
            entry["color_recall"] = [a[0] for a in alignment]
            entry["color_precision"] = [a[1] for a in alignment]
            recalls += entry["color_recall"]
            precisions += entry["color_precision"]
        per_prompt.append(entry)
    result: dict[str, Any] = {"suite": "shapes", **scores}
    if recalls:
        result["color_recall"] = float(np.mean(recalls))
        result["color_precision"] = float(np.mean(precisions))
    np.savez_compressed(out / "images.npz", images=np.stack(uint8),
                        prompts=np.array([spec.text for spec, n in zip(specs, counts) for _ in range(n)]))
    if settings.pixel_fd:
        real = render_specs(world, specs, counts, settings.seed)
        result["fd_pixels"] = pixel_frechet_distance(np.stack(uint8), real)
    result["grids"] = save_category_grids(images, specs, counts, out, settings.grid_prompts)
    result["settings"] = {
        "model": model_path,
        "prompts": "held_out",
        "num_prompts": len(specs),
        "per_prompt": settings.per_prompt,
        "min_per_category": settings.min_per_category,
        "seed": settings.seed,
        "seed_stride": stride,
        "seed_rule": "seed + prompt_index * seed_stride + k",
        "num_inference_steps": steps,
        "guidance_scale": cfg,
        "negative_prompt": negative,
        "resolution": world.resolution,
        "shapes": asdict(world.config),
    }
    result["per_prompt"] = per_prompt
    tmp = out / f".{SCORES_NAME}.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out / SCORES_NAME)
    return result


def format_scores(scores: dict[str, Any]) -> str:
    """A few human-readable lines summarising ``scores.json``."""
    lines = [f"overall {scores['overall']:.3f} on {scores['num_images']} images"]
    for category, acc in scores["accuracy"].items():
        lines.append(f"  {category:<14} {acc:.3f} ({scores['correct'][category]}/{scores['total'][category]})")
    if "color_recall" in scores:
        lines.append(f"  color recall   {scores['color_recall']:.3f}, precision {scores['color_precision']:.3f}")
    if "fd_pixels" in scores and not math.isnan(scores["fd_pixels"]):
        lines.append(f"  pixel FD       {scores['fd_pixels']:.4f} (lower is better; not Inception FID)")
    return "\n".join(lines)
