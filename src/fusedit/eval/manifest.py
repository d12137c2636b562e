"""Reproducibility manifests of evaluations: which code, config, weights, sampler and prompts produced a score.

Hashes are SHA-256 hex digests:

* ``config_hash``: of the run's config as canonical JSON (sorted keys);
* ``checkpoint_hash``: of the weights the model actually holds (every parameter and buffer, in name order, as raw
  bytes with its name, dtype and shape), so it identifies the weights whatever file they came from;
* ``prompt_set_hash``: of the JSON list of ``[prompt, images]`` pairs, in evaluation order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import fusedit


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def code_version() -> dict[str, Any]:
    """``{"package_version", "commit", "dirty"}`` of the fusedit source in use (commit/dirty are None outside a git
    checkout). Read once per process and remembered: a long job (a study) calls it when it starts, so that commits
    made while it runs are not attributed to the code it had loaded; a process it starts is given that version with
    :func:`pin_code_version`."""
    global _loaded_version
    if _loaded_version is None:
        _loaded_version = _read_code_version()
    return dict(_loaded_version)


def pin_code_version(version: dict[str, Any]) -> None:
    """Make :func:`code_version` return ``version`` in this process from now on: a worker process of a study records
    the code its parent loaded (the version the parent's :func:`code_version` returned), not the checkout's HEAD of
    the moment it starts."""
    global _loaded_version
    _loaded_version = dict(version)


#: What :func:`code_version` returns in this process (None until its first call or :func:`pin_code_version`).
_loaded_version: dict[str, Any] | None = None


def _read_code_version() -> dict[str, Any]:
    source = Path(fusedit.__file__).resolve().parent
    info: dict[str, Any] = {"package_version": getattr(fusedit, "__version__", None), "commit": None, "dirty": None}
    try:
        commit = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode == 0:
            info["commit"] = commit.stdout.strip()
            status = subprocess.run(
                ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            info["dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def config_hash(config) -> str | None:
    """Hash of a run's config dataclass (None when there is none, e.g. a reference folder)."""
    if config is None:
        return None
    return _sha256_json(dataclasses.asdict(config))


def weights_hash(module: torch.nn.Module) -> str:
    """Hash of every parameter and buffer of ``module`` (see the module docstring)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(list(module.state_dict().items())):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def prompt_set_hash(prompts: Sequence[str], counts: Sequence[int]) -> str:
    """Hash of the evaluated prompts and their numbers of images, in order."""
    return _sha256_json([[p, int(n)] for p, n in zip(prompts, counts, strict=False)])


def sampling_manifest(
    pipe, *, steps, guidance_scale, negative_prompt, seed_rule: str, base_seed: int, resolution: int
) -> dict[str, Any]:
    """What a pipeline sampled with: scheduler, steps, CFG, shift, negative prompt, seeds, resolution, weights."""
    scheduler = getattr(pipe, "scheduler", None)
    shift = getattr(getattr(scheduler, "config", None), "shift", None)
    model = getattr(pipe, "model", None)
    # the run's ExperimentConfig: ``experiment`` of the diffusers pipeline (whose ``config`` is diffusers' own), or
    # ``config`` of the plain sampler
    experiment = pipe.experiment if hasattr(pipe, "experiment") else getattr(pipe, "config", None)
    return {
        "sampler": type(scheduler).__name__ if scheduler is not None else None,
        "steps": steps,
        "cfg": guidance_scale,
        "shift": shift,
        "negative_prompt": negative_prompt,
        "seed": base_seed,
        "seed_rule": seed_rule,
        "resolution": resolution,
        "config_hash": config_hash(experiment),
        "checkpoint_hash": weights_hash(model) if isinstance(model, torch.nn.Module) else None,
    }
