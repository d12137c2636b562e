"""Random-number-generator states of a training process, for exact resume."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch

from fusedit.checkpoint.errors import CheckpointError


def capture_rng_state(
    generators: Mapping[str, torch.Generator] | None = None, cuda_devices: Literal["all", "current"] = "all"
) -> dict[str, Any]:
    """Python, numpy, torch CPU and CUDA RNG states plus the given generators' states.

    ``cuda_devices``: ``all`` (every visible device, a single-process run) or ``current`` (only the current device:
    under torchrun each process owns one GPU and must not touch the others).
    """
    cuda: Any = None
    if cuda_devices == "all" and torch.cuda.is_available():
        cuda = torch.cuda.get_rng_state_all()
    elif cuda_devices == "current" and torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state()
    return {
        "python": random.getstate(),
        "numpy": _numpy_state_as_tensor(np.random.get_state()),
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }


def _numpy_state_as_tensor(state: Any) -> tuple:
    """numpy's legacy RNG state with its key as an int64 tensor (so that the file loads with ``weights_only``)."""
    name, keys, *rest = state
    return (name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), *rest)


def _numpy_state_from_saved(state: Any) -> tuple:
    """The inverse of :func:`_numpy_state_as_tensor` (also accepts the older array form)."""
    name, keys, *rest = state
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    return (name, keys.astype(np.uint32), *rest)


def restore_rng_state(
    state: Mapping[str, Any],
    generators: Mapping[str, torch.Generator] | None = None,
    cuda_devices: Literal["all", "current"] = "all",
) -> None:
    """Inverse of :func:`capture_rng_state` (either CUDA form); every generator named here must be in ``state``.

    ``cuda_devices="current"`` (a process of a distributed run) restores only the current device's CUDA state, also
    from an all-devices state saved by a single-process run.
    """
    random.setstate(state["python"])
    np.random.set_state(_numpy_state_from_saved(state["numpy"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if not isinstance(cuda, (list, tuple)):
            torch.cuda.set_rng_state(cuda)
        elif cuda_devices == "all":
            torch.cuda.set_rng_state_all(cuda)
        elif torch.cuda.current_device() < len(cuda):
            torch.cuda.set_rng_state(cuda[torch.cuda.current_device()])
    restore_generators(state, generators or {})


def restore_generators(state: Mapping[str, Any], generators: Mapping[str, torch.Generator]) -> None:
    """Restore only the named generators from a :func:`capture_rng_state` result (not the global RNGs)."""
    saved = state.get("generators", {})
    missing = sorted(set(generators) - set(saved))
    if missing:
        raise CheckpointError(f"no state for the trainer's generator(s) {missing}; saved: {sorted(saved)}")
    for name, g in generators.items():
        g.set_state(saved[name])
