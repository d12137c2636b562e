"""``fusedit eval PATH --suite shapes|geneval|dpgbench|fid|clip``: evaluate a run, an exported pipeline or images.

* ``shapes``: sample the shapes world's held-out prompts (the world comes from the model's ``config.yaml``), score
  them with the geometric detector next to the controls, write ``scores.json`` and one grid per category
  (:mod:`fusedit.eval.shapes_eval`); ``--images DIR`` scores a GenEval-layout folder of images instead, and
  ``--controls`` computes the controls alone (:mod:`fusedit.eval.shapes_folder`). ``--json PATH`` writes the summary
  document (overall, CIs, categories, controls, manifest).
* ``geneval`` / ``dpgbench``: sample into the layouts the official scorers read (:mod:`fusedit.eval.benchmarks`);
  scoring itself is done by those scorers (see docs/evaluation.md).
* ``fid``: FID between ``--real`` and ``--fake`` image folders (no model; PATH is not used and may be omitted).
* ``clip``: CLIP score of the images of a folder sampled by this tool (``sampling.json`` + images) — or of a
  GenEval/prompt-folder output — against their prompts, with a local CLIP model.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

SUITES = ("shapes", "geneval", "dpgbench", "fid", "clip")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusedit eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", nargs="?", help="training run, exported pipeline folder or reference folder "
                        "(for --suite clip: the folder of sampled images; unused by --suite fid)")
    parser.add_argument("--suite", required=True, choices=SUITES)
    parser.add_argument("--out", help="output folder (default: <path>/eval-<suite>)")
    parser.add_argument("--per-prompt", type=int, default=4, help="images per prompt (shapes, geneval)")
    parser.add_argument("--min-per-category", type=int, default=50,
                        help="shapes: at least this many images per category (more per prompt where needed)")
    parser.add_argument("--images", help="shapes: score this folder of images in GenEval's sample layout "
                        "(DIR/00000/metadata.jsonl + DIR/00000/samples/*.png) instead of sampling a model")
    parser.add_argument("--controls", action="store_true",
                        help="shapes: compute the controls alone (ground truth, perturbed renders, garbage) on the "
                        "held-out prompts of PATH's world, or of the default world at --resolution (default 32)")
    parser.add_argument("--no-controls", action="store_true", help="shapes: skip the controls (faster, less to go on)")
    parser.add_argument("--no-pixel-fd", action="store_true",
                        help="shapes: skip the pixel Frechet distance against renders of the same prompts")
    parser.add_argument("--allow-small", action="store_true",
                        help="shapes: score categories with fewer than 50 images anyway (wide CIs)")
    parser.add_argument("--json", dest="json_path", help="shapes: also write the summary document to this file")
    parser.add_argument("--seed", type=int, default=0, help="base seed; image k of prompt i uses seed + i*n + k")
    parser.add_argument("--steps", type=int, default=None, help="Euler steps (default: the model's sample config)")
    parser.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's sample config)")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="images per pipeline call")
    parser.add_argument("--resolution", type=int, default=None,
                        help="image side for geneval/dpgbench (default: the model's default size)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    parser.add_argument("--metadata", help="geneval: evaluation_metadata.jsonl")
    parser.add_argument("--prompts", help="dpgbench: folder of NAME.txt prompts")
    parser.add_argument("--real", help="fid: folder of real images")
    parser.add_argument("--fake", help="fid: folder of generated images")
    parser.add_argument("--inception-weights", help="fid: local weights-inception-2015-12-05-6726825d.pth")
    parser.add_argument("--image-size", type=int, default=299, help="fid: feature extractor input size")
    parser.add_argument("--clip-model", help="clip: local Hugging Face CLIP folder")
    return parser


def _require(args, *names: str) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) in (None, "")]
    if missing:
        raise ValueError(f"--suite {args.suite} needs {' and '.join(missing)}")


def _model_path(args) -> Path:
    if not args.path:
        raise ValueError(f"--suite {args.suite} needs PATH: a training run, an exported pipeline or a reference folder")
    return Path(args.path)


def _write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def run_shapes(args) -> int:
    from fusedit.eval.shapes_eval import ShapesEvalSettings, format_scores, write_json_atomic
    from fusedit.eval.shapes_report import summary_keys

    if args.images and args.controls:
        raise ValueError("--images and --controls are two different evaluations; give one of them")
    if args.min_per_category < 0:
        raise ValueError(f"--min-per-category must be >= 0, got {args.min_per_category}")
    if args.images:
        from fusedit.eval.shapes_folder import evaluate_image_folder

        print(f"shapes benchmark: scoring the images of {args.images}")
        scores = evaluate_image_folder(args.images, controls=not args.no_controls, allow_small=args.allow_small,
                                       seed=args.seed)
        out = Path(args.out or Path(args.images) / "shapes-scores")
        write_json_atomic(out / "scores.json", scores)
    elif args.controls:
        scores, out = _shapes_controls(args)
    else:
        scores, out = _shapes_model(args, ShapesEvalSettings)
    print(format_scores(scores))
    print(f"scores: {out / 'scores.json'}")
    if scores.get("grids"):
        print("grids:  " + ", ".join(str(out / name) for name in scores["grids"].values()))
    if args.json_path:
        print(f"json:   {write_json_atomic(Path(args.json_path), {k: scores[k] for k in summary_keys(scores)})}")
    return 0


def _shapes_model(args, settings_type):
    from fusedit.eval.shapes_eval import evaluate_shapes, world_from_config
    from fusedit.pipeline import load_pipeline

    path = _model_path(args)
    settings = settings_type(per_prompt=args.per_prompt, seed=args.seed, num_inference_steps=args.steps,
                             guidance_scale=args.cfg, negative_prompt=args.negative_prompt,
                             min_per_category=args.min_per_category, allow_small=args.allow_small,
                             controls=not args.no_controls, pixel_fd=not args.no_pixel_fd,
                             **({"batch_size": args.batch_size} if args.batch_size else {}))
    settings.validate()
    pipe = load_pipeline(path, device=args.device, use_ema=not args.no_ema)
    world = world_from_config(pipe.config)
    out = Path(args.out or path / "eval-shapes")
    print(f"shapes suite: {len(world.held_out_prompts())} held-out prompts, at least {settings.per_prompt} images "
          f"each and {settings.min_per_category} per category -> {out}")
    return evaluate_shapes(pipe, world, out, settings, model_path=str(path), progress=True), out


def _shapes_controls(args):
    from fusedit.data.config import ShapesWorldConfig
    from fusedit.data.shapes import ShapesWorld
    from fusedit.eval.shapes_eval import world_from_config, write_json_atomic
    from fusedit.eval.shapes_folder import evaluate_controls_only

    if args.path:
        from fusedit.experiment import load_experiment

        config_path = Path(args.path) / "config.yaml"
        if not config_path.is_file():
            raise ValueError(f"--controls with PATH needs a run or exported pipeline with a config.yaml; "
                             f"{config_path} is missing")
        world = world_from_config(load_experiment(config_path))
    else:
        world = ShapesWorld(ShapesWorldConfig(), args.resolution or 32)
    print(f"shapes controls: {len(world.held_out_prompts())} held-out prompts at {world.resolution} px")
    scores = evaluate_controls_only(world, args.per_prompt, args.min_per_category, seed=args.seed,
                                    allow_small=args.allow_small, source=args.path)
    out = Path(args.out or (Path(args.path) / "eval-shapes-controls" if args.path else Path("shapes-controls")))
    write_json_atomic(out / "scores.json", scores)
    return scores, out


def _sampling_kwargs(args, pipe) -> dict:
    size = args.resolution or pipe.default_size
    kwargs = dict(seed=args.seed, height=size, width=size,
                  num_inference_steps=args.steps or pipe.defaults.num_inference_steps,
                  guidance_scale=pipe.defaults.guidance_scale if args.cfg is None else args.cfg,
                  negative_prompt=pipe.defaults.negative_prompt if args.negative_prompt is None else args.negative_prompt,
                  generator_device=str(pipe.device))
    if args.batch_size:
        kwargs["batch_size"] = args.batch_size
    return kwargs


def run_geneval(args) -> int:
    from fusedit.eval.benchmarks import sample_geneval
    from fusedit.pipeline import load_pipeline

    _require(args, "metadata")
    path = _model_path(args)
    pipe = load_pipeline(path, device=args.device, use_ema=not args.no_ema)
    out = Path(args.out or path / "eval-geneval")
    summary = sample_geneval(pipe, args.metadata, out, n_samples=args.per_prompt, save_grid=True,
                             **_sampling_kwargs(args, pipe))
    print(f"geneval: {summary.generated} images generated, {summary.skipped} prompts already complete -> {out}")
    print(f"score with GenEval: python evaluation/evaluate_images.py {out} --outfile {out}/results.jsonl "
          f"--model-path <detector folder>; then python evaluation/summary_scores.py {out}/results.jsonl")
    return 0


def run_dpgbench(args) -> int:
    from fusedit.eval.benchmarks import sample_dpgbench
    from fusedit.pipeline import load_pipeline

    _require(args, "prompts")
    path = _model_path(args)
    pipe = load_pipeline(path, device=args.device, use_ema=not args.no_ema)
    out = Path(args.out or path / "eval-dpgbench")
    kwargs = _sampling_kwargs(args, pipe)
    summary = sample_dpgbench(pipe, args.prompts, out, **kwargs)
    print(f"dpgbench: {summary.generated} images generated, {summary.skipped} prompts already complete -> {out}")
    print(f"score with DPG-Bench: python dpg_bench/compute_dpg_bench.py --image-root-path {out} "
          f"--resolution {kwargs['height']} --pic-num 4")
    return 0


def run_fid(args) -> int:
    from fusedit.eval.fid import compute_fid

    _require(args, "real", "fake", "inception_weights")
    fid = compute_fid(args.real, args.fake, inception_weights=args.inception_weights,
                      device=args.device or "cpu", image_size=args.image_size,
                      **({"batch_size": args.batch_size} if args.batch_size else {}))
    print(f"FID {fid:.4f}")
    if args.out:
        print(_write_json(Path(args.out) / "fid.json", {"suite": "fid", "fid": fid, "real": args.real,
                                                        "fake": args.fake, "inception_weights": args.inception_weights,
                                                        "image_size": args.image_size}))
    return 0


def sampled_pairs(folder: Path) -> list[tuple[Path, str]]:
    """(image, prompt) pairs of a folder written by a benchmark sampler (GenEval layout or a prompt list with a
    ``prompts.jsonl``), or a folder of ``NAME.png`` + ``NAME.txt`` pairs."""
    from fusedit.eval.images import list_images

    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist")
    pairs: list[tuple[Path, str]] = []
    geneval = sorted(p for p in folder.iterdir() if (p / "metadata.jsonl").is_file())
    if geneval:
        for sub in geneval:
            prompt = json.loads((sub / "metadata.jsonl").read_text().splitlines()[0])["prompt"]
            pairs += [(image, prompt) for image in list_images(sub / "samples")]
        return pairs
    for image in list_images(folder):
        text = image.with_suffix(".txt")
        if not text.is_file():
            raise ValueError(f"{image} has no prompt: expected {text} next to it (or a GenEval-layout folder)")
        pairs.append((image, text.read_text(encoding="utf-8").strip()))
    return pairs


def run_clip(args) -> int:
    from fusedit.eval.clip_score import clip_score

    _require(args, "clip_model")
    if not args.path:
        raise ValueError("--suite clip needs PATH: a folder of sampled images (GenEval layout, or NAME.png + NAME.txt)")
    pairs = sampled_pairs(Path(args.path))
    score = clip_score([p for p, _ in pairs], [t for _, t in pairs], args.clip_model, device=args.device or "cpu",
                       **({"batch_size": args.batch_size} if args.batch_size else {}))
    print(f"CLIP score {score:.3f} over {len(pairs)} images")
    out = Path(args.out) if args.out else Path(args.path)
    print(_write_json(out / "clip_score.json", {"suite": "clip", "clip_score": score, "num_images": len(pairs),
                                                "clip_model": args.clip_model}))
    return 0


RUNNERS = {"shapes": run_shapes, "geneval": run_geneval, "dpgbench": run_dpgbench, "fid": run_fid, "clip": run_clip}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``fusedit eval`` (errors are reported by :func:`fusedit.cli.main`)."""
    args = build_parser().parse_args(list(argv or []))
    return RUNNERS[args.suite](args)
