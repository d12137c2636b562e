"""Grid files of a study and the plan they make: every (variant, seed) with its validated config and directory."""

from __future__ import annotations

import dataclasses
import hashlib
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
from fusedit.text.tiny_llm import TinyLLMConfig, ensure_shapes_world_llm, marker_matches, read_marker

GRID_KEYS = ("name", "base", "tiny_llm", "overrides", "budget", "seeds", "variants", "eval", "description")
EVAL_DIR = "eval-shapes"
#: Folder of the study's tiny LLM (the grid's ``tiny_llm:``); a variant's own one is ``tiny-llm-<hash>``.
TINY_LLM_DIR = "tiny-llm"


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
        variants: variant name → ``key=value`` overrides (``tiny_llm.<field>=<value>`` entries change that
            variant's tiny LLM: see :func:`variant_tiny_llm`).
        eval: keyword arguments of :class:`~fusedit.eval.shapes_eval.ShapesEvalSettings`.
        tiny_llm: ``TinyLLMConfig`` fields when the study pretrains the shapes-world tiny LLM, else ``None``
            (validated at load).
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


def split_tiny_llm(overrides: Sequence[str], where: str) -> tuple[list[str], dict[str, Any]]:
    """``(experiment overrides, {TinyLLMConfig field: value})`` of a variant's override list.

    ``tiny_llm.<field>=<value>`` entries go to the second; ``tiny_llm.a.b=...`` (no such nesting) is refused.
    """
    rest, fields = [], {}
    for text in overrides:
        keys, value = parse_override(text)
        if keys[0] != "tiny_llm":
            rest.append(text)
            continue
        if len(keys) != 2:
            raise ConfigError(f"{where}: {text!r}: expected tiny_llm.<field>=<value> (a TinyLLMConfig field)")
        fields[keys[1]] = value
    return rest, fields


def _check_tiny_llm(grid_fields: dict[str, Any] | None, variants: dict[str, list[str]], path: Path) -> None:
    """Build every variant's :class:`TinyLLMConfig` once, so that unknown fields and bad values fail at load."""
    if grid_fields is not None:
        _tiny_config(grid_fields, {}, f"grid {path}: tiny_llm")
    for name, overrides in variants.items():
        rest, fields = split_tiny_llm(overrides, f"grid {path}: variant {name!r}")
        if not fields:
            continue
        if grid_fields is None:
            raise ConfigError(
                f"grid {path}: variant {name!r} sets tiny_llm.* but the grid pretrains no tiny LLM; add "
                f"'tiny_llm: {{}}' (the defaults) to the grid"
            )
        if "text.llm" in _override_keys(rest):
            raise ConfigError(f"grid {path}: variant {name!r} sets both tiny_llm.* and text.llm; choose one")
        _tiny_config(grid_fields, fields, f"grid {path}: variant {name!r}")


def _tiny_config(grid_fields: dict[str, Any], fields: dict[str, Any], where: str) -> TinyLLMConfig:
    try:
        return from_dict(TinyLLMConfig, {**grid_fields, **fields}, prefix="tiny_llm")
    except (ConfigError, TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {error}") from None


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
    _check_tiny_llm(tiny, parsed_variants, path)
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


@dataclass
class PlannedLLM:
    """A tiny LLM the study pretrains: its config, its folder and the variants whose ``text.llm`` it is.

    Attributes:
        config: the validated :class:`TinyLLMConfig` (the grid's ``tiny_llm:`` plus the variant's ``tiny_llm.*``).
        folder: ``OUT/tiny-llm`` for the grid's own config, ``OUT/tiny-llm-<hash>`` for another
            (:func:`tiny_llm_hash`), so one folder per distinct config and variants with the same one share it.
        changes: ``tiny_llm.*`` fields in which it differs from the grid's ``tiny_llm:`` (empty for the grid's).
        variants: the variants that use it, in grid order.
    """

    config: TinyLLMConfig
    folder: Path
    changes: dict[str, Any]
    variants: list[str]

    @property
    def pretrained(self) -> bool:
        """Whether ``folder`` holds a finished pretraining of ``config`` (its marker; the corpus is checked when the
        study ensures it)."""
        marker = read_marker(self.folder)
        return marker is not None and marker_matches(marker, self.config) and (self.folder / "config.json").is_file()


def tiny_llm_hash(config: TinyLLMConfig) -> str:
    """First 8 hex digits of the SHA-256 of ``config``'s fields that differ from the defaults (sorted JSON): names a
    variant's tiny-LLM folder (a field added to :class:`TinyLLMConfig` later, at its default, keeps the name)."""
    defaults = dataclasses.asdict(TinyLLMConfig())
    changed = {k: v for k, v in dataclasses.asdict(config).items() if defaults[k] != v}
    payload = json.dumps(changed, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:8]


def variant_tiny_llm(grid: StudyGrid, variant: str) -> tuple[TinyLLMConfig, dict[str, Any]] | None:
    """``(config, changed fields)`` of the tiny LLM ``variant`` uses, or ``None`` when the grid pretrains none."""
    if grid.tiny_llm is None:
        return None
    where = f"grid {grid.path}: variant {variant!r}"
    _, fields = split_tiny_llm(grid.variants[variant], where)
    config = _tiny_config(grid.tiny_llm, fields, where)
    base = dataclasses.asdict(_tiny_config(grid.tiny_llm, {}, f"grid {grid.path}: tiny_llm"))
    changes = {k: v for k, v in dataclasses.asdict(config).items() if base[k] != v}
    return config, changes


def plan_tiny_llms(grid: StudyGrid, out: Path) -> list[PlannedLLM]:
    """The study's tiny LLMs, one per distinct config, in the order their first variant appears (nothing built)."""
    planned: dict[Path, PlannedLLM] = {}
    for variant in grid.variants:
        found = variant_tiny_llm(grid, variant)
        if found is None:
            return []
        config, changes = found
        name = TINY_LLM_DIR if not changes else f"{TINY_LLM_DIR}-{tiny_llm_hash(config)}"
        folder = (out / name).resolve()
        if folder not in planned:
            planned[folder] = PlannedLLM(config, folder, changes, [])
        planned[folder].variants.append(variant)
    return list(planned.values())


def ensure_tiny_llms(grid: StudyGrid, out: Path, log=print) -> list[PlannedLLM]:
    """Pretrain every tiny LLM of :func:`plan_tiny_llms` that its folder does not hold yet (finished ones are
    reused, so a resumed study pretrains only what an interruption left undone) on the shapes world of the grid's
    base config and common overrides."""
    llms = plan_tiny_llms(grid, out)
    for number, llm in enumerate(llms, 1):
        label = f"tiny LLM {number}/{len(llms)} ({describe_tiny_llm(llm)})"
        log(f"{label} — {'reusing' if llm.pretrained else 'pretraining into'} {llm.folder}")
        base = load_experiment(grid.base, grid.overrides + grid.budget + [f"text.llm={llm.folder}"])
        world = ShapesWorld(base.data.shapes, base.data.resolution)
        ensure_shapes_world_llm(llm.folder, world, llm.config)
    return llms


def describe_tiny_llm(llm: PlannedLLM) -> str:
    """``the grid's tiny_llm`` or its changed fields, and the variants that use it."""
    shown = {
        k: repr(v) if isinstance(v, str) and (not v or " " in v or ":" in v) else v for k, v in llm.changes.items()
    }
    what = " ".join(f"tiny_llm.{k}={v}" for k, v in shown.items()) or "the grid's tiny_llm"
    return f"{what}; for {', '.join(llm.variants)}"


def plan_study(grid: StudyGrid, out: Path, *, build_llm: bool = False) -> list[PlannedRun]:
    """Every (variant, seed) with its validated config; raises :class:`ConfigError` for any invalid override.

    ``build_llm``: pretrain the study's tiny LLMs first (:func:`ensure_tiny_llms`); else only their folders are
    planned. A variant's ``text.llm`` is its tiny LLM's folder.
    """
    llms = ensure_tiny_llms(grid, out) if build_llm else plan_tiny_llms(grid, out)
    folders = {variant: llm.folder for llm in llms for variant in llm.variants}
    runs = []
    for seed in grid.seeds:  # seed-major: an interrupted study has every variant at its first seeds
        for variant, overrides in grid.variants.items():
            rest, _ = split_tiny_llm(overrides, f"variant {variant!r}")
            llm = [f"text.llm={folders[variant]}"] if variant in folders else []
            full = grid.overrides + llm + grid.budget + rest + [f"train.seed={seed}", f"name={variant}-seed{seed}"]
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
