"""``fusedit demo``: the embedded default, end to end, on any laptop.

1. builds the shapes world (procedural images + captions, with held-out prompts);
2. pretrains (or reuses) a tiny Gemma 2 LLM on the training captions, each followed by a restatement of its
   content, with the scene objective (its values at a position caption's last token must say which object goes
   where), and saves it with ``save_pretrained``;
3. trains a deep-fusion DiT on it, loading the LLM through the same loader real LLMs use;
4. samples a grid for held-out prompts (never seen in training) and scores them with the shapes-world detector;
5. prints the paths of the grid, the run and its logs.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from fusedit.experiment import load_experiment


def held_out_examples(world, per_category: int = 2) -> list:
    """A few held-out prompt specs of every category (deterministic)."""
    chosen = []
    for category in world.categories:
        specs = world.held_out_prompts(category)
        chosen += specs[:per_category]
    return chosen


def stale_run_reason(run_dir: Path, config, llm_retrained: bool) -> Optional[str]:
    """Why the demo run already in ``run_dir`` must not be resumed with ``config`` (None: resume it, or none there).

    Resuming is right after an interruption; it would silently be wrong after the demo's settings or its tiny LLM
    changed (e.g. an upgrade of fusedit): the checkpoints were trained on other text features or data.
    """
    from fusedit.builders import resolve_relative_paths
    from fusedit.config import ConfigError

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


def set_aside_stale_run(run_dir: Path, config, llm_retrained: bool) -> Optional[Path]:
    """Move a stale demo run (:func:`stale_run_reason`) to ``<run_dir>.previous`` (replacing an older one) and say
    so; returns the new location, or None when the run can be resumed."""
    import shutil

    reason = stale_run_reason(run_dir, config, llm_retrained)
    if reason is None:
        return None
    previous = run_dir.with_name(run_dir.name + ".previous")
    if previous.exists():
        shutil.rmtree(previous)
    run_dir.rename(previous)
    print(f"      {run_dir} was not resumed: {reason}; it was moved to {previous} and training starts over")
    return previous


def run_demo(out: Path, *, device: Optional[str] = None, steps: Optional[int] = None,
             overrides: Sequence[str] = (), images_per_prompt: int = 4) -> dict:
    from fusedit.data.shapes import ShapesWorld
    from fusedit.eval.shapes_scorer import score_images
    from fusedit.sampling.loading import load_pipeline
    from fusedit.train.launch import train_run
    from fusedit.text.tiny_llm import TinyLLMConfig, ensure_shapes_world_llm, read_marker
    from fusedit.train.logging import save_image_grid

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    base = load_experiment("demo", list(overrides))
    world = ShapesWorld(base.data.shapes, base.data.resolution)
    print(f"[1/4] shapes world: {len(world.training_prompts())} training prompts, "
          f"{len(world.held_out_prompts())} held out, {base.data.resolution}px")

    print("[2/4] tiny LLM (Gemma 2 architecture) on the training captions and their restatements, with the scene "
          "objective")
    # One thread: at this size (width 128, sequences of ~12 tokens) a second thread adds synchronisation, not speed,
    # and on a busy machine two spinning threads per process slow training down several-fold.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    marker_before = read_marker(out / "tiny-llm")
    try:
        llm_dir = ensure_shapes_world_llm(out / "tiny-llm", world, TinyLLMConfig())
    finally:
        torch.set_num_threads(threads)
    extra = [f"text.llm={llm_dir}"] + ([f"train.max_steps={steps}"] if steps else [])
    config = load_experiment("demo", list(overrides) + extra)

    run_dir = out / "fusedit"
    set_aside_stale_run(run_dir, config, llm_retrained=read_marker(llm_dir) != marker_before)
    busy = os.getloadavg()[0] > 1.5 if hasattr(os, "getloadavg") else False
    if busy and torch.get_num_threads() > 1:
        # Several processes each spinning two threads on two cores slow every step down many-fold.
        print(f"      the machine is busy (load average {os.getloadavg()[0]:.1f}): training on 1 thread")
        torch.set_num_threads(1)
    positions = config.model.pos_embed + (" + sin-cos table" if config.model.absolute_pos_embed else "")
    print(f"[3/4] training deep fusion ({positions}, {config.model.timestep_conditioning} timestep "
          f"conditioning) for {config.train.max_steps} steps -> {run_dir}")
    train_run(config, run_dir, device=device)

    print("[4/4] sampling held-out prompts")
    pipe = load_pipeline(run_dir, device=device)
    specs = held_out_examples(world)
    prompts = [spec.text for spec in specs]
    generator = torch.Generator(device=pipe.device).manual_seed(1234)
    images = pipe(prompts, num_images_per_prompt=images_per_prompt, generator=generator, output_type="pt").images
    grid = save_image_grid(images * 2 - 1, run_dir / "demo_grid.png", nrow=images_per_prompt)
    (run_dir / "demo_grid.txt").write_text("\n".join(f"row {i}: {p}" for i, p in enumerate(prompts)) + "\n")
    scores = score_images(images * 2 - 1, [s for s in specs for _ in range(images_per_prompt)])
    (run_dir / "demo_scores.json").write_text(json.dumps(scores, indent=2))
    minutes = (time.perf_counter() - started) / 60
    print()
    print(f"grid:    {grid}  (rows: {run_dir / 'demo_grid.txt'})")
    print(f"run:     {run_dir}")
    print(f"logs:    {run_dir / 'logs'}  (tensorboard --logdir {run_dir / 'logs'}); metrics {run_dir / 'metrics.jsonl'}")
    print(f"scores:  overall {scores['overall']:.2f} on {len(prompts) * images_per_prompt} held-out samples "
          f"(quick look; `fusedit eval {run_dir} --suite shapes` for the full suite)")
    print(f"took {minutes:.1f} min")
    return scores
