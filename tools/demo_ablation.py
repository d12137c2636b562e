"""Train one variant of the demo and probe how well it follows the prompts (the measurements of docs/results/demo.md).

    python tools/demo_ablation.py OUT [--llm-corpus restated|captions] [--llm-steps 300] [--llm-scene-weight 1]
                                  [--llm-scene-scope position|all] [--llm-layers 4] [--probe-only] [--cfg CFG] [--suite]
                                  [--positions] [--placement-cfg CFG ...] [key=value ...]

1. pretrains (or reuses) the tiny LLM on the shapes world's ``--llm-corpus`` text into ``OUT/tiny-llm``;
2. trains the demo config with the overrides into ``OUT/fusedit`` (one torch thread, so two variants can run side
   by side on a 2-core machine);
3. probes the run (``--probe-only`` skips 1–2): held-out prompts, 24 images per category (72 for ``position``),
   GenEval-style accuracy per category, color recall/precision (:func:`fusedit.eval.shapes_scorer.color_following`) and
   a soft position check: the centroids of the two prompt colors' pixels lie in the prompt's relation (by more than
   2 px), which credits a right arrangement before the detector accepts the shapes. Prints one ``PROBE`` JSON line
   and writes ``OUT/fusedit/probe.png`` (rows of 8: the first 64 probe images). ``--positions`` adds, for 64
   random position prompts of the held-out and of the training split, how often both prompt colors are drawn and how
   often the subject is then on the prompt's side (``POSITIONS`` lines), and the layout signal at high noise
   (``LAYOUT`` lines, :func:`layout_signal`: does the model's one-step prediction put the subject's color on the
   prompt's side? It needs no sampling, so it shows a layout being learned before samples do).
   ``--placement-cfg 4 10`` adds the same breakdown over every held-out position prompt with two colors, two images
   each, at each guidance scale given (``PLACEMENT`` lines; about a minute per scale).

``--suite`` scores the run on the held-out suite with the benchmark's detector instead of the probe: every held-out
prompt, one image each and at least 50 per category (376 images; ``fusedit eval OUT/fusedit --suite shapes
--no-controls --per-prompt 1 --no-pixel-fd [--cfg CFG]``), and prints a ``SUITE`` JSON line (overall with its CI,
per-category accuracy, color-following F1, background error). This is how the variants of docs/results/demo.md are
compared; the demo's own evaluation uses the full suite (760 images) with its controls.

The probe is smaller and softer than ``fusedit eval RUN --suite shapes`` (all 149 held-out prompts × 4): it is
meant to rank variants quickly (about a minute), not to report a model's score.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from fusedit.text.tiny_llm import TinyLLMConfig

POSITION_PROBE_IMAGES = 72
CATEGORY_PROBE_IMAGES = 24
#: RGB distance to the background above which the soft position check counts a pixel (looser than the detector's 80,
#: to credit faint early objects)
SOFT_FOREGROUND_THRESHOLD = 60.0


def color_mask(image: np.ndarray, color: str) -> np.ndarray:
    """``(H, W)`` bool: foreground pixels (farther than :data:`SOFT_FOREGROUND_THRESHOLD` from the background) whose
    nearest palette color is ``color``."""
    from fusedit.data.shapes import BACKGROUND, COLORS, PALETTE

    pixels = image.astype(np.float32)
    foreground = np.linalg.norm(pixels - np.array(BACKGROUND, np.float32), axis=-1) > SOFT_FOREGROUND_THRESHOLD
    palette = np.array([PALETTE[c] for c in COLORS], np.float32)
    nearest = np.linalg.norm(pixels[:, :, None, :] - palette, axis=-1).argmin(-1)
    return foreground & (nearest == COLORS.index(color))


def soft_position(image: np.ndarray, spec) -> bool | None:
    """Whether the two prompt colors' pixel centroids are in the prompt's relation (None: both share a color)."""
    subject, reference = spec.objects
    if subject.color == reference.color:
        return None
    centroids = []
    for color in (subject.color, reference.color):
        mask = color_mask(image, color)
        if mask.sum() < 4:
            return False
        ys, xs = np.nonzero(mask)
        centroids.append((xs.mean(), ys.mean()))
    (ax, ay), (bx, by) = centroids
    return bool(
        {"left of": ax < bx - 2, "right of": ax > bx + 2, "above": ay < by - 2, "below": ay > by + 2}[spec.relation]
    )


def probe(run: Path, guidance_scale: float | None = None) -> dict:
    from fusedit.eval.shapes_eval import world_from_config
    from fusedit.eval.shapes_scorer import as_uint8_images, check_objects, color_following, detect
    from fusedit.sampling.loading import load_pipeline
    from fusedit.train.logging import save_image_grid

    pipe = load_pipeline(run, device="cpu")
    world = world_from_config(pipe.experiment)
    rng = np.random.default_rng(0)
    jobs = []
    for category in world.categories:
        specs = world.held_out_prompts(category)
        want = POSITION_PROBE_IMAGES if category == "position" else CATEGORY_PROBE_IMAGES
        if len(specs) > want:
            specs = [specs[i] for i in rng.choice(len(specs), want, replace=False)]
        jobs += [spec for spec in specs for _ in range(int(np.ceil(want / len(specs))))]
    images = []
    for start in range(0, len(jobs), 64):
        batch = jobs[start : start + 64]
        generators = [torch.Generator().manual_seed(1000 + start + k) for k in range(len(batch))]
        out = pipe([s.text for s in batch], generator=generators, output_type="pt", guidance_scale=guidance_scale)
        images += as_uint8_images(out.images * 2 - 1)
    correct, recall, precision, position = {}, [], [], []
    for image, spec in zip(images, jobs, strict=False):
        objects = detect(image)
        correct.setdefault(spec.category, []).append(check_objects(objects, spec))
        alignment = color_following(objects, spec)
        if alignment is not None:
            recall.append(alignment[0])
            precision.append(alignment[1])
        if spec.category == "position":
            ok = soft_position(image, spec)
            if ok is not None:
                position.append(ok)
    result = {c: round(float(np.mean(v)), 3) for c, v in correct.items()}
    result.update(
        overall=round(float(np.mean([np.mean(v) for v in correct.values()])), 3),
        color_recall=round(float(np.mean(recall)), 3),
        color_precision=round(float(np.mean(precision)), 3),
        soft_position=round(float(np.mean(position)), 3),
        images=len(images),
    )
    grid = torch.from_numpy(np.stack(images[:64])).permute(0, 3, 1, 2).float() / 127.5 - 1
    save_image_grid(grid, run / "probe.png", nrow=8)
    return result


def position_breakdown(
    run: Path,
    split: str = "held_out",
    prompts: int | None = 64,
    images_per_prompt: int = 1,
    guidance_scale: float | None = None,
) -> dict:
    """Of ``prompts`` random position prompts with two different colors (None: every such prompt of the split;
    ``images_per_prompt`` images each, seeds 0, 1, ... in order): how often both prompt colors are drawn, and how
    often, when they are, the subject lies on the prompt's side (guidance: the run's, or ``guidance_scale``)."""
    from fusedit.eval.shapes_eval import world_from_config
    from fusedit.eval.shapes_scorer import as_uint8_images
    from fusedit.sampling.loading import load_pipeline

    pipe = load_pipeline(run, device="cpu")
    world = world_from_config(pipe.experiment)
    specs = world.held_out_prompts("position") if split == "held_out" else world.training_prompts("position")
    if prompts is not None:
        specs = [specs[i] for i in np.random.default_rng(0).choice(len(specs), prompts, replace=False)]
    specs = [s for s in specs if s.objects[0].color != s.objects[1].color] * images_per_prompt
    images = []
    for start in range(0, len(specs), 64):
        batch = specs[start : start + 64]
        generators = [torch.Generator().manual_seed(start + k) for k in range(len(batch))]
        out = pipe([s.text for s in batch], generator=generators, output_type="pt", guidance_scale=guidance_scale)
        images += as_uint8_images(out.images * 2 - 1)
    both = [all(color_mask(i, o.color).sum() >= 4 for o in s.objects) for i, s in zip(images, specs, strict=False)]
    right = [bool(soft_position(i, s)) for i, s, b in zip(images, specs, both, strict=False) if b]
    result = {
        "split": split,
        "images": len(specs),
        "both_colors_drawn": round(sum(both) / len(specs), 3),
        "placed_as_prompted_when_both_drawn": round(sum(right) / max(len(right), 1), 3),
    }
    if guidance_scale is not None:
        result["cfg"] = guidance_scale
    return result


def layout_signal(
    run: Path, split: str = "held_out", prompts: int = 96, sigma: float = 0.95, noise_draws: int = 4
) -> dict:
    """Whether the model's layout at high noise follows position prompts, without sampling.

    For ``prompts`` random position prompts with two different colors: the one-step prediction of the clean image
    ``x0 = x_t - σ·v`` at ``σ`` from pure noise (conditional, no guidance), averaged over ``noise_draws`` draws;
    its contrast between the subject's and the reference's palette colors; and the offset of that contrast's centroid
    along the relation's axis (in pixels, positive = the subject is on the prompt's side). The training images'
    own mean (200 renders per prompt) scores 1.0 with offsets of about 6 px; a model that ignores the relation
    scores about 0.5. Returns the fraction of prompts on the right side (all, left/right and above/below
    prompts) and the mean offset.
    """
    from fusedit.data.shapes import PALETTE
    from fusedit.eval.shapes_eval import world_from_config
    from fusedit.sampling.loading import load_pipeline

    pipe = load_pipeline(run, device="cpu")
    world = world_from_config(pipe.experiment)
    specs = world.held_out_prompts("position") if split == "held_out" else world.training_prompts("position")
    specs = [s for s in specs if s.objects[0].color != s.objects[1].color]
    specs = [specs[i] for i in np.random.default_rng(0).choice(len(specs), min(prompts, len(specs)), replace=False)]
    context = pipe.encode_prompt([s.text for s in specs])
    size = pipe.experiment.model.sample_size
    generator = torch.Generator().manual_seed(0)
    x0 = 0
    for _ in range(noise_draws):
        noise = torch.randn(len(specs), pipe.codec.channels, size, size, generator=generator)
        with torch.no_grad():
            v = pipe.model(noise, torch.full((len(specs),), sigma * 1000.0), context).float()
        x0 = x0 + (noise - sigma * v) / noise_draws
    ys, xs = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    offsets = []
    for image, spec in zip(x0, specs, strict=False):
        subject, reference = spec.objects
        direction = (torch.tensor(PALETTE[subject.color]) - torch.tensor(PALETTE[reference.color])).float() / 127.5
        contrast = torch.einsum("chw,c->hw", image, direction)
        weight = contrast - contrast.mean()
        cx = float((weight * xs).sum() / weight.abs().sum())
        cy = float((weight * ys).sum() / weight.abs().sum())
        offsets.append({"left of": -cx, "right of": cx, "above": -cy, "below": cy}[spec.relation])
    offsets = np.array(offsets)
    horizontal = np.array([s.relation in ("left of", "right of") for s in specs])
    return {
        "split": split,
        "prompts": len(specs),
        "sigma": sigma,
        "subject_on_prompted_side": round(float((offsets > 0).mean()), 3),
        "left_right": round(float((offsets[horizontal] > 0).mean()), 3),
        "above_below": round(float((offsets[~horizontal] > 0).mean()), 3),
        "mean_offset_px": round(float(offsets.mean()), 3),
    }


def quick_suite(run: Path, guidance_scale: float | None = None) -> dict:
    """The held-out suite at one image per prompt (at least 50 per category), no controls: overall with its CI, the
    categories, color-following F1 and background error (see the module docstring)."""
    from fusedit.eval.shapes_eval import ShapesEvalSettings, evaluate_shapes, world_from_config
    from fusedit.sampling.loading import load_pipeline

    pipe = load_pipeline(run, device="cpu")
    settings = ShapesEvalSettings(per_prompt=1, guidance_scale=guidance_scale, controls=False, pixel_fd=False)
    scores = evaluate_shapes(pipe, world_from_config(pipe.experiment), run / "eval-suite", settings)
    return {
        "overall": round(scores["overall"], 3),
        "ci95": [round(v, 3) for v in scores["ci95"]],
        **{name: round(v["accuracy"], 3) for name, v in scores["categories"].items()},
        "color_f1": round(scores["color_following"]["f1"], 3),
        "background_error": round(scores["background_error"], 2),
        "images": scores["num_images"],
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("overrides", nargs="*", help="demo config overrides, key=value")
    parser.add_argument("--llm-corpus", default="restated", choices=["restated", "captions"])
    parser.add_argument("--llm-steps", type=int, default=300)
    parser.add_argument(
        "--llm-scene-weight",
        type=float,
        default=TinyLLMConfig().scene_loss_weight,
        help="weight of the tiny LLM's scene objective (0: next-token loss only)",
    )
    parser.add_argument(
        "--llm-scene-scope",
        default=TinyLLMConfig().scene_scope,
        choices=["position", "all"],
        help="captions the tiny LLM's scene objective describes",
    )
    parser.add_argument(
        "--llm-layers",
        type=int,
        default=TinyLLMConfig().num_hidden_layers,
        help="depth of the tiny LLM (deep fusion: set model.shared_attention_layers to match the DiT's depth)",
    )
    parser.add_argument("--cfg", type=float, default=None, help="probe guidance scale (default: the run's)")
    parser.add_argument(
        "--suite", action="store_true", help="score the held-out suite (376 images) instead of the probe"
    )
    parser.add_argument("--probe-only", action="store_true")
    parser.add_argument(
        "--positions",
        action="store_true",
        help="also break position prompts down: both colors drawn? placed as the prompt says? and "
        "the layout signal at high noise (LAYOUT lines, see layout_signal)",
    )
    parser.add_argument(
        "--placement-cfg",
        type=float,
        nargs="+",
        default=None,
        metavar="CFG",
        help="also sample every held-out position prompt with two colors twice at each guidance "
        "scale and print the POSITIONS breakdown of those images (PLACEMENT lines)",
    )
    return parser


def train_variant(args: argparse.Namespace, run: Path) -> None:
    """Pretrain (or reuse) the variant's tiny LLM under ``args.out`` and train the demo with the overrides into
    ``run`` (replacing what is there)."""
    from fusedit.data.shapes import ShapesWorld
    from fusedit.experiment import load_experiment
    from fusedit.text.tiny_llm import ensure_shapes_world_llm
    from fusedit.train.launch import train_run

    base = load_experiment("demo", args.overrides)
    world = ShapesWorld(base.data.shapes, base.data.resolution)
    llm_config = TinyLLMConfig(
        corpus=args.llm_corpus,
        steps=args.llm_steps,
        scene_loss_weight=args.llm_scene_weight,
        scene_scope=args.llm_scene_scope,
        num_hidden_layers=args.llm_layers,
    )
    llm = ensure_shapes_world_llm(args.out / "tiny-llm", world, llm_config)
    config = load_experiment("demo", args.overrides + [f"text.llm={llm}"])
    shutil.rmtree(run, ignore_errors=True)
    train_run(config, run, device="cpu", progress=False)


def main() -> None:
    args = build_parser().parse_intermixed_args()
    torch.set_num_threads(1)
    run = args.out / "fusedit"
    if not args.probe_only:
        train_variant(args, run)
    if args.suite:
        print("SUITE", json.dumps(quick_suite(run, args.cfg)), flush=True)
    else:
        print("PROBE", json.dumps(probe(run, args.cfg)), flush=True)
    if args.positions:
        for split in ("held_out", "train"):
            print("POSITIONS", json.dumps(position_breakdown(run, split)), flush=True)
            print("LAYOUT", json.dumps(layout_signal(run, split)), flush=True)
    for cfg in args.placement_cfg or ():
        placement = position_breakdown(run, "held_out", prompts=None, images_per_prompt=2, guidance_scale=cfg)
        print("PLACEMENT", json.dumps(placement), flush=True)


if __name__ == "__main__":
    main()
