"""The shapes-world evaluation suite: sample every held-out prompt, score it with the detector next to its controls,
save grids.

The held-out prompts of a shapes world (:meth:`fusedit.data.shapes.ShapesWorld.held_out_prompts`) never appear in
training, so the suite measures compositional generalisation, GenEval style, per category. Scoring, confidence
intervals and controls are :mod:`fusedit.eval.shapes_report`'s.

Images per prompt. Every prompt gets ``per_prompt`` images, or more in a category with few held-out prompts:
``n_c = max(per_prompt, ceil(min_per_category / prompts in c))`` (GenEval's overall score weighs every category
equally, so a category of one prompt would otherwise decide it with a few images). ``min_per_category`` defaults to
50; a category left with fewer images is refused unless ``allow_small``.

Seeds. Prompt ``i`` (in the world's held-out order) has stride ``s = max_c n_c`` (``per_prompt`` without minimum); its
``k``-th image starts from the noise of ``torch.Generator().manual_seed(seed + i * s + k)`` (the convention of
:mod:`fusedit.eval.benchmarks`), so every image can be regenerated alone.

Outputs in ``out_dir``:

* ``scores.json``: the :func:`~fusedit.eval.shapes_report.summary_json` document (overall with its 95 % CI, per
  category accuracy / n / CI, the controls, color following, background error, the reproducibility manifest), plus
  ``accuracy``/``correct``/``total`` per category, ``num_images``, ``color_recall``/``color_precision``, optionally
  ``fd_pixels`` (:func:`pixel_frechet_distance`), ``settings`` and ``per_prompt`` (prompt, category, seeds,
  per-image correctness);
* ``images.npz``: every sample (``images`` ``uint8 (N, R, R, 3)``, prompt-major, and their ``prompts``), for
  re-scoring without re-sampling;
* ``grid-<category>.png``: one row per example prompt (up to ``grid_prompts``), its first images (up to 8) side by
  side, and ``grid-<category>.txt`` naming each row's prompt.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusedit.atomic import write_text_atomic
from fusedit.data.shapes import PromptSpec, ShapesWorld
from fusedit.eval.fid import fid_from_features
from fusedit.eval.manifest import code_version, prompt_set_hash, sampling_manifest
from fusedit.eval.shapes_controls_worker import ControlsInBackground, controls_for_evaluation
from fusedit.eval.shapes_report import format_report, score_and_report
from fusedit.eval.shapes_scorer import as_uint8_images
from fusedit.eval.shapes_stats import MIN_IMAGES_PER_CATEGORY, check_category_sizes
from fusedit.train.logging import save_image_grid

SCORES_NAME = "scores.json"

#: The shapes suite's prompt sets: the held-out prompts (the benchmark) or the training prompts.
PROMPT_SETS = ("held_out", "training")


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
        allow_small: score categories with fewer than 50 images anyway (refused otherwise).
        controls: also score every control (:mod:`fusedit.eval.shapes_controls`) on the same prompts.
        controls_in_background: score the controls in a second process while the model samples
            (:mod:`fusedit.eval.shapes_controls_worker`; the same table): faster where a core is idle during
            sampling, as in the demo.
        prompt_set: ``held_out`` (the benchmark: prompts never seen in training) or ``training`` (the prompts the
            model was trained on, each with the same number of images: what it learned to draw, against which the
            held-out score measures generalisation).
    """

    per_prompt: int = 4
    seed: int = 0
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    batch_size: int = 64
    grid_prompts: int = 8
    pixel_fd: bool = True
    min_per_category: int = MIN_IMAGES_PER_CATEGORY
    allow_small: bool = False
    controls: bool = True
    controls_in_background: bool = False
    prompt_set: str = "held_out"

    def validate(self) -> None:
        if self.prompt_set not in PROMPT_SETS:
            raise ValueError(f"prompt set must be one of {', '.join(PROMPT_SETS)}, got {self.prompt_set!r}")
        if self.per_prompt < 1:
            raise ValueError(f"per_prompt must be >= 1, got {self.per_prompt}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.num_inference_steps}")
        if self.guidance_scale is not None and not self.guidance_scale >= 1:
            raise ValueError(f"cfg must be >= 1 (1 = no guidance), got {self.guidance_scale}")
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
        raise ValueError(
            "the shapes suite needs a fusedit run or exported pipeline (its config.yaml names the shapes "
            "world); this model has no fusedit config (a reference folder?)"
        )
    if config.data.source != "shapes":
        raise ValueError(
            f"the shapes suite evaluates models trained on the shapes world, but this model was trained "
            f"on data.source={config.data.source!r}; use --suite geneval/dpgbench/fid/clip instead"
        )
    return ShapesWorld(config.data.shapes, config.data.resolution)


