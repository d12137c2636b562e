"""``fusedit sample PATH --prompt ... --out img.png``: sample images from a run, an export or a reference folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from fusedit.commands.values import check_image_path, guidance_scale, positive_int

NAME = "sample"
HELP = "sample images from a run, an exported pipeline or a reference folder"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a training run, an exported pipeline folder or a reference (fuse-dit) folder")
    p.add_argument("--prompt", required=True, help="what to draw")
    p.add_argument(
        "--out", required=True, help="output image path (.png, .jpg, ...); several images get -0, -1 ... suffixes"
    )
    p.add_argument("--negative-prompt", default=None, help="what to steer away from (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default: 0)")
    p.add_argument(
        "--steps", type=positive_int, default=None, help="Euler steps, >= 1 (default: the model's sample config)"
    )
    p.add_argument(
        "--cfg",
        type=guidance_scale,
        default=None,
        help="classifier-free guidance scale, >= 1 (1 = no guidance; default: the model's sample config)",
    )
    p.add_argument(
        "--guidance-interval",
        type=float,
        nargs=2,
        default=None,
        metavar=("SIGMA_LOW", "SIGMA_HIGH"),
        help="apply CFG only at noise levels in [SIGMA_LOW, SIGMA_HIGH] (default: the model's sample config)",
    )
    p.add_argument(
        "--height", type=positive_int, default=None, help="image height in pixels (default: the model's size)"
    )
    p.add_argument("--width", type=positive_int, default=None, help="image width in pixels (default: the model's size)")
    p.add_argument("--num-images", type=positive_int, default=1, help="images to draw for the prompt (default: 1)")
    p.add_argument("--max-length", type=positive_int, default=None, help="maximum prompt length in tokens")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N ... (default: CUDA when available)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")


def run(args: argparse.Namespace) -> int:
    import torch

    from fusedit.atomic import naming_full_disk
    from fusedit.sampling.loading import load_pipeline

    check_image_path(args.out)
    pipe = load_pipeline(args.path, device=args.device, use_ema=not args.no_ema)
    generator = torch.Generator(device=pipe.device).manual_seed(args.seed)
    out = pipe(
        args.prompt,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.cfg,
        generator=generator,
        num_images_per_prompt=args.num_images,
        max_sequence_length=args.max_length,
        guidance_interval=args.guidance_interval,
    )
    target = Path(args.out)
    target.parent.mkdir(parents=True, exist_ok=True)
    images = out.images
    if len(images) == 1:
        paths = [target]
    else:
        paths = [target.with_name(f"{target.stem}-{i}{target.suffix}") for i in range(len(images))]
    for image, path in zip(images, paths, strict=True):
        with naming_full_disk(path, cleanup=path):
            image.save(path)
    if out.num_truncated:
        print(f"note: {out.num_truncated} prompt(s) were longer than the maximum text length and were truncated")
    for path in paths:
        print(path)
    return 0
