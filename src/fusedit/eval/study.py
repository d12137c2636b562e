"""``fusedit study GRID.yaml``: train and evaluate a grid of variants × seeds with one budget, then report.

A grid file (YAML)::

    name: deep-vs-shallow
    base: ../demo.yaml            # experiment config (relative to the grid file, or a shipped config name)
    tiny_llm: {}                  # optional: pretrain the shapes-world tiny LLM (TinyLLMConfig fields) and use it
    overrides: [data.shapes.size=20000]   # optional, applied to every run
    budget:                       # the same for every variant; variants may not override these keys
      train.max_steps: 500
      train.batch_size: 32
    seeds: [0, 1, 2]              # each becomes train.seed=<seed>
    variants:                     # name -> list of key=value overrides
      deep: [model.fusion=deep]
      shallow-self: [model.fusion=shallow, model.attention=self]
    eval: {per_prompt: 2, seed: 1234, steps: 20, cfg: 4.0}   # the shapes suite (ShapesEvalSettings)

Every (variant, seed) trains with :func:`fusedit.run.train_run` in ``OUT/runs/<variant>/seed-<seed>`` and is
evaluated with the shapes suite into ``.../eval-shapes/``. Resumable: a run with ``final/`` and ``scores.json`` is
reused; a run with ``final/`` only is evaluated; a partial run resumes from its latest checkpoint (``train_run``);
a run evaluated with other sampling settings than the grid's ``eval`` is evaluated again (not retrained).
A run whose saved ``config.yaml`` differs from what the grid asks for is an error (never silently reused).

``OUT`` gets ``report.md`` (mean ± std over seeds per metric and variant, Welch t-tests against the first variant,
configs and commands to reproduce), ``results.json``, ``plots/loss.png``, ``plots/scores.png`` and
``grids/<variant>-<category>.png`` (the first seed's evaluation grids).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml

from fusedit.config import ConfigError, parse_override, read_yaml_mapping, resolve_config_path

GRID_KEYS = ("name", "base", "tiny_llm", "overrides", "budget", "seeds", "variants", "eval", "description")
EVAL_DIR = "eval-shapes"


# ----------------------------------------------------------------------------------------------------------------
# Grid files
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class StudyGrid:
    """A parsed grid file (see the module docstring).

    Attributes:
        name: study name.
        path: the grid file.
        base: resolved path of the base experiment config.
        overrides: ``key=value`` overrides applied to every run.
        budget: ``key=value`` overrides fixing the training budget (the same for every variant).
        seeds: training seeds.
        variants: variant name → ``key=value`` overrides.
        eval: keyword arguments of :class:`~fusedit.eval.shapes_eval.ShapesEvalSettings`.
        tiny_llm: ``TinyLLMConfig`` fields when the study pretrains the shapes-world tiny LLM, else ``None``.
        description: free text for the report.
    """

    name: str
    path: Path
    base: Path
    overrides: list[str]
    budget: list[str]
    seeds: list[int]
    variants: dict[str, list[str]]
    eval: dict[str, Any] = field(default_factory=dict)
    tiny_llm: Optional[dict[str, Any]] = None
    description: str = ""


_EVAL_KEYS = {"per_prompt": "per_prompt", "seed": "seed", "steps": "num_inference_steps",
              "cfg": "guidance_scale", "negative_prompt": "negative_prompt", "batch_size": "batch_size",
              "grid_prompts": "grid_prompts", "pixel_fd": "pixel_fd", "min_per_category": "min_per_category"}


def _as_overrides(value: Any, where: str) -> list[str]:
    """A list of ``key=value`` strings, or a mapping ``{key: value}`` turned into one."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in value.items()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected a list of key=value strings (or a mapping), got {value!r}")
    for text in value:
        parse_override(text)
    return list(value)


def _override_keys(overrides: Sequence[str]) -> list[str]:
    return [".".join(parse_override(text)[0]) for text in overrides]