def images_per_prompt(specs: Sequence[PromptSpec], per_prompt: int, min_per_category: int = 0) -> list[int]:
    """How many images each prompt gets (see the module docstring)."""
    counts: dict[str, int] = {}
    for spec in specs:
        counts[spec.category] = counts.get(spec.category, 0) + 1
    return [max(per_prompt, math.ceil(min_per_category / counts[spec.category])) for spec in specs]


def prompt_seeds(seed: int, index: int, count: int, stride: int | None = None) -> list[int]:
    """Seeds of the ``count`` images of the ``index``-th prompt (``stride``: seeds reserved per prompt)."""
    stride = count if stride is None else stride
    return [seed + index * stride + k for k in range(count)]


def sample_jobs(
    pipe, jobs: Sequence[tuple[str, int]], resolution: int, settings: ShapesEvalSettings, progress: bool = False
) -> torch.Tensor:
    """Images ``(len(jobs), 3, R, R)`` in ``[-1, 1]`` for ``(prompt, seed)`` jobs, one generator per image."""
    out = []
    for start in range(0, len(jobs), settings.batch_size):
        batch = jobs[start : start + settings.batch_size]
        generators = [torch.Generator(device=pipe.device).manual_seed(s) for _, s in batch]
        result = pipe(
            [p for p, _ in batch],
            negative_prompt=settings.negative_prompt,
            height=resolution,
            width=resolution,
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            generator=generators,
            output_type="pt",
        )
        out.append(result.images.float().cpu() * 2 - 1)
        if progress:
            print(f"  sampled {min(start + len(batch), len(jobs))}/{len(jobs)} images", flush=True)
    return torch.cat(out)


def render_specs(world: ShapesWorld, specs: Sequence[PromptSpec], counts: Sequence[int], seed: int) -> np.ndarray:
    """Real shapes-world images of ``specs`` (``counts[i]`` of prompt ``i``, prompt-major), ``uint8 (N, R, R, 3)``."""
    rng = np.random.default_rng([seed, 4242])
    return np.stack([world.render(spec, rng) for spec, n in zip(specs, counts, strict=False) for _ in range(n)])


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
    return fid_from_features(_pooled_pixels(fake), _pooled_pixels(real))


def save_category_grids(
    images: torch.Tensor,
    specs: Sequence[PromptSpec],
    counts: Sequence[int],
    out_dir: Path,
    grid_prompts: int,
    max_columns: int = 8,
) -> dict[str, str]:
    """``grid-<category>.png`` (+ ``.txt`` with the row prompts) for every category; returns category → file name.

    ``images`` are prompt-major, ``counts[i]`` of prompt ``i``; a row shows a prompt's first images.
    """
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)
    grids = {}
    for category in dict.fromkeys(spec.category for spec in specs):
        rows = [i for i, spec in enumerate(specs) if spec.category == category][:grid_prompts]
        columns = min(max_columns, min(counts[i] for i in rows))
        tiles = torch.cat([images[starts[i] : starts[i] + columns] for i in rows])
        name = f"grid-{category}.png"
        save_image_grid(tiles, out_dir / name, nrow=columns)
        (out_dir / f"grid-{category}.txt").write_text(
            "".join(f"row {r}: {specs[i].text}\n" for r, i in enumerate(rows))
        )
        grids[category] = name
    return grids


