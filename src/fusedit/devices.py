"""Check a device name before anything runs on it: a misspelt name or a device this machine lacks is one clear
:class:`DeviceError` (a ``ValueError``) instead of a PyTorch traceback later."""

from __future__ import annotations

import torch

#: The device names fusedit's messages suggest.
DEVICE_HINT = "cpu, cuda, cuda:N (N = GPU index) or mps"


class DeviceError(ValueError):
    """A device name is malformed or names a device this machine (or this PyTorch build) does not have."""


def _cuda_problem(name: str, index: int | None) -> str | None:
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            why = f"this PyTorch build ({torch.__version__}) has no CUDA support"
            fix = "use --device cpu, or install a CUDA build of PyTorch"
        else:
            why = "no CUDA GPU is visible (driver missing, or CUDA_VISIBLE_DEVICES hides them)"
            fix = "use --device cpu, or check nvidia-smi"
        return f"device {name!r}: {why}; {fix}"
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        return f"device {name!r}: only {count} GPU(s) are visible (cuda:0 to cuda:{count - 1})"
    return None


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` once it names a device this process can use.

    Raises:
        DeviceError: a malformed name (``gpu0``), CUDA asked for on a CPU-only PyTorch or a machine without a
            visible GPU, a GPU index beyond the visible ones, or another backend (``mps``, ``xpu``) that is not
            available.
    """
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"device {str(device)!r} is not a device name; use {DEVICE_HINT}") from None
    problem = None
    if resolved.type == "cuda":
        problem = _cuda_problem(str(device), resolved.index)
    elif resolved.type != "cpu":
        backend = getattr(torch.backends, resolved.type, None) or getattr(torch, resolved.type, None)
        is_available = getattr(backend, "is_available", None)
        if callable(is_available) and not is_available():
            problem = f"device {str(device)!r}: the {resolved.type} backend is not available here; use {DEVICE_HINT}"
    if problem is not None:
        raise DeviceError(problem)
    return resolved
