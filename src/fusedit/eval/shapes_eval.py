"""The shapes-world evaluation suite: sample every held-out prompt, score it with the detector, save grids.

The held-out prompts of a shapes world (:meth:`fusedit.data.shapes.ShapesWorld.held_out_prompts`) never appear in
training, so the suite measures compositional generalisation, GenEval style, per category.

Seeds. Prompt ``i`` (in the world's held-out order) gets ``per_prompt`` images; its ``k``-th image starts from the
noise of ``torch.Generator().manual_seed(seed + i * per_prompt + k)`` (the convention of
:mod:`fusedit.eval.benchmarks`), so every image can be regenerated alone.

Outputs in ``out_dir``:

* ``scores.json``: ``overall`` (mean of the per-category accuracies), ``accuracy``/``correct``/``total`` per
  category, ``num_images``, ``settings`` (seed, images per prompt, steps, CFG, negative prompt, resolution, the
  shapes world's settings, the model path) and ``per_prompt`` (prompt, category, seeds, per-image correctness);
  optionally ``fd_pixels`` (see :func:`pixel_frechet_distance`);
* ``grid-<category>.png``: one row per example prompt (up to ``grid_prompts``), its ``per_prompt`` images side by
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
    """

    per_prompt: int = 4
    seed: int = 0
    num_inference_steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    negative_prompt: Optional[str] = None
    batch_size: int = 64
    grid_prompts: int = 8
    pixel_fd: bool = True

    def validate(self) -> None:
        if self.per_prompt < 1:
            raise ValueError(f"per_prompt must be >= 1, got {self.per_prompt}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.num_inference_steps}")
        if self.guidance_scale is not None and self.guidance_scale < 0:
            raise ValueError(f"cfg must be >= 0, got {self.guidance_scale}")
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


def prompt_seeds(seed: int, index: int, per_prompt: int) -> list[int]:
    """Seeds of the images of the ``index``-th prompt."""
    return [seed + index * per_prompt + k for k in range(per_prompt)]


def sample_specs(pipe, specs: Sequence[PromptSpec], resolution: int, settings: ShapesEvalSettings,
                 progress: bool = False) -> torch.Tensor:
    """Images ``(len(specs) * per_prompt, 3, R, R)`` in ``[-1, 1]``, prompt-major, seeded per image."""
    jobs = [(spec.text, s) for i, spec in enumerate(specs)
            for s in prompt_seeds(settings.seed, i, settings.per_prompt)]
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


def render_specs(world: ShapesWorld, specs: Sequence[PromptSpec], per_prompt: int, seed: int) -> np.ndarray:
    """Real shapes-world images of ``specs`` (``per_prompt`` each, prompt-major), ``uint8 (N, R, R, 3)``."""
    rng = np.random.default_rng([seed, 4242])
    return np.stack([world.render(spec, rng) for spec in specs for _ in range(per_prompt)])


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


def save_category_grids(images: torch.Tensor, specs: Sequence[PromptSpec], per_prompt: int, out_dir: Path,
                        grid_prompts: int) -> dict[str, str]:
    """``grid-<category>.png`` (+ ``.txt`` with the row prompts) for every category; returns category → file name."""
    from fusedit.train.logging import save_image_grid

    grids = {}
    categories = list(dict.fromkeys(spec.category for spec in specs))
    for category in categories:
        rows = [i for i, spec in enumerate(specs) if spec.category == category][:grid_prompts]
        tiles = torch.cat([images[i * per_prompt:(i + 1) * per_prompt] for i in rows])
        name = f"grid-{category}.png"
        save_image_grid(tiles, out_dir / name, nrow=per_prompt)
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
    images = sample_specs(pipe, specs, world.resolution, resolved, progress=progress)
    expanded = [spec for spec in specs for _ in range(settings.per_prompt)]
    scores = score_images(images, expanded)
    uint8 = as_uint8_images(images)
    per_prompt = []
    for i, spec in enumerate(specs):
        chunk = uint8[i * settings.per_prompt:(i + 1) * settings.per_prompt]
        per_prompt.append({"prompt": spec.text, "category": spec.category,
                           "seeds": prompt_seeds(settings.seed, i, settings.per_prompt),
                           "correct": [bool(score_image(im, spec)) for im in chunk]})
    result: dict[str, Any] = {"suite": "shapes", **scores}
    if settings.pixel_fd:
        real = render_specs(world, specs, settings.per_prompt, settings.seed)
        result["fd_pixels"] = pixel_frechet_distance(np.stack(uint8), real)
    result["grids"] = save_category_grids(images, specs, settings.per_prompt, out, settings.grid_prompts)
    result["settings"] = {
        "model": model_path,
        "prompts": "held_out",
        "num_prompts": len(specs),
        "per_prompt": settings.per_prompt,
        "seed": settings.seed,
        "seed_rule": "seed + prompt_index * per_prompt + k",
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
    if "fd_pixels" in scores and not math.isnan(scores["fd_pixels"]):
        lines.append(f"  pixel FD       {scores['fd_pixels']:.4f} (lower is better; not Inception FID)")
    return "\n".join(lines)
