"""Score a set of shapes-world images, with confidence intervals and the controls that give the score its meaning.

:func:`score_image_set` is the one scoring path of the benchmark: a model's samples, a folder of images and every
control (:mod:`fusedit.eval.shapes_controls`) go through it. Its result::

    {"overall": float, "ci95": [lo, hi],
     "categories": {name: {"accuracy", "n", "correct", "ci95"}},
     "color_following": {"recall", "precision", "f1", "n"},     # images of prompts that name colors
     "background_error": float,                                 # mean |pixel - background| off the objects, 0-255
     "correct": [bool per image],
     "failures": {category: {reason: images}}}                 # why wrong images are wrong (shapes_scorer.FAILURES)

:func:`run_controls` scores every control on the same prompts (same number of images each) and
:func:`summary_json` assembles the document ``fusedit eval --json`` writes.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from fusedit.data.shapes import PromptSpec, ShapesWorld
from fusedit.eval.shapes_controls import (
    CONTROLS,
    GROUND_TRUTH_MIN,
    NEGATIVE_CONTROLS,
    NEGATIVE_MAX,
    POSITIVE_MIN,
    control_images,
    control_passes,
)
from fusedit.eval.shapes_detector import analyse
from fusedit.eval.shapes_scorer import FAILURES, color_following, diagnose
from fusedit.eval.shapes_stats import summarize


def score_image_set(images: Sequence[np.ndarray], specs: Sequence[PromptSpec], *, bootstrap_seed: int = 0) -> dict:
    """Score ``images`` (``np.uint8 (R, R, 3)``) against ``specs`` (one each); see the module docstring."""
    if len(images) != len(specs):
        raise ValueError(f"got {len(images)} images but {len(specs)} prompts; expected one prompt per image")
    correct, recalls, precisions, f1s, backgrounds = [], [], [], [], []
    failures: defaultdict[str, Counter] = defaultdict(Counter)
    for image, spec in zip(images, specs, strict=False):
        detection = analyse(image)
        objects = detection.objects
        reason = diagnose(objects, spec)
        correct.append(reason is None)
        if reason is not None:
            failures[spec.category][reason] += 1
        following = color_following(objects, spec)
        if following is not None:
            recall, precision = following
            recalls.append(recall)
            precisions.append(precision)
            f1s.append(0.0 if recall + precision == 0 else 2 * recall * precision / (recall + precision))
        backgrounds.append(detection.background_error)
    result = summarize(correct, [s.category for s in specs], seed=bootstrap_seed)
    result["color_following"] = (
        {
            "recall": float(np.mean(recalls)),
            "precision": float(np.mean(precisions)),
            "f1": float(np.mean(f1s)),
            "n": len(f1s),
        }
        if f1s
        else None
    )
    finite = [b for b in backgrounds if not math.isnan(b)]
    result["background_error"] = float(np.mean(finite)) if finite else float("nan")
    result["correct"] = [bool(c) for c in correct]
    result["failures"] = {
        c: {reason: failures[c][reason] for reason in FAILURES if failures[c][reason]} for c in result["categories"]
    }
    return result


def score_and_report(
    world: ShapesWorld,
    images: Sequence[np.ndarray],
    specs: Sequence[PromptSpec],
    manifest: dict[str, Any],
    controls: bool,
    extra: dict[str, Any] | None = None,
    control_table: dict[str, dict] | None = None,
) -> dict:
    """Score ``images`` against ``specs`` and, if ``controls``, every control on the same prompts: the
    :func:`summary_json` document plus the per-category tables ``accuracy``, ``correct``, ``total``,
    ``num_images``, ``color_recall``, ``color_precision`` and ``correct_per_image``.

    ``control_table``: the controls' :func:`run_controls` table when it was already scored (on ``specs`` with the
    manifest's seed, e.g. by :mod:`fusedit.eval.shapes_controls_worker` while the model sampled); None: score it here.
    """
    scored = score_image_set(images, specs)
    table = None
    if controls:
        table = control_table if control_table is not None else run_controls(world, specs, seed=control_seed(manifest))
    categories = scored["categories"]
    tables: dict[str, Any] = {
        "accuracy": {c: v["accuracy"] for c, v in categories.items()},
        "correct": {c: v["correct"] for c, v in categories.items()},
        "total": {c: v["n"] for c, v in categories.items()},
        "num_images": len(images),
        "failures": scored["failures"],
    }
    if scored["color_following"]:
        tables["color_recall"] = scored["color_following"]["recall"]
        tables["color_precision"] = scored["color_following"]["precision"]
    document = summary_json(scored, table, manifest, {**(extra or {}), **tables})
    document["correct_per_image"] = scored["correct"]
    return document


def control_seed(manifest: dict[str, Any]) -> int:
    """The seed the controls of an evaluation with ``manifest`` are drawn with: its base seed (0 when it has none)."""
    return manifest.get("seed") or 0


def run_controls(
    world: ShapesWorld, specs: Sequence[PromptSpec], seed: int = 0, names: Sequence[str] = CONTROLS
) -> dict[str, dict]:
    """Every control scored on ``specs`` (one image per entry; repeat a prompt for several images).

    Returns:
        ``{name: {"overall", "ci95", "categories": {name: accuracy}, "color_f1", "background_error", "passes"}}``.
    """
    table = {}
    for name in names:
        scored = score_image_set(control_images(name, world, specs, seed), specs)
        accuracies = {c: v["accuracy"] for c, v in scored["categories"].items()}
        following = scored["color_following"]
        table[name] = {
            "overall": scored["overall"],
            "ci95": scored["ci95"],
            "categories": accuracies,
            "color_f1": following["f1"] if following else None,
            "background_error": scored["background_error"],
            "passes": control_passes(name, scored["overall"], accuracies),
        }
    return table


def thresholds() -> dict[str, Any]:
    """The controls' pass thresholds, as recorded next to them."""
    return {
        "ground_truth_min_overall": GROUND_TRUTH_MIN,
        "positive_min": {"overall": POSITIVE_MIN[0], "every_category": POSITIVE_MIN[1]},
        "negative_max": {"overall": NEGATIVE_MAX[0], "every_category": NEGATIVE_MAX[1]},
    }


