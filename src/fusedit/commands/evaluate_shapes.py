"""``fusedit eval --suite shapes``: the shapes benchmark on a model, on a folder of images, or its controls alone.

* ``fusedit eval RUN --suite shapes``: sample every held-out prompt of the run's world and score it next to the
  controls (:func:`fusedit.eval.shapes_eval.evaluate_shapes`); ``--prompt-set training``: its training prompts
  instead, into ``RUN/eval-shapes-training`` (seen against unseen prompts);
* ``--images DIR``: score a folder in GenEval's sample layout
  (:func:`fusedit.eval.shapes_folder.evaluate_image_folder`);
* ``--controls``: the controls alone, on the held-out prompts of RUN's world or of the default world at
  ``--resolution`` (:func:`fusedit.eval.shapes_folder.evaluate_controls_only`).

``--json PATH`` writes the summary document (overall, CIs, categories, controls, manifest) of any of them.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The shapes suite's own options (the shared ones live in :mod:`fusedit.commands.evaluate`)."""
    parser.add_argument(
        "--images",
        help="shapes: score this folder of images in GenEval's sample layout "
        "(DIR/00000/metadata.jsonl + DIR/00000/samples/*.png) instead of sampling a model",
    )
    parser.add_argument(
        "--controls",
        action="store_true",
        help="shapes: compute the controls alone (ground truth, perturbed renders, garbage) on the held-out prompts "
        "of PATH's world, or of the default world at --resolution (default 32)",
    )
    parser.add_argument("--no-controls", action="store_true", help="shapes: skip the controls (faster, less to go on)")
    parser.add_argument(
        "--no-pixel-fd",
        action="store_true",
        help="shapes: skip the pixel Frechet distance against renders of the same prompts",
    )
    parser.add_argument(
        "--allow-small",
        action="store_true",
        help="shapes: score categories with fewer than 50 images anyway (wide CIs)",
    )
    parser.add_argument(
        "--prompt-set",
        choices=("held-out", "training"),
        default="held-out",
        help="shapes: the prompts sampled: held-out (the benchmark, never seen in training; default) or training "
        "(what the model was trained on, to tell a failure to draw from a failure to generalise; written to "
        "<path>/eval-shapes-training by default)",
    )
    parser.add_argument("--json", dest="json_path", help="shapes: also write the summary document to this file")


def run_shapes(args: argparse.Namespace) -> int:
    from fusedit.eval.shapes_eval import format_scores, write_json_atomic
    from fusedit.eval.shapes_report import summary_keys

    if args.images and args.controls:
        raise ValueError("--images and --controls are two different evaluations; give one of them")
    if args.prompt_set != "held-out" and (args.images or args.controls):
        raise ValueError(
            "--prompt-set chooses the prompts a model is sampled on; --images scores the prompts of its folder and "
            "--controls uses the held-out prompts: leave --prompt-set out"
        )
    if args.min_per_category < 0:
        raise ValueError(f"--min-per-category must be >= 0, got {args.min_per_category}")
    if args.images:
        scores, out = _score_folder(args)
    elif args.controls:
        scores, out = _controls(args)
    else:
        scores, out = _sample_and_score(args)
    print(format_scores(scores))
    print(f"scores: {out / 'scores.json'}")
    if scores.get("grids"):
        print("grids:  " + ", ".join(str(out / name) for name in scores["grids"].values()))
    if args.json_path:
        summary = {key: scores[key] for key in summary_keys(scores)}
        print(f"json:   {write_json_atomic(Path(args.json_path), summary)}")
    return 0


def _score_folder(args: argparse.Namespace):
    from fusedit.eval.shapes_eval import write_json_atomic
    from fusedit.eval.shapes_folder import evaluate_image_folder

    print(f"shapes benchmark: scoring the images of {args.images}")
    scores = evaluate_image_folder(
        args.images, controls=not args.no_controls, allow_small=args.allow_small, seed=args.seed
    )
    out = Path(args.out or Path(args.images) / "shapes-scores")
    write_json_atomic(out / "scores.json", scores)
    return scores, out


def _sample_and_score(args: argparse.Namespace):
    from fusedit.eval.shapes_eval import ShapesEvalSettings, evaluate_shapes, prompts_of, world_from_config
    from fusedit.sampling.loading import load_pipeline

    if not args.path:
        raise ValueError("--suite shapes needs PATH (a training run or exported pipeline), --images DIR or --controls")
    path = Path(args.path)
    settings = ShapesEvalSettings(
        per_prompt=args.per_prompt,
        seed=args.seed,
        num_inference_steps=args.steps,
        guidance_scale=args.cfg,
        negative_prompt=args.negative_prompt,
        min_per_category=args.min_per_category,
        allow_small=args.allow_small,
        controls=not args.no_controls,
        pixel_fd=not args.no_pixel_fd,
        prompt_set=args.prompt_set.replace("-", "_"),
        **({"batch_size": args.batch_size} if args.batch_size else {}),
    )
    settings.validate()
    pipe = load_pipeline(path, device=args.device, use_ema=not args.no_ema)
    world = world_from_config(pipe.experiment)
    out = Path(args.out or path / ("eval-shapes-training" if settings.prompt_set == "training" else "eval-shapes"))
    prompts = prompts_of(world, settings.prompt_set)
    print(
        f"shapes suite: {len(prompts)} {args.prompt_set} prompts, at least {settings.per_prompt} images "
        f"each and {settings.min_per_category} per category -> {out}"
    )
    return evaluate_shapes(pipe, world, out, settings, model_path=str(path), progress=True), out


def _controls(args: argparse.Namespace):
    from fusedit.data.config import ShapesWorldConfig
    from fusedit.data.shapes import ShapesWorld
    from fusedit.eval.shapes_eval import world_from_config, write_json_atomic
    from fusedit.eval.shapes_folder import evaluate_controls_only

    if args.path:
        from fusedit.experiment import load_experiment

        config_path = Path(args.path) / "config.yaml"
        if not config_path.is_file():
            raise ValueError(
                f"--controls with PATH needs a run or exported pipeline with a config.yaml; {config_path} is missing"
            )
        world = world_from_config(load_experiment(config_path))
    else:
        world = ShapesWorld(ShapesWorldConfig(), args.resolution or 32)
    print(f"shapes controls: {len(world.held_out_prompts())} held-out prompts at {world.resolution} px")
    scores = evaluate_controls_only(
        world, args.per_prompt, args.min_per_category, seed=args.seed, allow_small=args.allow_small, source=args.path
    )
    out = Path(args.out or (Path(args.path) / "eval-shapes-controls" if args.path else Path("shapes-controls")))
    write_json_atomic(out / "scores.json", scores)
    return scores, out
