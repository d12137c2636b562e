"""The report of a study: statistics over seeds (mean ± std, Welch t-tests), ``report.md``, ``results.json``, plots
and sample grids."""

from __future__ import annotations

import json
import math
import shlex
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from scipy import stats as scipy_stats

from fusedit.eval.plots import plot_loss_curves, plot_scores
from fusedit.study.grid import PlannedRun, StudyGrid, eval_settings
from fusedit.study.report_sections import (
    confidence_section,
    controls_section,
    cost_section,
    failure_section,
    manifest_section,
)
from fusedit.study.timing import read_sessions, wall_time_lines

#: Metric name → (label, higher is better).
METRIC_INFO = {
    "overall": ("shapes overall ↑", True),
    "acc_images": ("all images ↑", True),
    "acc/single_object": ("single object ↑", True),
    "acc/two_object": ("two object ↑", True),
    "acc/counting": ("counting ↑", True),
    "acc/colors": ("colors ↑", True),
    "acc/position": ("position ↑", True),
    "acc/color_attr": ("color attr ↑", True),
    "color_recall": ("color recall ↑", True),
    "color_precision": ("color precision ↑", True),
    "fd_pixels": ("pixel FD ↓", False),
    "background_error": ("background error /255 ↓", False),
    "final_loss": ("final loss ↓", False),
    "img_per_s": ("train img/s ↑", True),
    "params_m": ("trained params (M)", None),
    "train_min": ("train min", None),
    "eval_min": ("eval min", None),
}

#: Metrics compared variant against variant (verdicts and Welch tests).
VERDICT_METRICS = ("overall", "color_recall", "color_precision", "fd_pixels", "background_error", "final_loss")

#: Metrics of the main table (the cost metrics have their own section).
SCORE_METRICS = tuple(m for m in METRIC_INFO if m not in ("img_per_s", "params_m", "train_min", "eval_min"))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def welch_t(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Welch's t statistic and two-sided p-value of ``mean(a) != mean(b)`` (nan when undefined)."""
    if len(a) < 2 or len(b) < 2:
        return float("nan"), float("nan")

    result = scipy_stats.ttest_ind(list(a), list(b), equal_var=False)
    return float(result.statistic), float(result.pvalue)


def summarize(results: Sequence[dict], variants: Sequence[str]) -> dict[str, dict[str, dict]]:
    """``{variant: {metric: {"mean", "std", "values"}}}`` over seeds."""
    table: dict[str, dict[str, dict]] = {}
    for variant in variants:
        rows = [r for r in results if r["variant"] == variant]
        metrics = [m for m in METRIC_INFO if all(m in r["metrics"] for r in rows)] if rows else []
        table[variant] = {}
        for metric in metrics:
            values = [r["metrics"][metric] for r in rows]
            mean, std = mean_std(values)
            table[variant][metric] = {"mean": mean, "std": std, "values": values}
    return table


def _fmt(metric: str, mean: float, std: float) -> str:
    if metric == "params_m":
        return f"{mean:.3f}" if std == 0 else f"{mean:.3f} ± {std:.3f}"
    digits = 1 if metric in ("img_per_s", "train_min", "eval_min") else 3 if not metric.startswith("fd") else 4
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def verdict_lines(
    summary: dict[str, dict[str, dict]],
    metrics: Sequence[str] = VERDICT_METRICS,
) -> list[str]:
    """For each metric: the best variant by mean, and against every other variant the difference, Welch's p and
    whether the per-seed ranges overlap — a plain statement of how sure the seeds let us be."""
    lines = []
    for metric in metrics:
        have = [v for v in summary if metric in summary[v]]
        if len(have) < 2:
            continue
        label, higher = METRIC_INFO[metric]
        best = (max if higher else min)(have, key=lambda v: summary[v][metric]["mean"])
        b = summary[best][metric]
        parts = []
        for other in have:
            if other == best:
                continue
            o = summary[other][metric]
            _, p = welch_t(b["values"], o["values"])
            overlap = min(b["values"]) <= max(o["values"]) and min(o["values"]) <= max(b["values"])
            parts.append(
                f"{other} {o['mean']:.4g} ± {o['std']:.2g} (difference {b['mean'] - o['mean']:+.4g}, "
                f"Welch p = {p:.2g}, seed ranges {'overlap' if overlap else 'do not overlap'})"
            )
        lines.append(
            f"* **{label}**: best is **{best}** ({b['mean']:.4g} ± {b['std']:.2g}); vs " + "; ".join(parts) + "."
        )
    return lines


def markdown_table(summary: dict[str, dict[str, dict]], num_seeds: int, shown: Sequence[str] = SCORE_METRICS) -> str:
    """Rows: variants; columns: the ``shown`` metrics as ``mean ± std`` over seeds."""
    metrics = [m for m in shown if any(m in s for s in summary.values())]
    lines = ["| variant | " + " | ".join(METRIC_INFO[m][0] for m in metrics) + " |", "|---|" + "---|" * len(metrics)]
    for variant, stats in summary.items():
        cells = [_fmt(m, stats[m]["mean"], stats[m]["std"]) if m in stats else "–" for m in metrics]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"mean ± sample standard deviation over {num_seeds} training seed(s).")
    return "\n".join(lines)


