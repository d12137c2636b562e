"""Sections of a study's ``report.md`` beyond the score table: confidence intervals over seeds and images, the
controls the scores must be read against, why images fail, what each variant costs, and the runs' reproducibility
manifests.

Every function takes the per-run results of :func:`fusedit.study.runner.collect_run` (``variant``, ``seed``,
``metrics``, ``correct`` = ``{category: [bool per image]}``, ``controls``, ``manifest``) and returns markdown lines.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fusedit.eval.shapes_controls import NEGATIVE_CONTROLS, POSITIVE_CONTROLS
from fusedit.eval.shapes_scorer import FAILURES
from fusedit.study.stats import difference_ci, overall_ci, seed_t_interval


def _by_variant(results: Sequence[dict], variants: Sequence[str]) -> dict[str, list[dict]]:
    return {v: [r for r in results if r["variant"] == v] for v in variants}


def confidence_section(results: Sequence[dict], variants: Sequence[str]) -> list[str]:
    """Per variant: mean overall with its 95 % CI over seeds and images, and over seeds alone; every variant's
    difference from the first with its CI and the bootstrap probability that the sign is wrong."""
    grouped = {v: rs for v, rs in _by_variant(results, variants).items() if rs and all(r.get("correct") for r in rs)}
    if not grouped:
        return []
    lines = [
        "## How sure: bootstrap over seeds and images",
        "",
        "95 % CIs of each variant's mean `overall` from a hierarchical bootstrap: draw the seeds with replacement, "
        "then each drawn run's images within every category. Next to it, Student's t interval over the seeds' "
        "scores. Measured by simulation (`src/fusedit/study/stats.py`): with three seeds the bootstrap is "
        "conservative when seeds agree and too narrow (about 80 % coverage) when seed effects dominate; the t "
        "interval covers 94–95 % of the time but is wide. A difference is clear when both agree.",
        "",
        "| variant | mean overall | 95 % CI (seeds × images) | 95 % t interval (seeds) | images per run |",
        "|---|---|---|---|---|",
    ]
    for variant, runs in grouped.items():
        values = [r["metrics"]["overall"] for r in runs]
        lo, hi = overall_ci([r["correct"] for r in runs])
        slo, shi = seed_t_interval(values)
        images = sum(len(v) for v in runs[0]["correct"].values())
        mean = sum(values) / len(values)
        lines.append(f"| {variant} | {mean:.3f} | {lo:.3f} – {hi:.3f} | {slo:.3f} – {shi:.3f} | {images} |")
    names = list(grouped)
    if len(names) > 1:
        first = names[0]
        lines += [
            "",
            f"Differences from **{first}** (positive: {first} scores higher):",
            "",
            "| difference | 95 % CI | bootstrap P(difference ≤ 0) |",
            "|---|---|---|",
        ]
        for other in names[1:]:
            lo, hi, p = difference_ci([r["correct"] for r in grouped[first]], [r["correct"] for r in grouped[other]])
            lines.append(f"| {first} − {other} | {lo:+.3f} – {hi:+.3f} | {p:.3f} |")
    return lines + [""]


def controls_section(results: Sequence[dict]) -> list[str]:
    """The controls of the evaluation (computed by the same detector on the same held-out prompts as the runs):
    what ground truth and near-truth score, and the best that garbage reaches."""
    with_controls = [r for r in results if r.get("controls")]
    if not with_controls:
        return []
    controls: Mapping[str, float] = with_controls[0]["controls"]
    same = all(r["controls"] == controls for r in with_controls)
    passing = all(r.get("controls_pass") for r in with_controls)
    positives = [f"{n} {controls[n]:.3f}" for n in POSITIVE_CONTROLS if n in controls]
    negatives = [(n, controls[n]) for n in NEGATIVE_CONTROLS if n in controls]
    best = max(negatives, key=lambda item: item[1]) if negatives else None
    lines = [
        "## Controls",
        "",
        "The same detector on the same held-out prompts, with images that are known to be right or wrong "
        "(`fusedit eval --suite shapes --controls`):",
        "",
        "* right (ground truth and renders perturbed within what a person still calls correct): "
        + ", ".join(positives),
        "* wrong (blobs, fills, stripes, noise, background, shuffled prompts, one object too few or many): "
        + ", ".join(f"{n} {v:.3f}" for n, v in negatives),
    ]
    if best is not None:
        lines.append(
            f"* the best garbage (`{best[0]}`) scores **{best[1]:.3f}**: a variant must beat this to mean anything."
        )
    lines.append(
        f"* {'every' if passing else 'NOT every'} evaluation's controls pass their thresholds; "
        f"{'identical in every run' if same else 'they differ between runs (different prompt sets?)'}."
    )
    return lines + [""]


def failure_section(results: Sequence[dict], variants: Sequence[str]) -> list[str]:
    """Per variant: the share of all its images failing for each reason of the shapes scorer (mean ± std over
    seeds), for the variants whose every run recorded its failures; the others are named below the table."""
    by_variant = {v: rs for v, rs in _by_variant(results, variants).items() if rs}
    grouped = {v: rs for v, rs in by_variant.items() if all("failures" in r for r in rs)}
    if not grouped:
        return []
    missing = [v for v in by_variant if v not in grouped]
    lines = [
        "## Why images fail",
        "",
        "Share of all evaluated images failing for each reason (`fusedit.eval.shapes_scorer.FAILURES`, the first that "
        "applies: wrong number of objects, an object of no shape, of no color, wrong shapes, shapes not in their "
        "colors, wrong relation), mean ± std over seeds; position prompts are most of the images.",
        "",
        "| variant | right | " + " | ".join(r.replace("_", " ") for r in FAILURES) + " |",
        "|---" * (len(FAILURES) + 2) + "|",
    ]
    for variant, runs in grouped.items():
        cells = []
        for reason in ("right", *FAILURES):
            shares = np.array([_failure_share(r, reason) for r in runs])
            cells.append(f"{shares.mean():.2f} ± {shares.std(ddof=1) if len(shares) > 1 else 0.0:.2f}")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    if missing:
        lines += [
            "",
            f"Not shown: {', '.join(missing)}, some of whose evaluations predate the failure counts "
            "(`python tools/shapes_binding.py RUN/eval-shapes` counts them from the saved images).",
        ]
    return lines + [""]


def _failure_share(result: Mapping, reason: str) -> float:
    """The share of a run's images that are right (``reason="right"``) or fail for ``reason``."""
    images = sum(len(v) for v in result["correct"].values())
    if reason == "right":
        return sum(sum(v) for v in result["correct"].values()) / images
    return sum(counts.get(reason, 0) for counts in result["failures"].values()) / images


