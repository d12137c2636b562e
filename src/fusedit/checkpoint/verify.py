"""Checks of weight files before anything uses them: a truncated, padded or byte-flipped file is an error naming the
file, never a model that samples black images.

* :func:`check_safetensors_file`: the 8-byte header length, the JSON header, and the file size against the end of
  the last tensor the header lists (a truncated or extended file fails here, before safetensors reads it).
* :func:`check_finite`: no NaN or inf in any floating-point tensor (a flipped exponent byte).
* :func:`check_same_tensors`: what was written equals what was meant to be written (exports re-read their files).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from fusedit.checkpoint.errors import CheckpointError

#: Largest safetensors header accepted (safetensors' own limit is 100 MB).
MAX_HEADER_BYTES = 100_000_000


def check_safetensors_file(path: Path) -> dict:
    """Parse the header of the safetensors file ``path`` and check the file's size against it; returns the header.

    Raises :class:`CheckpointError` naming the file and what is wrong (missing, truncated, extra bytes, garbled
    header).
    """
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({size} bytes, too short); the file is truncated"
            )
        length = int.from_bytes(head, "little")
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(
                f"{path}: not a readable safetensors file (its header claims {length} bytes, the file has {size}); the "
                f"file is truncated or corrupt"
            )
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(
            f"{path}: not a readable safetensors file (its header is not valid JSON); the file is corrupt"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path}: not a readable safetensors file (its header is not a JSON object); the file is corrupt"
        )
    ends = [
        entry["data_offsets"][1]
        for name, entry in header.items()
        if name != "__metadata__" and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list)
    ]
    expected = 8 + length + max(ends, default=0)
    if expected != size:
        what = "truncated" if size < expected else "longer than its header says"
        raise CheckpointError(f"{path}: {size} bytes, its safetensors header describes {expected}; the file is {what}")
    return header


def check_finite(tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise :class:`CheckpointError` when a floating-point tensor of ``tensors`` holds NaN or inf."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(
                f"{source}: {name!r} holds {bad} NaN/inf value(s); the weights are corrupt (a damaged file, or a "
                f"diverged run): use another checkpoint"
            )


def check_finite_parameters(named: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
    """:func:`check_finite` of a module's ``named_parameters()`` (or any ``(name, tensor)`` pairs)."""
    check_finite({name: tensor.detach() for name, tensor in named}, source)


def check_same_tensors(expected: Mapping[str, torch.Tensor], written: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise :class:`CheckpointError` unless ``written`` holds exactly ``expected`` (names, shapes, dtypes, values)."""
    missing, extra = sorted(set(expected) - set(written)), sorted(set(written) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{source}: written weights differ from the model's: missing {missing[:5]}, extra {extra[:5]}"
        )
    for name, tensor in expected.items():
        other = written[name]
        same = other.shape == tensor.shape and other.dtype == tensor.dtype and torch.equal(other, tensor.cpu())
        if not same:
            raise CheckpointError(f"{source}: {name!r} reads back different from what was written; the disk is faulty")


def read_weight_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the ``*.safetensors`` files in ``folder`` (one file, or the shards of a sharded save), each
    file checked with :func:`check_safetensors_file`."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no .safetensors weight file was written")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        check_safetensors_file(file)
        try:
            tensors.update(load_file(str(file)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"{file}: not a readable safetensors file ({error})") from None
    return tensors


def verify_saved_weights(module: torch.nn.Module, folder: Path) -> None:
    """Read back the weights ``module`` was saved as in ``folder`` and compare them with ``module.state_dict()``
    (every parameter must be there; every tensor written must equal the module's)."""
    state = {name: tensor.detach() for name, tensor in module.state_dict().items()}
    written = read_weight_folder(folder)
    missing = sorted(name for name, _ in module.named_parameters() if name not in written)
    extra = sorted(set(written) - set(state))
    if missing or extra:
        raise CheckpointError(
            f"{folder}: written weights differ from the model's: missing {missing[:5]}, extra {extra[:5]}"
        )
    check_same_tensors({name: state[name] for name in written}, written, str(folder))