def best_negative(controls: dict[str, dict]) -> tuple[str, float] | None:
    """The negative control with the highest overall score: the score garbage reaches."""
    negatives = [(n, controls[n]["overall"]) for n in NEGATIVE_CONTROLS if n in controls]
    return max(negatives, key=lambda item: item[1]) if negatives else None


def summary_json(
    scored: dict, controls: dict[str, dict] | None, manifest: dict[str, Any], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The document of ``fusedit eval --suite shapes --json PATH``::

    {"overall", "ci95", "categories": {name: {"accuracy", "n", "ci95"}}, "controls": {name: overall},
     "controls_detail": {...}, "controls_pass": bool, "control_thresholds": {...},
     "color_following": {...}, "background_error": float, "manifest": {...}, ...extra}
    """
    document: dict[str, Any] = {
        "overall": scored["overall"],
        "ci95": scored["ci95"],
        "categories": {
            name: {"accuracy": v["accuracy"], "n": v["n"], "ci95": v["ci95"]}
            for name, v in scored["categories"].items()
        },
        "controls": {name: v["overall"] for name, v in (controls or {}).items()},
    }
    if controls:
        document["controls_detail"] = controls
        document["controls_pass"] = all(v["passes"] for v in controls.values())
        document["control_thresholds"] = thresholds()
    document["color_following"] = scored["color_following"]
    document["background_error"] = scored["background_error"]
    document.update(extra or {})
    document["manifest"] = manifest
    return document


#: Keys of the summary document (``--json``), in order; ``scores.json`` holds more.
SUMMARY_KEYS = (
    "overall",
    "ci95",
    "categories",
    "controls",
    "controls_detail",
    "controls_pass",
    "control_thresholds",
    "color_following",
    "background_error",
    "failures",
    "fd_pixels",
    "manifest",
)


def summary_keys(document: dict[str, Any]) -> list[str]:
    """The :data:`SUMMARY_KEYS` present in ``document``."""
    return [k for k in SUMMARY_KEYS if k in document]


def format_report(document: dict[str, Any]) -> str:
    """Human-readable lines of a :func:`summary_json` document: the score next to its controls."""
    lo, hi = document["ci95"]
    lines = [
        f"overall {document['overall']:.3f} (95% CI {lo:.3f}-{hi:.3f}) over "
        f"{sum(v['n'] for v in document['categories'].values())} images"
    ]
    failures = document.get("failures", {})
    for name, v in document["categories"].items():
        clo, chi = v["ci95"]
        why = failures.get(name)
        wrong = (
            ""
            if not why
            else "; wrong: "
            + ", ".join(
                f"{reason.replace('_', ' ')} {count / v['n']:.0%}"
                for reason, count in sorted(why.items(), key=lambda item: -item[1])
            )
        )
        lines.append(f"  {name:<14} {v['accuracy']:.3f} ({clo:.2f}-{chi:.2f}, n={v['n']}){wrong}")
    following = document.get("color_following")
    if following:
        lines.append(
            f"  color following: recall {following['recall']:.3f}, precision {following['precision']:.3f}, "
            f"F1 {following['f1']:.3f}"
        )
    if not math.isnan(document.get("background_error", float("nan"))):
        lines.append(
            f"  background error {document['background_error']:.2f}/255 (mean |pixel - background| off the "
            "objects; the world's renders: 0)"
        )
    if "fd_pixels" in document and not math.isnan(document["fd_pixels"]):
        lines.append(f"  pixel FD {document['fd_pixels']:.3f} (lower is better; not Inception FID)")
    controls = document.get("controls_detail")
    if controls:
        worst = best_negative(controls)
        lines.append(
            "  controls (same prompts, same code): " + ", ".join(f"{n} {v['overall']:.2f}" for n, v in controls.items())
        )
        verdict = (
            "all pass"
            if document.get("controls_pass")
            else "SOME FAIL: " + ", ".join(n for n, v in controls.items() if not v["passes"])
        )
        lines.append(
            f"  controls {verdict}; ground truth {controls['ground_truth']['overall']:.3f}, best garbage "
            f"({worst[0]}) {worst[1]:.3f}"
            if worst and "ground_truth" in controls
            else f"  controls {verdict}"
        )
    return "\n".join(lines)
