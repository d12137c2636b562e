"""Reusing runs another study trained with the very same configuration (``fusedit study --reuse-from OTHER``).

Several studies share a variant: the study preset's deep-fusion model is ``deep`` in ``fusion``, ``all`` in
``fused-layers``, ``frozen`` in ``frozen-vs-trainable``, ``gemma2`` in ``llm-family``, ``base`` in
``instruction-prefix``. Training is deterministic on one machine (those runs came out bit-identical, checkpoint hash
for checkpoint hash), so training such a run again only spends CPU time. A run of this study is *adopted* from a
finished run of another study when:

* its resolved config equals ours in every field except ``name`` and ``text.llm`` (the folder of each study's own
  tiny LLM), compared through the config loader as :func:`fusedit.study.grid.check_reusable` compares them;
* the two ``text.llm`` are the same model: for folders, the same bytes in every file but the pretraining marker
  (:func:`llm_fingerprint`); otherwise the same hub id or path;
* the source run has ``final/`` and ``config.yaml``, and our run has no folder yet (a run this study has started is
  never replaced).

Adopting copies the source's ``final/`` weights, ``metrics.jsonl``, ``logs/`` and training time into our run folder
(built beside it and renamed into place, so an interruption leaves no half-copied run), writes our own config into
``config.yaml`` and ``final/config.yaml``, and records where it came from in ``reused_from.json``. Checkpoints are
not copied. The run is then evaluated by this study like any other, so its scores are this study's own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from fusedit.config import ConfigError
from fusedit.eval.shapes_eval import write_json_atomic
from fusedit.experiment import load_experiment
from fusedit.study.grid import PlannedRun
from fusedit.study.timing import TIMING_NAME
from fusedit.text.tiny_llm import MARKER_NAME
from fusedit.train.launch import save_run_config

REUSED_NAME = "reused_from.json"
_COPIED = ("final", "metrics.jsonl", "logs")


def llm_fingerprint(llm: str) -> str:
    """What identifies the text model ``text.llm`` names: for a folder, the SHA-256 over its files' names and bytes
    (sorted by name, the tiny-LLM pretraining marker left out: it records how, not what); else the string itself
    (a hub id, or a path that does not exist here)."""
    folder = Path(llm)
    if not folder.is_dir():
        return f"name:{llm}"
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER_NAME):
        digest.update(str(path.relative_to(folder)).encode("utf-8") + b"\0")
        _hash_into(digest, path)
    return f"sha256:{digest.hexdigest()}"


def comparable(config: Any) -> dict:
    """``config`` as a plain mapping without the fields a reused run may differ in (``name``, ``text.llm``)."""
    plain = yaml.safe_load(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    plain.pop("name", None)
    plain.get("text", {}).pop("llm", None)
    return plain


def _finished_runs(source: Path) -> list[Path]:
    """``SOURCE/runs/<variant>/seed-<n>`` folders that hold ``final/`` and ``config.yaml``, in name order."""
    return sorted(
        p for p in (source / "runs").glob("*/seed-*") if (p / "final").is_dir() and (p / "config.yaml").is_file()
    )


def find_source(
    run: PlannedRun, sources: Sequence[str | Path], fingerprints: dict[str, str] | None = None
) -> Path | None:
    """The first finished run of ``sources`` (study folders, in order) that ``run`` can adopt, or ``None``.
    ``fingerprints`` caches :func:`llm_fingerprint` by ``text.llm``."""
    cache = {} if fingerprints is None else fingerprints

    def fingerprint(llm: str) -> str:
        if llm not in cache:
            cache[llm] = llm_fingerprint(llm)
        return cache[llm]

    wanted = comparable(run.config)
    for source in sources:
        for candidate in _finished_runs(Path(source)):
            if candidate.resolve() == run.run_dir.resolve():
                continue
            try:
                config = load_experiment(candidate / "config.yaml")
            except ConfigError:
                continue  # a run of an older or broken config: not ours to compare
            if comparable(config) == wanted and fingerprint(config.text.llm) == fingerprint(run.config.text.llm):
                return candidate
    return None


def adopt(run: PlannedRun, source: Path) -> None:
    """Copy the finished run ``source`` into ``run.run_dir`` (which must not exist) under ``run``'s own config, and
    record the provenance in ``reused_from.json``; atomic: built in a sibling folder, then renamed."""
    if run.run_dir.exists():
        raise FileExistsError(f"{run.run_dir} exists; a run this study started is not replaced by a reused one")
    run.run_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = run.run_dir.with_name(f".{run.run_dir.name}.adopting")
    shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted adoption
    staging.mkdir()
    for name in _COPIED:
        path = source / name
        if path.is_dir():
            shutil.copytree(path, staging / name)
        elif path.is_file():
            shutil.copy2(path, staging / name)
    (staging / "final" / "config.yaml").unlink(missing_ok=True)
    save_run_config(run.config, staging)
    shutil.copy2(staging / "config.yaml", staging / "final" / "config.yaml")
    training = _source_training_time(source)
    if training:
        write_json_atomic(staging / TIMING_NAME, training)
    write_json_atomic(
        staging / REUSED_NAME,
        {
            "source": str(source.resolve()),
            "weights_sha256": _file_sha256(source / "final" / "model.safetensors"),
            "llm": llm_fingerprint(run.config.text.llm),
            "adopted": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "copied": [name for name in _COPIED if (source / name).exists()],
        },
    )
    staging.rename(run.run_dir)


def _source_training_time(source: Path) -> dict:
    """The source run's training time for our ``study_timing.json``: what its study recorded, else (a run trained
    before studies recorded times) the span from its ``config.yaml`` to its ``final/``, marked as such."""
    recorded = source / TIMING_NAME
    if recorded.is_file():
        return {k: v for k, v in json.loads(recorded.read_text()).items() if k in ("train_seconds", "threads")}
    span = (source / "final").stat().st_mtime - (source / "config.yaml").stat().st_mtime
    return {"train_seconds": span, "train_seconds_from": "file times of the source run"} if span >= 0 else {}


def _hash_into(digest: Any, path: Path) -> Any:
    """Feed the bytes of the file ``path`` into ``digest`` (a hashlib object), a megabyte at a time; returns it."""
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest


def _file_sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    return _hash_into(hashlib.sha256(), path).hexdigest()


def check_sources(sources: Sequence[str | Path]) -> None:
    """Raise :class:`FileNotFoundError` naming every entry of ``sources`` that is not a study folder."""
    missing = [str(s) for s in sources if not (Path(s) / "runs").is_dir()]
    if missing:
        raise FileNotFoundError(
            f"--reuse-from takes study folders (each with a runs/ folder); not one: {', '.join(missing)}"
        )


def adopt_from(runs: Sequence[PlannedRun], sources: Sequence[str | Path], log: Callable[[str], None] = print) -> int:
    """Adopt every run of ``runs`` that has no folder yet and has a match in ``sources``; returns how many."""
    check_sources(sources)
    fingerprints: dict[str, str] = {}
    adopted = 0
    for run in runs:
        if run.run_dir.exists():
            continue
        source = find_source(run, sources, fingerprints)
        if source is not None:
            adopt(run, source)
            log(f"{run.variant} seed {run.seed} — reusing the identical run {source} (trained by another study)")
            adopted += 1
    return adopted


def reused_from(run_dir: Path) -> str | None:
    """The source folder a run was adopted from (``reused_from.json``), or ``None`` for a run trained here."""
    path = run_dir / REUSED_NAME
    return json.loads(path.read_text())["source"] if path.is_file() else None