def load_grid(path: str | Path) -> StudyGrid:
    """Read and check a grid file (structure only; :func:`plan_study` checks every run's config)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"grid file {str(path)!r} does not exist")
    data = read_yaml_mapping(path, "grid")
    unknown = sorted(set(data) - set(GRID_KEYS))
    if unknown:
        raise ConfigError(f"grid {path}: unknown key(s) {unknown}; allowed: {', '.join(GRID_KEYS)}")
    for required in ("base", "seeds", "variants", "budget"):
        if required not in data:
            raise ConfigError(f"grid {path}: missing {required!r}")
    seeds = data["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in seeds):
        raise ConfigError(f"grid {path}: seeds must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"grid {path}: seeds repeat: {seeds}")
    variants = data["variants"]
    if not isinstance(variants, dict) or not variants:
        raise ConfigError(f"grid {path}: variants must map names to lists of key=value overrides")
    budget = _as_overrides(data["budget"], f"grid {path}: budget")
    budget_keys = set(_override_keys(budget))
    parsed_variants = {}
    for name, overrides in variants.items():
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise ConfigError(f"grid {path}: variant name {name!r} must be a non-empty string without '/'")
        overrides = _as_overrides(overrides, f"grid {path}: variant {name!r}")
        clash = sorted((budget_keys | {"train.seed"}) & set(_override_keys(overrides)))
        if clash:
            raise ConfigError(f"grid {path}: variant {name!r} overrides {clash}, but the budget and the seed must be "
                              f"the same for every variant (set them under budget/seeds)")
        parsed_variants[name] = overrides
    common = _as_overrides(data.get("overrides"), f"grid {path}: overrides")
    if "train.seed" in _override_keys(common + budget):
        raise ConfigError(f"grid {path}: set seeds with 'seeds:', not train.seed")
    eval_cfg = data.get("eval") or {}
    if not isinstance(eval_cfg, dict):
        raise ConfigError(f"grid {path}: eval must be a mapping, got {eval_cfg!r}")
    bad = sorted(set(eval_cfg) - set(_EVAL_KEYS))
    if bad:
        raise ConfigError(f"grid {path}: unknown eval key(s) {bad}; allowed: {', '.join(_EVAL_KEYS)}")
    tiny = data.get("tiny_llm")
    if tiny is not None and not isinstance(tiny, dict):
        raise ConfigError(f"grid {path}: tiny_llm must be a mapping of TinyLLMConfig fields ({{}} for the defaults)")
    return StudyGrid(name=str(data.get("name") or path.stem), path=path.resolve(),
                     base=resolve_config_path(data["base"], relative_to=path.resolve().parent),
                     overrides=common, budget=budget, seeds=list(seeds), variants=parsed_variants,
                     eval=dict(eval_cfg), tiny_llm=tiny, description=str(data.get("description") or ""))


def eval_settings(grid: StudyGrid):
    """The grid's :class:`~fusedit.eval.shapes_eval.ShapesEvalSettings`."""
    from fusedit.eval.shapes_eval import ShapesEvalSettings

    settings = ShapesEvalSettings(**{_EVAL_KEYS[k]: v for k, v in grid.eval.items()})
    settings.validate()
    return settings


# ----------------------------------------------------------------------------------------------------------------
# Plan
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class PlannedRun:
    """One (variant, seed) of a study: its overrides, resolved config and directory."""

    variant: str
    seed: int
    overrides: list[str]
    config: Any  # ExperimentConfig
    run_dir: Path

    @property
    def eval_dir(self) -> Path:
        return self.run_dir / EVAL_DIR

    @property
    def scores_path(self) -> Path:
        return self.eval_dir / "scores.json"

    @property
    def trained(self) -> bool:
        return (self.run_dir / "final").is_dir()

    @property
    def evaluated(self) -> bool:
        return self.scores_path.is_file()

    def eval_differences(self, settings) -> list[str]:
        """Sampling settings of the saved ``scores.json`` that differ from ``settings`` (empty: reusable)."""
        saved = json.loads(self.scores_path.read_text()).get("settings", {})
        wanted = {"per_prompt": settings.per_prompt, "seed": settings.seed,
                  "min_per_category": settings.min_per_category,
                  "num_inference_steps": settings.num_inference_steps, "guidance_scale": settings.guidance_scale,
                  "negative_prompt": settings.negative_prompt}
        return [f"{key}: {saved.get(key, 0 if key == 'min_per_category' else None)!r} -> {value!r}"
                for key, value in wanted.items()
                if value is not None and saved.get(key, 0 if key == "min_per_category" else None) != value]


