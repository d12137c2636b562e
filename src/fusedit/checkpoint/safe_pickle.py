"""Reading fusedit's ``.pt`` files without executing anything: ``torch.load(..., weights_only=True)``.

Optimizer states, RNG states and per-rank states hold only tensors, numbers, strings, tuples, lists and dicts, which
the weights-only unpickler reads. Checkpoints written before RNG states were stored as tensors hold the numpy RNG
key as a numpy array; the allow-list below admits numpy's array reconstruction for those (it builds an array, it
calls nothing else). A file that names any other Python object, such as a pickle planted to run code when the
checkpoint is resumed, is refused with a :class:`~fusedit.checkpoint.errors.CheckpointError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusedit.checkpoint.errors import CheckpointError


def _numpy_array_globals() -> list[Any]:
    """What unpickling a plain numpy array (of the RNG key) needs."""
    core = getattr(np, "_core", None) or np.core
    allowed: list[Any] = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [dtypes.UInt32DType, dtypes.Int64DType, dtypes.Float64DType]
    return allowed


def load_torch_file(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, admitting numpy arrays (see the module docstring).

    Raises :class:`CheckpointError` naming the file when it is missing, truncated, garbled, or holds anything that
    would execute code when loaded.
    """
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for truncated/garbled pickles and zips
        message = str(error)
        if "Weights only load failed" in message or "Unsupported global" in message:
            reason = next((line for line in message.splitlines() if "GLOBAL" in line or "global" in line), "")
            raise CheckpointError(
                f"{path}: refused: it holds Python objects that loading would execute, which no fusedit file needs "
                f"({reason.strip()[:200]}); do not resume from this checkpoint"
            ) from None
        raise CheckpointError(
            f"{path}: cannot be loaded with torch.load ({type(error).__name__}: {message[:300]})"
        ) from None
