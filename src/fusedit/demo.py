"""``fusedit demo``: the embedded default, end to end, on any laptop.

1. builds the shapes world (procedural images + captions, with held-out prompts);
2. pretrains (or reuses) a tiny Gemma 2 LLM on the training captions, each followed by a restatement of its
   content, with the scene objective (its values at a position caption's last token must say which object goes
   where), and saves it with ``save_pretrained``;
3. trains a deep-fusion DiT on it, loading the LLM through the same loader real LLMs use;
4. samples a grid for held-out prompts (never seen in training), then evaluates the full held-out suite with the
   shapes-world detector next to its controls (:mod:`fusedit.eval.shapes_eval`), writing the summary to
   ``<run>/eval/shapes.json``;
5. prints the score with its confidence interval and controls, and the paths of the grid, the run and its logs.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from fusedit.builders import resolve_relative_paths
from fusedit.config import ConfigError
from fusedit.data.shapes import PromptSpec, ShapesWorld
from fusedit.eval.shapes_controls_worker import ControlsInBackground
from fusedit.eval.shapes_eval import (
    SamplingPlan,
    ShapesEvalSettings,
    evaluate_shapes,
    format_scores,
    write_json_atomic,
)
from fusedit.eval.shapes_report import summary_keys
from fusedit.experiment import ExperimentConfig, load_experiment
from fusedit.sampling.loading import load_pipeline
from fusedit.text.tiny_llm import TinyLLMConfig, ensure_shapes_world_llm, read_marker
from fusedit.train.launch import train_run
from fusedit.train.logging import save_image_grid

#: The demo's evaluation: the full held-out suite with every control, the run's sampler settings.
EVAL_SETTINGS = ShapesEvalSettings()


def held_out_examples(world: ShapesWorld, per_category: int = 2) -> list[PromptSpec]:
    """A few held-out prompt specs of every category (deterministic)."""
    chosen = []
    for category in world.categories:
        specs = world.held_out_prompts(category)
        chosen += specs[:per_category]
    return chosen


def stale_run_reason(run_dir: Path, config: ExperimentConfig, llm_retrained: bool) -> str | None:
    """Why the demo run already in ``run_dir`` must not be resumed with ``config`` (None: resume it, or none there).

    Resuming is right after an interruption; it would silently be wrong after the demo's settings or its tiny LLM
    changed (e.g. an upgrade of fusedit): the checkpoints were trained on other text features or data.
    """
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return None
    if llm_retrained:
        return "the tiny LLM it was trained with has been retrained"
    try:
        saved = load_experiment(saved_path)
    except (ConfigError, OSError, ValueError):
        return "its config.yaml cannot be read by this version of fusedit"
    if saved != resolve_relative_paths(config, Path.cwd()):
        return "it was trained with other settings"
    return None


def set_aside_stale_run(run_dir: Path, config: ExperimentConfig, llm_retrained: bool) -> Path | None:
    """Move a stale demo run (:func:`stale_run_reason`) to ``<run_dir>.previous`` (replacing an older one) and say
    so; returns the new location, or None when the run can be resumed."""
    reason = stale_run_reason(run_dir, config, llm_retrained)
    if reason is None:
        return None
    previous = run_dir.with_name(run_dir.name + ".previous")
    if previous.exists():
        shutil.rmtree(previous)
    run_dir.rename(previous)
    print(f"      {run_dir} was not resumed: {reason}; it was moved to {previous} and training starts over")
    return previous


def run_demo(
    out: Path,
    *,
    device: str | None = None,
    steps: int | None = None,
    overrides: Sequence[str] = (),
    images_per_prompt: int = 4,
) -> dict:
    """The demo's stages in order (module docstring); returns the evaluation's summary document."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    base = load_experiment("demo", list(overrides))
    world = ShapesWorld(base.data.shapes, base.data.resolution)
    print(
        f"[1/4] shapes world: {len(world.training_prompts())} training prompts, "
        f"{len(world.held_out_prompts())} held out, {base.data.resolution}px"
    )
    # the controls depend on the world alone: scored on the second core while the tiny LLM trains on the first
    controls = ControlsInBackground.start(
        world, SamplingPlan.for_world(world, EVAL_SETTINGS).expanded, EVAL_SETTINGS.seed
    )
    threads = torch.get_num_threads()
    try:
        llm_dir, retrained = pretrain_tiny_llm(out / "tiny-llm", world)
        extra = [f"text.llm={llm_dir}"] + ([f"train.max_steps={steps}"] if steps else [])
        config = load_experiment("demo", list(overrides) + extra)
        run_dir = out / "fusedit"
        train_demo(config, run_dir, device, llm_retrained=retrained)
        print("[4/4] sampling held-out prompts, and the full held-out suite next to its controls")
        # every core samples now: the data worker is gone and the controls were scored during stage 2
        torch.set_num_threads(threads)
        pipe = load_pipeline(run_dir, device=device)
        grid = sample_demo_grid(pipe, world, run_dir, images_per_prompt)
        summary, summary_path = evaluate_demo(pipe, world, run_dir, controls)
    except BaseException:
        controls.cancel()
        raise
    print()
    print(format_scores(summary))
    print()
    print(f"grid:    {grid}  (rows: {run_dir / 'demo_grid.txt'}; every category: {run_dir / 'eval'}/grid-*.png)")
    print(f"scores:  {summary_path}")
    print(f"run:     {run_dir}")
    print(
        f"logs:    {run_dir / 'logs'}  (tensorboard --logdir {run_dir / 'logs'}); metrics {run_dir / 'metrics.jsonl'}"
    )
    print(f"took {(time.perf_counter() - started) / 60:.1f} min")
    return summary