def tiny_llm_overrides(grid: StudyGrid, out: Path, *, build: bool) -> list[str]:
    """``[text.llm=<folder>]`` of the study's tiny LLM (pretrained into ``out/tiny-llm`` when ``build``)."""
    if grid.tiny_llm is None:
        return []
    folder = (out / "tiny-llm").resolve()
    if build:
        from fusedit.config import from_dict
        from fusedit.data.shapes import ShapesWorld
        from fusedit.experiment import load_experiment
        from fusedit.text.tiny_llm import TinyLLMConfig, ensure_shapes_world_llm

        base = load_experiment(grid.base, grid.overrides + grid.budget + [f"text.llm={folder}"])
        world = ShapesWorld(base.data.shapes, base.data.resolution)
        ensure_shapes_world_llm(folder, world, from_dict(TinyLLMConfig, grid.tiny_llm, prefix="tiny_llm"))
    return [f"text.llm={folder}"]


def plan_study(grid: StudyGrid, out: Path, *, build_llm: bool = False) -> list[PlannedRun]:
    """Every (variant, seed) with its validated config; raises :class:`ConfigError` for any invalid override."""
    from fusedit.experiment import load_experiment

    llm = tiny_llm_overrides(grid, out, build=build_llm)
    runs = []
    for seed in grid.seeds:  # seed-major: an interrupted study has every variant at its first seeds
        for variant, overrides in grid.variants.items():
            full = grid.overrides + llm + grid.budget + overrides + [f"train.seed={seed}", f"name={variant}-seed{seed}"]
            try:
                config = load_experiment(grid.base, full)
            except ConfigError as error:
                raise ConfigError(f"variant {variant!r} (seed {seed}): {error}") from None
            runs.append(PlannedRun(variant, seed, full, config, out / "runs" / variant / f"seed-{seed}"))
    return runs