def cost_section(
    costs: Mapping[str, Mapping[str, float] | None], summary: Mapping[str, Mapping[str, dict]]
) -> list[str]:
    """Parameters, FLOPs per image (training and sampling, counted on the model) and wall time per variant."""
    if not costs and not summary:
        return []
    lines = [
        "## Cost",
        "",
        "FLOPs counted by `torch.utils.flop_counter` on each variant's trained model "
        "(`src/fusedit/study/costs.py`): training = 3 × DiT forward + LLM forward per image, "
        "sampling = one whole call at the study's steps and CFG. Wall time per run on this machine, mean ± std "
        "over seeds (how it was measured: below the table).",
        "",
        "| variant | trained params (M) | DiT forward GFLOPs/img | LLM forward GFLOPs/prompt | train GFLOPs/img | "
        "sample GFLOPs/img | train img/s | train min | eval min |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, stats in summary.items():
        cost = costs.get(variant) or {}
        flops = [
            f"{cost[k]:.4f}" if k in cost else "–"
            for k in ("dit_forward_gflops", "text_forward_gflops", "train_gflops_per_image", "sample_gflops_per_image")
        ]
        measured = [
            f"{stats[m]['mean']:.{d}f} ± {stats[m]['std']:.{d}f}" if m in stats else "–"
            for m, d in (("img_per_s", 0), ("train_min", 1), ("eval_min", 1))
        ]
        params = f"{stats['params_m']['mean']:.3f}" if "params_m" in stats else "–"
        lines.append(f"| {variant} | {params} | " + " | ".join(flops + measured) + " |")
    return lines + [""]


def manifest_section(results: Sequence[dict]) -> list[str]:
    """One line per run: code commit (and whether the tree was dirty), config and checkpoint hashes, sampling."""
    rows = [r for r in results if r.get("manifest")]
    if not rows:
        return []
    lines = [
        "## Manifests",
        "",
        "From each run's `eval-shapes/scores.json` (the whole manifest is in `results.json`).",
        "",
        "| variant | seed | commit | dirty | config hash | checkpoint hash | sampler | steps | CFG | prompt set |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["manifest"]
        cells = [
            str(m.get("commit") or "–")[:10],
            str(m.get("dirty")),
            str(m.get("config_hash") or "–")[:12],
            str(m.get("checkpoint_hash") or "–")[:12],
            str(m.get("sampler")),
            str(m.get("steps")),
            str(m.get("cfg")),
            str(m.get("prompt_set_hash") or "–")[:12],
        ]
        lines.append(f"| {r['variant']} | {r['seed']} | " + " | ".join(cells) + " |")
    return lines + [""]