def comparison_lines(
    summary: dict[str, dict[str, dict]],
    metrics: Sequence[str] = VERDICT_METRICS,
) -> list[str]:
    """Welch t-tests of every variant against the first one, for ``metrics``."""
    variants = list(summary)
    if len(variants) < 2:
        return []
    ref = variants[0]
    lines = []
    for metric in metrics:
        if metric not in summary[ref]:
            continue
        for other in variants[1:]:
            if metric not in summary[other]:
                continue
            a, b = summary[ref][metric]["values"], summary[other][metric]["values"]
            t, p = welch_t(a, b)
            diff = summary[ref][metric]["mean"] - summary[other][metric]["mean"]
            lines.append(f"| {METRIC_INFO[metric][0]} | {ref} − {other} | {diff:+.4f} | {t:.2f} | {p:.3g} |")
    if not lines:
        return []
    return ["| metric | difference | mean diff | Welch t | p (two-sided) |", "|---|---|---|---|---|"] + lines


def _results_section(grid: StudyGrid, runs: Sequence[PlannedRun], summary: dict, out: Path) -> list[str]:
    settings = eval_settings(grid)
    first = runs[0].config
    lines = [
        "## Results",
        "",
        f"Shapes suite: every held-out prompt of the shapes world (never seen in training), "
        f"{settings.per_prompt} image(s) per prompt, eval seed {settings.seed}, "
        f"{settings.num_inference_steps or first.sample.num_inference_steps} Euler steps, CFG "
        f"{settings.guidance_scale if settings.guidance_scale is not None else first.sample.guidance_scale}. "
        'Accuracies are GenEval-style (overall = mean of the category accuracies; "all images" = correct / all '
        "images, dominated by the largest category). Pixel FD is a Fréchet distance "
        "on 8×8 mean-pooled RGB between the samples and real renders of the same prompts — an image-statistics "
        "proxy, not Inception FID.",
        "",
        markdown_table(summary, len(grid.seeds)),
        "",
    ]
    verdict = verdict_lines(summary)
    if verdict:
        lines += ["Summary (computed):", ""] + verdict + [""]
    notes = out / "notes.md"
    if notes.is_file():
        lines += ["## Reading the numbers", "", notes.read_text().strip(), ""]
    comparison = comparison_lines(summary)
    if comparison:
        lines += (
            [
                f"Welch t-tests against the first variant (with {len(grid.seeds)} seeds per variant these are "
                "coarse: p < 0.05 needs a difference several standard deviations wide):",
                "",
            ]
            + comparison
            + [""]
        )
    return lines


def _per_seed_section(grid: StudyGrid, results: Sequence[dict]) -> list[str]:
    shown = ("overall", "fd_pixels", "final_loss")
    lines = [
        "Per-seed values:",
        "",
        "| variant | seed | " + " | ".join(METRIC_INFO[m][0] for m in shown) + " |",
        "|---|---|---|---|---|",
    ]
    order = {v: i for i, v in enumerate(grid.variants)}
    for r in sorted(results, key=lambda r: (order[r["variant"]], r["seed"])):
        cells = [f"{r['metrics'][m]:.4f}" if m in r["metrics"] else "–" for m in shown]
        lines.append(f"| {r['variant']} | {r['seed']} | " + " | ".join(cells) + " |")
    return lines


def _reproduce_section(grid: StudyGrid, runs: Sequence[PlannedRun], out: Path) -> list[str]:
    command = f"fusedit study {shlex.quote(_shown_path(grid.path))} --out {shlex.quote(_shown_path(out))}"
    eval_flags = " ".join(
        f"--{k.replace('_', '-')} {v}"
        for k, v in grid.eval.items()
        if k in ("per_prompt", "min_per_category", "seed", "steps", "cfg")
    )
    lines = [
        "## Reproduce",
        "",
        "```",
        command,
        "```",
        "",
        "On a CPU shared with other work add `--threads 1` (or `OMP_NUM_THREADS=1`): oversubscribed OpenMP "
        "threads slow training down many times. Runs resume; finished runs are reused.",
        "",
        f"Grid file: `{_shown_path(grid.path)}`; base config `{_shown_path(grid.base)}`; every run: "
        f"`fusedit train {_shown_path(grid.base)} <overrides> --run-dir <run>` with the overrides below, then "
        f"`fusedit eval <run> --suite shapes {eval_flags}`.",
        "",
    ]
    for variant in grid.variants:
        example = next(r for r in runs if r.variant == variant)
        shown = [_in_study(o, out) for o in example.overrides if not o.startswith("name=")]
        asked = " ".join(shlex.quote(o) for o in grid.variants[variant]) or "nothing: the base"
        lines.append(
            f"* **{variant}** (the grid's overrides: `{asked}`): `"
            + " ".join(shlex.quote(o) for o in shown)
            + "` (seed varies)"
        )
    lines += [
        "",
        "`STUDY` is the study folder (`--out`), where the study pretrains its tiny LLMs. Exact configs: "
        "`runs/<variant>/seed-<seed>/config.yaml`. Budget: "
        + ", ".join(f"`{b}`" for b in grid.budget)
        + f"; seeds {grid.seeds}.",
        "",
    ]
    return lines