def check_reusable(run: PlannedRun) -> None:
    """Raise when ``run.run_dir`` holds a run trained with another config than the grid asks for."""
    saved = run.run_dir / "config.yaml"
    if not saved.is_file():
        return
    wanted = yaml.safe_load(yaml.safe_dump(dataclasses.asdict(run.config), sort_keys=False))
    have = yaml.safe_load(saved.read_text())
    if have != wanted:
        diff = sorted(_diff_keys(have, wanted))
        raise ConfigError(f"{run.run_dir} was trained with another config (differs in {diff[:8]}); delete that run "
                          f"directory or choose another --out to retrain it")


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = []
        for k in set(a) | set(b):
            keys += _diff_keys(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return keys
    return [] if a == b else [prefix]


# ----------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------


def default_train(run: PlannedRun, *, progress: bool) -> None:
    """Train ``run`` with :func:`fusedit.run.train_run` (resuming its checkpoint)."""
    from fusedit.run import train_run

    train_run(run.config, run.run_dir, progress=progress)


def default_evaluate(run: PlannedRun, settings) -> dict:
    """Evaluate ``run`` with the shapes suite into ``run.eval_dir``."""
    from fusedit.eval.shapes_eval import evaluate_shapes, world_from_config
    from fusedit.pipeline import load_pipeline

    pipe = load_pipeline(run.run_dir)
    return evaluate_shapes(pipe, world_from_config(pipe.config), run.eval_dir, settings, model_path=str(run.run_dir))


def run_study(grid: StudyGrid, out: Path, *, train_fn: Callable = default_train, eval_fn: Callable = default_evaluate,
              progress: bool = False, log: Callable[[str], None] = print) -> list[dict]:
    """Train, evaluate and report every run of ``grid`` in ``out``; returns the per-run results.

    ``train_fn(run, progress=)`` and ``eval_fn(run, settings) -> scores`` are injectable (tests use fakes).
    """
    out.mkdir(parents=True, exist_ok=True)
    settings = eval_settings(grid)
    runs = plan_study(grid, out, build_llm=True)
    for run in runs:
        check_reusable(run)
    started, trained_seconds, trained_count = time.perf_counter(), 0.0, 0
    results = []
    for number, run in enumerate(runs, 1):
        label = f"run {number}/{len(runs)}: {run.variant} seed {run.seed}"
        changed = run.eval_differences(settings) if run.evaluated else []
        if changed:
            log(f"{label} — the grid's eval settings changed ({', '.join(changed)}); evaluating again")
        if run.trained and run.evaluated and not changed:
            log(f"{label} — done before, reusing {run.run_dir}")
        else:
            if not run.trained:
                remaining = sum(not r.trained for r in runs[number - 1:])
                eta = "" if not trained_count else \
                    f", about {trained_seconds / trained_count * remaining / 60:.0f} min of training left"
                log(f"{label} — training {run.config.train.max_steps} steps in {run.run_dir}{eta}")
                t0 = time.perf_counter()
                train_fn(run, progress=progress)
                trained_seconds += time.perf_counter() - t0
                trained_count += 1
                if not run.trained:
                    raise RuntimeError(f"training {run.run_dir} finished without writing final/")
            log(f"{label} — evaluating (shapes suite) into {run.eval_dir}")
            eval_fn(run, settings)
            if not run.evaluated:
                raise RuntimeError(f"evaluation of {run.run_dir} did not write {run.scores_path}")
        results.append(collect_run(run))
    log(f"all {len(runs)} runs done in {(time.perf_counter() - started) / 60:.1f} min; writing the report")
    write_report(grid, out, runs, results)
    return results


def collect_run(run: PlannedRun) -> dict:
    """Metrics of a finished run: its shapes scores and training summary (from ``metrics.jsonl``)."""
    from fusedit.train.logging import read_metrics

    scores = json.loads(run.scores_path.read_text())
    records = [r for r in read_metrics(run.run_dir) if "loss" in r]
    tail = records[-3:]
    metrics = {"overall": scores["overall"], "acc_images": sum(scores["correct"].values()) / scores["num_images"],
               **{f"acc/{k}": v for k, v in scores["accuracy"].items()}}
    for name in ("fd_pixels", "color_recall", "color_precision"):
        if name in scores:
            metrics[name] = scores[name]
    if tail:
        metrics["final_loss"] = sum(r["loss"] for r in tail) / len(tail)
    speeds = [r["img_per_s"] for r in records if "img_per_s" in r]
    if speeds:
        metrics["img_per_s"] = sum(speeds) / len(speeds)
    params = count_parameters(run.run_dir / "final" / "model.safetensors")
    if params is not None:
        metrics["params_m"] = params / 1e6
    return {"variant": run.variant, "seed": run.seed, "run_dir": str(run.run_dir), "metrics": metrics,
            "loss_curve": [[r["step"], r["loss"]] for r in records], "grids": scores.get("grids", {})}


def count_parameters(path: Path) -> Optional[int]:
    """Number of trained values in a safetensors file (``None`` when it does not exist)."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), framework="pt") as weights:
        for key in weights.keys():
            shape = weights.get_slice(key).get_shape()
            total += math.prod(shape)
    return total


# ----------------------------------------------------------------------------------------------------------------
# Statistics and report
# ----------------------------------------------------------------------------------------------------------------

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
    "final_loss": ("final loss ↓", False),
    "img_per_s": ("train img/s ↑", True),
    "params_m": ("trained params (M)", None),
}


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
    from scipy import stats

    result = stats.ttest_ind(list(a), list(b), equal_var=False)
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
    digits = 1 if metric == "img_per_s" else 3 if not metric.startswith("fd") else 4
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def verdict_lines(summary: dict[str, dict[str, dict]],
                  metrics: Sequence[str] = ("overall", "color_recall", "color_precision", "fd_pixels",
                                            "final_loss")) -> list[str]:
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
            parts.append(f"{other} {o['mean']:.4g} ± {o['std']:.2g} (difference {b['mean'] - o['mean']:+.4g}, "
                         f"Welch p = {p:.2g}, seed ranges {'overlap' if overlap else 'do not overlap'})")
        lines.append(f"* **{label}**: best is **{best}** ({b['mean']:.4g} ± {b['std']:.2g}); vs " + "; ".join(parts)
                     + ".")
    return lines


def markdown_table(summary: dict[str, dict[str, dict]], num_seeds: int) -> str:
    """Rows: variants; columns: metrics as ``mean ± std`` over seeds."""
    metrics = [m for m in METRIC_INFO if any(m in s for s in summary.values())]
    lines = ["| variant | " + " | ".join(METRIC_INFO[m][0] for m in metrics) + " |",
             "|---|" + "---|" * len(metrics)]
    for variant, stats in summary.items():
        cells = [_fmt(m, stats[m]["mean"], stats[m]["std"]) if m in stats else "–" for m in metrics]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"mean ± sample standard deviation over {num_seeds} training seed(s).")
    return "\n".join(lines)


def comparison_lines(summary: dict[str, dict[str, dict]],
                     metrics: Sequence[str] = ("overall", "color_recall", "color_precision", "fd_pixels",
                                               "final_loss")) -> list[str]:
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


def write_report(grid: StudyGrid, out: Path, runs: Sequence[PlannedRun], results: Sequence[dict]) -> Path:
    """``report.md``, ``results.json``, plots and per-variant grids."""
    from fusedit.eval.plots import plot_loss_curves, plot_scores

    summary = summarize(results, list(grid.variants))
    (out / "results.json").write_text(json.dumps({"grid": str(grid.path), "summary": summary, "runs": results},
                                                 indent=1) + "\n")
    plots = out / "plots"
    loss_png = plot_loss_curves(results, list(grid.variants), plots / "loss.png")
    scores_png = plot_scores(summary, plots / "scores.png")
    grids = copy_variant_grids(runs, out / "grids")
    settings = eval_settings(grid)
    first = runs[0].config
    command = f"fusedit study {shlex.quote(_shown_path(grid.path))} --out {shlex.quote(_shown_path(out))}"
    lines = [f"# Study: {grid.name}", ""]
    if grid.description:
        lines += [grid.description.strip(), ""]
    lines += [
        "## Results", "",
        f"Shapes suite: every held-out prompt of the shapes world (never seen in training), "
        f"{settings.per_prompt} image(s) per prompt, eval seed {settings.seed}, "
        f"{settings.num_inference_steps or first.sample.num_inference_steps} Euler steps, CFG "
        f"{settings.guidance_scale if settings.guidance_scale is not None else first.sample.guidance_scale}. "
        "Accuracies are GenEval-style (overall = mean of the category accuracies; \"all images\" = correct / all "
        "images, dominated by the largest category). Pixel FD is a Fréchet distance "
        "on 8×8 mean-pooled RGB between the samples and real renders of the same prompts — an image-statistics "
        "proxy, not Inception FID.", "",
        markdown_table(summary, len(grid.seeds)), "",
    ]
    verdict = verdict_lines(summary)
    if verdict:
        lines += ["Summary (computed):", ""] + verdict + [""]
    notes = out / "notes.md"
    if notes.is_file():
        lines += ["## Reading the numbers", "", notes.read_text().strip(), ""]
    comparison = comparison_lines(summary)
    if comparison:
        lines += [f"Welch t-tests against the first variant (with {len(grid.seeds)} seeds per variant these are "
                  "coarse: p < 0.05 needs a difference several standard deviations wide):", ""] + comparison + [""]
    lines += ["Per-seed values:", "", "| variant | seed | " + " | ".join(
        METRIC_INFO[m][0] for m in ("overall", "fd_pixels", "final_loss")) + " |", "|---|---|---|---|---|"]
    order = {v: i for i, v in enumerate(grid.variants)}
    for r in sorted(results, key=lambda r: (order[r["variant"]], r["seed"])):
        cells = [f"{r['metrics'][m]:.4f}" if m in r["metrics"] else "–" for m in ("overall", "fd_pixels", "final_loss")]
        lines.append(f"| {r['variant']} | {r['seed']} | " + " | ".join(cells) + " |")
    lines += ["", "## Plots", "", f"![loss curves]({loss_png.relative_to(out)})", "",
              f"![scores]({scores_png.relative_to(out)})", "", "## Samples (first seed, held-out prompts)", ""]
    for variant, files in grids.items():
        lines.append(f"**{variant}**: " + ", ".join(f"[{c}]({p.relative_to(out)})" for c, p in files.items()))
        lines.append("")
    lines += ["## Reproduce", "", "```", command, "```", "",
              "On a CPU shared with other work add `--threads 1` (or `OMP_NUM_THREADS=1`): oversubscribed OpenMP "
              "threads slow training down many times. Runs resume; finished runs are reused.", "",
              f"Grid file: `{_shown_path(grid.path)}`; base config `{_shown_path(grid.base)}`; every run: "
              f"`fusedit train {_shown_path(grid.base)} <overrides> --run-dir <run>` with the overrides below, then "
              f"`fusedit eval <run> --suite shapes " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in grid.eval.items()
                                                              if k in ('per_prompt', 'min_per_category', 'seed', 'steps', 'cfg')) + "`.", ""]
    for variant in grid.variants:
        example = next(r for r in runs if r.variant == variant)
        shown = [o for o in example.overrides if not o.startswith("name=")]
        lines.append(f"* **{variant}**: `" + " ".join(shlex.quote(o) for o in shown) + "` (seed varies)")
    lines += ["", "Exact configs: `runs/<variant>/seed-<seed>/config.yaml`. Budget: " +
              ", ".join(f"`{b}`" for b in grid.budget) + f"; seeds {grid.seeds}.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _shown_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies under it, else absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def copy_variant_grids(runs: Sequence[PlannedRun], target: Path) -> dict[str, dict[str, Path]]:
    """Copy the first seed's per-category evaluation grids of every variant to ``target/<variant>-<cat>.png``."""
    import shutil

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


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusedit study", description="Train and evaluate a grid of variants × seeds "
                                     "with one budget; write report.md, plots and sample grids (resumable).")
    parser.add_argument("grid", help="grid YAML file (see src/fusedit/configs/studies/)")
    parser.add_argument("--out", help="study folder (default: runs/studies/<grid name>)")
    parser.add_argument("--dry-run", action="store_true", help="check every config and list the runs, train nothing")
    parser.add_argument("--report-only", action="store_true", help="rewrite report.md from finished runs only")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 on a CPU shared with other work; default: torch's choice)")
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    grid = load_grid(args.grid)
    out = Path(args.out or Path("runs") / "studies" / grid.name)
    if args.dry_run:
        runs = plan_study(grid, out, build_llm=False)
        print(f"study {grid.name}: {len(grid.variants)} variant(s) × {len(grid.seeds)} seed(s) = {len(runs)} runs "
              f"in {out}")
        for number, run in enumerate(runs, 1):
            state = "done" if run.trained and run.evaluated else "trained" if run.trained else "to train"
            print(f"run {number}/{len(runs)}: {run.variant} seed {run.seed} [{state}] "
                  + " ".join(o for o in run.overrides if not o.startswith("name=")))
        return 0
    if args.report_only:
        runs = plan_study(grid, out, build_llm=False)
        missing = [str(r.run_dir) for r in runs if not (r.trained and r.evaluated)]
        if missing:
            raise FileNotFoundError(f"--report-only needs every run trained and evaluated; missing: {missing}")
        path = write_report(grid, out, runs, [collect_run(r) for r in runs])
        print(path)
        return 0
    run_study(grid, out, progress=sys.stderr.isatty(), log=lambda m: print(m, flush=True))
    print(out / "report.md")
    return 0
