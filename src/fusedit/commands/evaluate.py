"""``fusedit eval PATH --suite shapes|geneval|dpgbench|fid|clip``: evaluate a run, an exported pipeline or images.

* ``shapes``: sample the shapes world's held-out prompts (the world comes from the model's ``config.yaml``), score
  them with the geometric detector next to the controls, write ``scores.json`` and one grid per category; or score a
  GenEval-layout folder (``--images``), or compute the controls alone (``--controls``); ``--json`` writes the summary
  (:mod:`fusedit.commands.evaluate_shapes`).
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
from typing import Any

from fusedit.commands import evaluate_shapes
from fusedit.commands.values import guidance_scale, non_negative_int, positive_int

NAME = "eval"
HELP = "evaluate a model or images (shapes, geneval, dpgbench, fid, clip)"
DESCRIPTION = (__doc__ or "").split("\n\n")[0]
SUITES = ("shapes", "geneval", "dpgbench", "fid", "clip")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "path",
        nargs="?",
        help="training run, exported pipeline folder or reference folder "
        "(for --suite clip: the folder of sampled images; unused by --suite fid)",
    )
    parser.add_argument("--suite", required=True, choices=SUITES, help="what to evaluate (see the description above)")
    parser.add_argument("--out", help="output folder (default: <path>/eval-<suite>)")
    parser.add_argument("--per-prompt", type=positive_int, default=4, help="images per prompt (shapes, geneval)")
    parser.add_argument(
        "--min-per-category",
        type=non_negative_int,
        default=50,
        help="shapes: at least this many images per category (more per prompt where needed)",
    )
    parser.add_argument("--seed", type=int, default=0, help="base seed; image k of prompt i uses seed + i*n + k")
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="Euler steps (default: the model's sample config)"
    )
    parser.add_argument(
        "--cfg", type=guidance_scale, default=None, help="guidance scale, >= 1 (default: the model's sample config)"
    )
    parser.add_argument("--negative-prompt", default=None, help="negative prompt (default: the model's)")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="images per pipeline call")
    parser.add_argument(
        "--resolution",
        type=positive_int,
        default=None,
        help="image side for geneval/dpgbench (default: the model's default size)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N ... (default: CUDA when available)")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    parser.add_argument("--metadata", help="geneval: evaluation_metadata.jsonl")
    parser.add_argument("--prompts", help="dpgbench: folder of NAME.txt prompts")
    parser.add_argument("--real", help="fid: folder of real images")
    parser.add_argument("--fake", help="fid: folder of generated images")
    parser.add_argument("--inception-weights", help="fid: local weights-inception-2015-12-05-6726825d.pth")
    parser.add_argument("--image-size", type=positive_int, default=299, help="fid: feature extractor input size")
    parser.add_argument("--clip-model", help="clip: local Hugging Face CLIP folder")
    evaluate_shapes.add_arguments(parser)


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


def _sampling_kwargs(args: argparse.Namespace, pipe: Any) -> dict:
    size = args.resolution or pipe.default_size
    kwargs = dict(
        seed=args.seed,
        height=size,
        width=size,
        num_inference_steps=pipe.defaults.num_inference_steps if args.steps is None else args.steps,
        guidance_scale=pipe.defaults.guidance_scale if args.cfg is None else args.cfg,
        negative_prompt=pipe.defaults.negative_prompt if args.negative_prompt is None else args.negative_prompt,
        generator_device=str(pipe.device),
    )
    if args.batch_size:
        kwargs["batch_size"] = args.batch_size
    return kwargs


def run_geneval(args) -> int:
    from fusedit.eval.benchmarks import sample_geneval
    from fusedit.sampling.loading import load_pipeline

    _require(args, "metadata")
    path = _model_path(args)
    pipe = load_pipeline(path, device=args.device, use_ema=not args.no_ema)
    out = Path(args.out or path / "eval-geneval")
    summary = sample_geneval(
        pipe, args.metadata, out, n_samples=args.per_prompt, save_grid=True, **_sampling_kwargs(args, pipe)
    )
    print(f"geneval: {summary.generated} images generated, {summary.skipped} prompts already complete -> {out}")
    print(
        f"score with GenEval: python evaluation/evaluate_images.py {out} --outfile {out}/results.jsonl "
        f"--model-path <detector folder>; then python evaluation/summary_scores.py {out}/results.jsonl"
    )
    return 0


def run_dpgbench(args) -> int:
    from fusedit.eval.benchmarks import sample_dpgbench
    from fusedit.sampling.loading import load_pipeline

    _require(args, "prompts")
    path = _model_path(args)
    pipe = load_pipeline(path, device=args.device, use_ema=not args.no_ema)
    out = Path(args.out or path / "eval-dpgbench")
    kwargs = _sampling_kwargs(args, pipe)
    summary = sample_dpgbench(pipe, args.prompts, out, **kwargs)
    print(f"dpgbench: {summary.generated} images generated, {summary.skipped} prompts already complete -> {out}")
    print(
        f"score with DPG-Bench: python dpg_bench/compute_dpg_bench.py --image-root-path {out} "
        f"--resolution {kwargs['height']} --pic-num 4"
    )
    return 0


def run_fid(args) -> int:
    from fusedit.eval.fid import compute_fid

    _require(args, "real", "fake", "inception_weights")
    fid = compute_fid(
        args.real,
        args.fake,
        inception_weights=args.inception_weights,
        device=args.device or "cpu",
        image_size=args.image_size,
        **({"batch_size": args.batch_size} if args.batch_size else {}),
    )
    print(f"FID {fid:.4f}")
    if args.out:
        print(
            _write_json(
                Path(args.out) / "fid.json",
                {
                    "suite": "fid",
                    "fid": fid,
                    "real": args.real,
                    "fake": args.fake,
                    "inception_weights": args.inception_weights,
                    "image_size": args.image_size,
                },
            )
        )
    return 0


def run_clip(args) -> int:
    from fusedit.eval.clip_score import clip_score
    from fusedit.eval.images import sampled_pairs

    _require(args, "clip_model")
    if not args.path:
        raise ValueError("--suite clip needs PATH: a folder of sampled images (GenEval layout, or NAME.png + NAME.txt)")
    pairs = sampled_pairs(Path(args.path))
    score = clip_score(
        [p for p, _ in pairs],
        [t for _, t in pairs],
        args.clip_model,
        device=args.device or "cpu",
        **({"batch_size": args.batch_size} if args.batch_size else {}),
    )
    print(f"CLIP score {score:.3f} over {len(pairs)} images")
    out = Path(args.out) if args.out else Path(args.path)
    print(
        _write_json(
            out / "clip_score.json",
            {"suite": "clip", "clip_score": score, "num_images": len(pairs), "clip_model": args.clip_model},
        )
    )
    return 0


RUNNERS = {
    "shapes": evaluate_shapes.run_shapes,
    "geneval": run_geneval,
    "dpgbench": run_dpgbench,
    "fid": run_fid,
    "clip": run_clip,
}


def run(args: argparse.Namespace) -> int:
    """Run the suite ``--suite`` names (errors are reported by :func:`fusedit.commands.main`)."""
    return RUNNERS[args.suite](args)