def write_report(
    grid: StudyGrid,
    out: Path,
    runs: Sequence[PlannedRun],
    results: Sequence[dict],
    costs: Mapping[str, Mapping[str, float] | None] | None = None,
) -> Path:
    """``report.md``, ``results.json``, plots and per-variant grids; ``costs`` are the variants' FLOPs
    (:func:`fusedit.study.runner.variant_costs`)."""
    summary = summarize(results, list(grid.variants))
    (out / "results.json").write_text(
        json.dumps({"grid": str(grid.path), "summary": summary, "costs": costs or {}, "runs": results}, indent=1) + "\n"
    )
    plots = out / "plots"
    loss_png = plot_loss_curves(results, list(grid.variants), plots / "loss.png")
    scores_png = plot_scores(summary, plots / "scores.png")
    grids = copy_variant_grids(runs, out / "grids")
    lines = [f"# Study: {grid.name}", ""]
    if grid.description:
        lines += [grid.description.strip(), ""]
    lines += _results_section(grid, runs, summary, out)
    lines += confidence_section(results, list(grid.variants))
    lines += controls_section(results)
    lines += failure_section(results, list(grid.variants))
    lines += cost_section(costs or {}, summary)
    lines += wall_time_lines(results, read_sessions(out))
    lines += reused_lines(results)
    lines += _per_seed_section(grid, results)
    lines += [
        "",
        "## Plots",
        "",
        f"![loss curves]({loss_png.relative_to(out)})",
        "",
        f"![scores]({scores_png.relative_to(out)})",
        "",
        "## Samples (first seed, held-out prompts)",
        "",
    ]
    for variant, files in grids.items():
        lines.append(f"**{variant}**: " + ", ".join(f"[{c}]({p.relative_to(out)})" for c, p in files.items()))
        lines.append("")
    lines += _reproduce_section(grid, runs, out)
    lines += manifest_section(results)
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def reused_lines(results: Sequence[dict]) -> list[str]:
    """A report paragraph naming the runs adopted from other studies (:mod:`fusedit.study.reuse`; empty when there
    are none)."""
    reused = [r for r in results if r.get("reused_from")]
    if not reused:
        return []
    which = "; ".join(f"{r['variant']} seed {r['seed']} ← `{_shown_path(r['reused_from'])}`" for r in reused)
    from_files = sum("train_seconds_from" in r for r in reused)
    how = f" ({from_files} of them from the source's file times: it recorded none)" if from_files else ""
    return [
        f"Reused runs: {len(reused)} of {len(results)} runs were trained by another study with the identical config "
        f"and text model (`--reuse-from`), copied here and evaluated by this study; their training time is the "
        f"source's{how}: {which}.",
        "",
    ]


def _in_study(override: str, out: Path) -> str:
    """``override`` with a value inside the study folder ``out`` written as ``STUDY/...`` (the tiny LLMs' folders),
    so that a report moved elsewhere names no machine's absolute path."""
    key, sep, value = override.partition("=")
    if not sep or not value.startswith("/"):
        return override
    try:
        return f"{key}=STUDY/{Path(value).resolve().relative_to(out.resolve())}"
    except ValueError:
        return override


def _shown_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies under it, else absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def copy_variant_grids(runs: Sequence[PlannedRun], target: Path) -> dict[str, dict[str, Path]]:
    """Copy the first seed's per-category evaluation grids of every variant to ``target/<variant>-<cat>.png``."""
    target.mkdir(parents=True, exist_ok=True)
    copied: dict[str, dict[str, Path]] = {}
    for run in runs:
        if run.variant in copied:
            continue
        scores = json.loads(run.scores_path.read_text())
        copied[run.variant] = {}
        for category, name in scores.get("grids", {}).items():
            source = run.eval_dir / name
            if source.is_file():
                dest = target / f"{run.variant}-{category}.png"
                shutil.copyfile(source, dest)
                copied[run.variant][category] = dest
    return copied
