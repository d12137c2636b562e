"""Grid files of a study and the plan they make: every (variant, seed) with its validated config and directory."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fusedit.config import ConfigError, from_dict, parse_override, read_yaml_mapping, resolve_config_path
from fusedit.data.shapes import ShapesWorld
from fusedit.eval.shapes_eval import ShapesEvalSettings
from fusedit.experiment import load_experiment
from fusedit.text.tiny_llm import TinyLLMConfig, ensure_shapes_world_llm

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
    tiny_llm: dict[str, Any] | None = None
    description: str = ""


_EVAL_KEYS = {
    "per_prompt": "per_prompt",
    "seed": "seed",
    "steps": "num_inference_steps",
    "cfg": "guidance_scale",
    "negative_prompt": "negative_prompt",
    "batch_size": "batch_size",
    "grid_prompts": "grid_prompts",
    "pixel_fd": "pixel_fd",
    "min_per_category": "min_per_category",
}


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


def _seeds(seeds: Any, path: Path) -> list[int]:
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise ConfigError(f"grid {path}: seeds must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"grid {path}: seeds repeat: {seeds}")
    return list(seeds)


def _variants(variants: Any, budget: list[str], path: Path) -> dict[str, list[str]]:
    """Variant name -> overrides, checked: names usable as folder names, no override of the budget or the seed."""
    if not isinstance(variants, dict) or not variants:
        raise ConfigError(f"grid {path}: variants must map names to lists of key=value overrides")
    budget_keys = set(_override_keys(budget))
    parsed = {}
    for name, overrides in variants.items():
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise ConfigError(f"grid {path}: variant name {name!r} must be a non-empty string without '/'")
        overrides = _as_overrides(overrides, f"grid {path}: variant {name!r}")
        clash = sorted((budget_keys | {"train.seed"}) & set(_override_keys(overrides)))
        if clash:
            raise ConfigError(
                f"grid {path}: variant {name!r} overrides {clash}, but the budget and the seed must be "
                f"the same for every variant (set them under budget/seeds)"
            )
        parsed[name] = overrides
    return parsed


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
    seeds = _seeds(data["seeds"], path)
    budget = _as_overrides(data["budget"], f"grid {path}: budget")
    parsed_variants = _variants(data["variants"], budget, path)
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
    return StudyGrid(
        name=str(data.get("name") or path.stem),
        path=path.resolve(),
        base=resolve_config_path(data["base"], relative_to=path.resolve().parent),
        overrides=common,
        budget=budget,
        seeds=seeds,
        variants=parsed_variants,
        eval=dict(eval_cfg),
        tiny_llm=tiny,
        description=str(data.get("description") or ""),
    )


def eval_settings(grid: StudyGrid):
    """The grid's :class:`~fusedit.eval.shapes_eval.ShapesEvalSettings`."""
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
        wanted = {
            "per_prompt": settings.per_prompt,
            "seed": settings.seed,
            "min_per_category": settings.min_per_category,
            "num_inference_steps": settings.num_inference_steps,
            "guidance_scale": settings.guidance_scale,
            "negative_prompt": settings.negative_prompt,
        }
        return [
            f"{key}: {saved.get(key, 0 if key == 'min_per_category' else None)!r} -> {value!r}"
            for key, value in wanted.items()
            if value is not None and saved.get(key, 0 if key == "min_per_category" else None) != value
        ]


def tiny_llm_overrides(grid: StudyGrid, out: Path, *, build: bool) -> list[str]:
    """``[text.llm=<folder>]`` of the study's tiny LLM (pretrained into ``out/tiny-llm`` when ``build``)."""
    if grid.tiny_llm is None:
        return []
    folder = (out / "tiny-llm").resolve()
    if build:
        base = load_experiment(grid.base, grid.overrides + grid.budget + [f"text.llm={folder}"])
        world = ShapesWorld(base.data.shapes, base.data.resolution)
        ensure_shapes_world_llm(folder, world, from_dict(TinyLLMConfig, grid.tiny_llm, prefix="tiny_llm"))
    return [f"text.llm={folder}"]


def plan_study(grid: StudyGrid, out: Path, *, build_llm: bool = False) -> list[PlannedRun]:
    """Every (variant, seed) with its validated config; raises :class:`ConfigError` for any invalid override."""
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
    try:  # read through the config loader, so that renamed keys of older runs (model.kind) compare equal
        have = yaml.safe_load(yaml.safe_dump(dataclasses.asdict(load_experiment(saved)), sort_keys=False))
    except ConfigError:
        have = yaml.safe_load(saved.read_text())
    if have != wanted:
        diff = sorted(_diff_keys(have, wanted))
        raise ConfigError(
            f"{run.run_dir} was trained with another config (differs in {diff[:8]}); delete that run "
            f"directory or choose another --out to retrain it"
        )


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = []
        for k in set(a) | set(b):
            keys += _diff_keys(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return keys
    return [] if a == b else [prefix]
