"""The config of a run is written once, when the run is created; a resume may not silently change it.

``run_dir/config.yaml`` is what ``fusedit sample``/``export``/``eval`` rebuild the model from, so it is written once
(atomically) and never rewritten. A resume compares every key of its resolved config with the run's *effective*
config (``config.yaml`` plus the changes recorded in ``config_changes.jsonl``) and sorts the differences:

* **execution** keys (:data:`EXECUTION_KEYS`: how the run is executed, not what it computes — the launcher mode,
  compilation, activation checkpointing, DataLoader workers) change freely; the change is recorded.
* **allowed** keys (``name``, ``sample.*`` and the ``train.*`` keys not in :data:`FIXED_TRAIN_KEYS`: step count,
  logging, checkpoints, sample grids, optimiser and objective settings) change only when named with
  ``--allow-change KEY``; the change is recorded.
* every other key (``model.*``, ``text.*``, ``data.*``, ``train.seed``, ``train.batch_size``, ``train.ema_every``,
  ``train.optimizer``) alters the model, the text side, the data stream or what a checkpoint holds: the resume is
  refused, whatever the flags.

A refused resume raises :class:`RunConfigChangeError` before anything in the run is touched. Recorded changes go to
``run_dir/config_changes.jsonl`` (one JSON object per resume that changed something: time, step, ``{key: [old,
new]}``), so a run stays explainable; the newest effective config is also in every checkpoint and in
``final/config.yaml``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from fusedit.atomic import fsync_dir
from fusedit.config import ConfigError, read_yaml_mapping

CONFIG_FILE = "config.yaml"
CHANGES_FILE = "config_changes.jsonl"

#: Keys that change how a run executes, not what it computes: they may differ on every resume (recorded).
EXECUTION_KEYS = frozenset(
    {
        "train.distributed",
        "train.compile",
        "train.activation_checkpointing",
        "train.fused_adamw",
        "data.num_workers",
    }
)
#: ``train.*`` keys that alter the data stream or the checkpoint's contents: never changed on a resume.
FIXED_TRAIN_KEYS = frozenset({"train.seed", "train.batch_size", "train.ema_every", "train.optimizer"})
#: Sections whose keys may change with ``--allow-change KEY`` (besides :data:`FIXED_TRAIN_KEYS`).
ALLOWED_SECTIONS = ("train.", "sample.")


class RunConfigChangeError(ConfigError):
    """A resume would change the run's config in a way that is refused (the message lists every difference)."""


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and scalars are leaves)."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def key_kind(key: str) -> str:
    """``execution``, ``allowed`` (with ``--allow-change``) or ``fixed`` (see the module docstring)."""
    if key in EXECUTION_KEYS:
        return "execution"
    if key == "name" or (key.startswith(ALLOWED_SECTIONS) and key not in FIXED_TRAIN_KEYS):
        return "allowed"
    return "fixed"


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _listing(changes: Mapping[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k}: {_show(old)} -> {_show(new)}" for k, (old, new) in changes.items())


def read_changes(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/config_changes.jsonl`` (a torn last line is ignored)."""
    path = run_dir / CHANGES_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("changes"), dict):
            records.append(record)
    return records


def effective_config(run_dir: Path) -> dict[str, Any]:
    """The run's flat config: ``config.yaml`` with every recorded change applied, in order."""
    path = run_dir / CONFIG_FILE
    stored = flatten(read_yaml_mapping(path, "the run's config"))
    for record in read_changes(run_dir):
        for key, pair in record["changes"].items():
            if isinstance(pair, list) and len(pair) == 2:
                stored[key] = pair[1]
    return stored


def compare(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (old, new)}`` of every flat key whose value differs (a key missing on one side reads ``None``)."""
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def check_allow_change(keys: Iterable[str], config: Any) -> None:
    """``--allow-change`` names: each must be a key of the config, and one that may change at all."""
    known = flatten(dataclasses.asdict(config))
    for key in keys:
        if key not in known:
            raise ConfigError(f"--allow-change {key}: not a config key (e.g. train.max_steps)")
        if key_kind(key) == "fixed":
            raise ConfigError(
                f"--allow-change {key}: this key alters the model, the text side or the data stream and cannot "
                f"change on a resume; start a new run (--run-dir NEW, or --no-resume to move this one aside)"
            )


def resume_changes(run_dir: Path, config: Any, allow: Iterable[str] = ()) -> dict[str, tuple[Any, Any]]:
    """The differences between ``config`` (an ExperimentConfig) and the run's effective config that this resume
    may make (execution keys, and allowed keys named in ``allow``); raises :class:`RunConfigChangeError` listing
    the others. Reads only."""
    allow = set(allow)
    check_allow_change(allow, config)
    stored = effective_config(run_dir)
    # a key the run's config lacks was added to fusedit after the run was created: the run has trained with its
    # default all along, so only another value is a change
    defaults = flatten(dataclasses.asdict(type(config)()))
    stored.update({key: value for key, value in defaults.items() if key not in stored})
    changes = compare(stored, flatten(dataclasses.asdict(config)))
    fixed = {k: v for k, v in changes.items() if key_kind(k) == "fixed"}
    unflagged = {k: v for k, v in changes.items() if key_kind(k) == "allowed" and k not in allow}
    if fixed:
        raise RunConfigChangeError(
            f"{run_dir} was created with other settings that alter the model, the text side or the data stream: "
            f"{_listing(fixed)}; nothing was changed. Train these settings in a new run (--run-dir NEW, or "
            f"--no-resume to move this one aside)"
        )
    if unflagged:
        flags = " ".join(f"--allow-change {k}" for k in unflagged)
        raise RunConfigChangeError(
            f"{run_dir} was created with other settings: {_listing(unflagged)}; nothing was changed. To resume with "
            f"the new values, add {flags} (the change is recorded in {CHANGES_FILE})"
        )
    return changes


def write_config_once(run_dir: Path, config: Any) -> bool:
    """Write ``run_dir/config.yaml`` if the run has none (atomically, never replacing one); returns whether it
    wrote it."""
    path = run_dir / CONFIG_FILE
    if path.exists():
        return False
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{CONFIG_FILE}.tmp"
    tmp.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)  # fails rather than replace a config.yaml that appeared meanwhile
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(run_dir)
    return True


def record_changes(run_dir: Path, changes: Mapping[str, tuple[Any, Any]], step: int, allowed: Iterable[str]) -> None:
    """Append one record of ``changes`` to ``run_dir/config_changes.jsonl`` (nothing when there are none)."""
    if not changes:
        return
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "step": step,
        "changes": {k: [old, new] for k, (old, new) in changes.items()},
        "allowed_by_flag": sorted(set(allowed) & set(changes)),
    }
    with open(run_dir / CHANGES_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