def evaluate_shapes(
    pipe,
    world: ShapesWorld,
    out_dir: str | os.PathLike,
    settings: ShapesEvalSettings = ShapesEvalSettings(),
    *,
    model_path: str | None = None,
    progress: bool = False,
    pending_controls: ControlsInBackground | None = None,
) -> dict[str, Any]:
    """Sample and score every held-out prompt of ``world`` (or every training prompt: ``settings.prompt_set``), with
    the controls; write ``scores.json``, ``images.npz`` and grids into ``out_dir``.

    Args:
        pipe: a :class:`~fusedit.sampling.pipeline.FuseDiTPipeline` (or any callable with its conventions).
        world: the shapes world the model was trained on (:func:`world_from_config`).
        out_dir: output folder (created).
        settings: sampling settings.
        model_path: recorded in ``scores.json``.
        pending_controls: the controls, already being scored in the background for this evaluation's prompts
            (``SamplingPlan.for_world(world, settings).expanded``) and ``settings.seed``; None: scored here (in the
            background while sampling with ``settings.controls_in_background``).

    Returns:
        The contents of ``scores.json``: the :func:`~fusedit.eval.shapes_report.summary_json` document plus the
        per-prompt results, ``accuracy``/``correct``/``total`` per category, ``num_images``, ``settings``, ``grids``.

    Raises:
        ValueError: a category would get fewer than 50 images and ``settings.allow_small`` is off; or
            ``pending_controls`` were started for other prompts or another seed, or with ``settings.controls`` off.
    """
    settings.validate()
    plan = SamplingPlan.for_world(world, settings)
    resolved = _resolve_sampling(pipe, settings)
    pending = controls_for_evaluation(
        world, plan.expanded, settings.seed, settings.controls, settings.controls_in_background, pending_controls
    )
    try:
        images = sample_jobs(pipe, plan.jobs, world.resolution, resolved, progress=progress)
        uint8 = as_uint8_images(images)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        extra: dict[str, Any] = {"suite": "shapes"}
        if settings.pixel_fd:
            real = render_specs(world, plan.specs, plan.counts, settings.seed)
            extra["fd_pixels"] = pixel_frechet_distance(np.stack(uint8), real)
        extra["grids"] = save_category_grids(images, plan.specs, plan.counts, out, settings.grid_prompts)
        control_table = pending.result() if pending is not None else None
    except BaseException:
        if pending is not None:
            pending.cancel()
        raise
    manifest = _evaluation_manifest(pipe, world, plan, resolved, settings, model_path)
    result = score_and_report(world, uint8, plan.expanded, manifest, settings.controls, extra, control_table)
    result["settings"] = _settings_record(world, plan, resolved, model_path)
    result["per_prompt"] = plan.per_prompt_results(result.pop("correct_per_image"))
    np.savez_compressed(out / "images.npz", images=np.stack(uint8), prompts=np.array([s.text for s in plan.expanded]))
    write_json_atomic(out / SCORES_NAME, result)
    return result


def _evaluation_manifest(
    pipe, world: ShapesWorld, plan: SamplingPlan, resolved, settings: ShapesEvalSettings, model_path: str | None
) -> dict:
    """The reproducibility manifest of one evaluation: code, sampler, seeds, resolution, model and prompt set."""
    return {
        **code_version(),
        **sampling_manifest(
            pipe,
            steps=resolved.num_inference_steps,
            guidance_scale=resolved.guidance_scale,
            negative_prompt=resolved.negative_prompt,
            seed_rule=SEED_RULE,
            base_seed=settings.seed,
            resolution=world.resolution,
        ),
        "model": model_path,
        "seed_stride": plan.stride,
        **prompt_manifest(plan.specs, plan.counts, settings.prompt_set),
    }


def prompts_of(world: ShapesWorld, prompt_set: str) -> list[PromptSpec]:
    """The prompts of ``world`` in ``prompt_set`` (one of :data:`PROMPT_SETS`)."""
    return world.training_prompts() if prompt_set == "training" else world.held_out_prompts()


#: How image ``k`` of the ``i``-th prompt gets its seed (recorded in every manifest).
SEED_RULE = "seed + prompt_index * seed_stride + k"


