"""Loading ``torch.distributed.checkpoint`` (DCP) folders without executing what a planted file asks for.

DCP reads its ``.metadata`` file with plain ``pickle.load`` and its non-tensor items (e.g. the optimizer's
``param_groups``) with ``torch.load(..., weights_only=False)``, so a received checkpoint could run code when resumed.
Before DCP reads them, fusedit checks both:

* :func:`check_dcp_metadata`: the ``.metadata`` pickle is unpickled with an allow-list of the classes DCP's
  metadata is made of (its dataclasses, ``torch.Size``, dtypes, paths); any other global is refused.
* :class:`SafeLoadPlanner`: every byte item must load with ``torch.load(..., weights_only=True)`` before DCP's own
  planner reads it.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from fusedit.checkpoint.errors import CheckpointError

METADATA_FILE = ".metadata"
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "Path")}


def _allowed(module: str, name: str) -> bool:
    if (module, name) in _ALLOWED:
        return True
    if module in _DCP_MODULES:
        return name[:1].isupper() or name in ("_StorageInfo", "_MEM_FORMAT_ENCODING")
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if not _allowed(module, name):
            raise pickle.UnpicklingError(f"global {module}.{name} is not part of a DCP metadata file")
        return super().find_class(module, name)


def check_dcp_metadata(dcp_dir: Path) -> None:
    """Raise :class:`CheckpointError` unless ``dcp_dir/.metadata`` unpickles with the allow-list alone."""
    path = dcp_dir / METADATA_FILE
    try:
        with open(path, "rb") as f:
            _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: refused: it holds Python objects that loading would execute, which no fusedit file needs "
            f"({error}); do not resume from this checkpoint"
        ) from None
    except Exception as error:  # truncated or garbled pickles raise many types
        raise CheckpointError(f"{path}: cannot be read ({type(error).__name__}: {error})") from None


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that a byte item must load with ``weights_only=True`` first."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        data = value.read()
        try:
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as error:
            raise CheckpointError(
                f"DCP item {read_item.dest_index.fqn}: refused: it does not load with weights_only=True "
                f"({type(error).__name__}: {str(error).splitlines()[0][:200]})"
            ) from None
        super().load_bytes(read_item, io.BytesIO(data))


def checkpoint_error_of(error: CheckpointException, where: Path) -> CheckpointError:
    """The :class:`CheckpointError` a DCP failure carries (raised by :class:`SafeLoadPlanner` in some rank), else one
    naming ``where`` and DCP's message."""
    for failure in getattr(error, "failures", {}).values():
        inner = failure[0] if isinstance(failure, tuple) else failure  # (exception, traceback)
        if isinstance(inner, CheckpointError):
            return inner if str(where) in str(inner) else CheckpointError(f"{where}: {inner}")
    return CheckpointError(f"{where}: cannot be loaded ({str(error)[:500]})")