def pretrain_tiny_llm(folder: Path, world: ShapesWorld) -> tuple[Path, bool]:
    """Stage 2: pretrain (or reuse) the tiny LLM in ``folder``; returns its folder and whether it was retrained."""
    print(
        "[2/4] tiny LLM (Gemma 2 architecture) on the training captions and their restatements, with the scene "
        "objective"
    )
    # One thread: at this size (width 128, sequences of ~12 tokens) a second thread adds synchronisation, not speed,
    # and on a busy machine two spinning threads per process slow training down several-fold.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    marker_before = read_marker(folder)
    try:
        llm_dir = ensure_shapes_world_llm(folder, world, TinyLLMConfig())
    finally:
        torch.set_num_threads(threads)
    return llm_dir, read_marker(llm_dir) != marker_before


def train_demo(config: ExperimentConfig, run_dir: Path, device: str | None, llm_retrained: bool) -> None:
    """Stage 3: train (or resume) the demo's DiT in ``run_dir`` (a stale run is set aside first)."""
    set_aside_stale_run(run_dir, config, llm_retrained=llm_retrained)
    # One training thread: at this size a second thread adds synchronisation rather than speed (measured), and the
    # scenes are drawn by data.num_workers on the other core.
    torch.set_num_threads(1)
    positions = config.model.pos_embed + (" + sin-cos table" if config.model.absolute_pos_embed else "")
    print(
        f"[3/4] training deep fusion ({positions}, {config.model.timestep_conditioning} timestep "
        f"conditioning) for {config.train.max_steps} steps -> {run_dir}"
    )
    train_run(config, run_dir, device=device)


def sample_demo_grid(pipe, world: ShapesWorld, run_dir: Path, images_per_prompt: int) -> Path:
    """A grid of two held-out prompts per category (``images_per_prompt`` each): ``<run>/demo_grid.png`` and the
    prompt of each row in ``demo_grid.txt``."""
    prompts = [spec.text for spec in held_out_examples(world)]
    generator = torch.Generator(device=pipe.device).manual_seed(1234)
    images = pipe(prompts, num_images_per_prompt=images_per_prompt, generator=generator, output_type="pt").images
    grid = save_image_grid(images * 2 - 1, run_dir / "demo_grid.png", nrow=images_per_prompt)
    (run_dir / "demo_grid.txt").write_text("\n".join(f"row {i}: {p}" for i, p in enumerate(prompts)) + "\n")
    return grid


def evaluate_demo(
    pipe, world: ShapesWorld, run_dir: Path, controls: ControlsInBackground | None = None
) -> tuple[dict, Path]:
    """The full held-out suite with its controls (:data:`EVAL_SETTINGS`): ``scores.json``, grids and images in
    ``<run>/eval``, the summary document in ``<run>/eval/shapes.json``.

    ``controls``: the controls, already scored in a second process for :data:`EVAL_SETTINGS` (the demo starts them
    with the world, so that they take no time of their own: they are about half of an evaluation's time on one core;
    the same table either way); None: scored here."""
    scores = evaluate_shapes(
        pipe, world, run_dir / "eval", EVAL_SETTINGS, model_path=str(run_dir), pending_controls=controls
    )
    summary = {key: scores[key] for key in summary_keys(scores)}
    return summary, write_json_atomic(run_dir / "eval" / "shapes.json", summary)