@dataclass(frozen=True)
class SamplingPlan:
    """Which prompts an evaluation samples, how many images each, and their seeds (see the module docstring)."""

    specs: list[PromptSpec]
    counts: list[int]
    seeds: list[list[int]]

    @classmethod
    def for_world(cls, world: ShapesWorld, settings: ShapesEvalSettings) -> SamplingPlan:
        """The prompts of ``world`` in ``settings.prompt_set``; refuses categories under 50 images unless
        ``settings.allow_small``."""
        specs = prompts_of(world, settings.prompt_set)
        if not specs:
            raise ValueError(
                "this shapes world holds out no prompts (data.shapes.held_out_fraction is 0); "
                "there is nothing to evaluate on"
            )
        return cls.of_specs(specs, settings)

    @classmethod
    def of_specs(cls, specs: list[PromptSpec], settings: ShapesEvalSettings) -> SamplingPlan:
        """``specs`` with their images per prompt and seeds (refusing small categories, as :meth:`for_world`)."""
        counts = images_per_prompt(specs, settings.per_prompt, settings.min_per_category)
        check_category_sizes(category_counts(specs, counts), settings.allow_small)
        stride = max(counts)
        return cls(specs, counts, [prompt_seeds(settings.seed, i, n, stride) for i, n in enumerate(counts)])

    @property
    def stride(self) -> int:
        return max(self.counts)

    @property
    def jobs(self) -> list[tuple[str, int]]:
        """``(prompt, seed)`` of every image, prompt-major."""
        return [(spec.text, s) for spec, seeds in zip(self.specs, self.seeds, strict=False) for s in seeds]

    @property
    def expanded(self) -> list[PromptSpec]:
        """The spec of every image, prompt-major."""
        return [spec for spec, n in zip(self.specs, self.counts, strict=False) for _ in range(n)]

    def per_prompt_results(self, correct: Sequence[bool]) -> list[dict[str, Any]]:
        """``[{"prompt", "category", "seeds", "correct": [bool per image]}]`` in prompt order."""
        entries, start = [], 0
        for spec, n, seeds in zip(self.specs, self.counts, self.seeds, strict=False):
            entries.append(
                {
                    "prompt": spec.text,
                    "category": spec.category,
                    "seeds": seeds,
                    "correct": list(correct[start : start + n]),
                }
            )
            start += n
        return entries


def _settings_record(
    world: ShapesWorld, plan: SamplingPlan, resolved: ShapesEvalSettings, model_path: str | None
) -> dict[str, Any]:
    """The ``settings`` entry of ``scores.json`` (what a study compares before reusing an evaluation)."""
    return {
        "model": model_path,
        "prompts": resolved.prompt_set,
        "num_prompts": len(plan.specs),
        "per_prompt": resolved.per_prompt,
        "min_per_category": resolved.min_per_category,
        "seed": resolved.seed,
        "seed_stride": plan.stride,
        "seed_rule": SEED_RULE,
        "num_inference_steps": resolved.num_inference_steps,
        "guidance_scale": resolved.guidance_scale,
        "negative_prompt": resolved.negative_prompt,
        "resolution": world.resolution,
        "shapes": asdict(world.config),
    }


def _resolve_sampling(pipe, settings: ShapesEvalSettings) -> ShapesEvalSettings:
    """``settings`` with the pipeline's defaults filled in where they are None."""
    defaults = getattr(pipe, "defaults", None)
    steps = settings.num_inference_steps or getattr(defaults, "num_inference_steps", None)
    cfg = settings.guidance_scale if settings.guidance_scale is not None else getattr(defaults, "guidance_scale", None)
    negative = (
        settings.negative_prompt if settings.negative_prompt is not None else getattr(defaults, "negative_prompt", "")
    )
    return ShapesEvalSettings(
        **{**asdict(settings), "num_inference_steps": steps, "guidance_scale": cfg, "negative_prompt": negative}
    )


def category_counts(specs: Sequence[PromptSpec], counts: Sequence[int]) -> dict[str, int]:
    """Images per category when prompt ``i`` gets ``counts[i]`` images."""
    totals: dict[str, int] = {}
    for spec, n in zip(specs, counts, strict=False):
        totals[spec.category] = totals.get(spec.category, 0) + n
    return totals


def prompt_manifest(specs: Sequence[PromptSpec], counts: Sequence[int], prompts: str) -> dict[str, Any]:
    """The prompt part of a manifest: which prompt set, its hash, the images per category."""
    return {
        "prompts": prompts,
        "num_prompts": len(specs),
        "prompt_set_hash": prompt_set_hash([s.text for s in specs], counts),
        "images_per_category": category_counts(specs, counts),
    }


def write_json_atomic(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as indented JSON, atomically (:func:`fusedit.atomic.write_text_atomic`); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")
    return path


def format_scores(scores: dict[str, Any]) -> str:
    """A few human-readable lines summarising ``scores.json`` (the score, its CIs and its controls)."""
    return format_report(scores)
