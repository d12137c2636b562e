"""Timing of benchmark iterations: interleaved calls, paired speed-ups and peak memory."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_call(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds of one call of ``fn`` (CUDA events on GPU, ``perf_counter`` on CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    start_s = time.perf_counter()
    fn()
    return time.perf_counter() - start_s


def time_interleaved(
    fns: dict[str, Callable[[], None]], device: torch.device, warmup: int, iters: int
) -> dict[str, dict]:
    """Time several closures in alternation (``a b a b ...``) so that a change of machine load affects all alike.

    Each closure gets ``warmup`` untimed calls, then ``iters`` timed calls. Returns, per name, ``times_s``,
    ``peak_memory_gib`` (CUDA: the largest ``max_memory_allocated`` over its calls, the counter reset before each
    call; CPU: None, the process RSS peak cannot be attributed to one closure) and ``error`` (``"out of memory"``
    when a call ran out of memory: that closure is dropped, the others go on; else None).
    """
    out: dict[str, dict[str, Any]] = {name: {"times_s": [], "peak_memory_gib": None, "error": None} for name in fns}

    def call(name: str, timed: bool) -> None:
        if out[name]["error"] is not None:
            return
        reset_peak_memory(device)
        try:
            seconds = _time_call(fns[name], device)
        except torch.OutOfMemoryError:
            out[name]["error"] = "out of memory"
            out[name]["times_s"] = []
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return
        if timed:
            out[name]["times_s"].append(seconds)
        if device.type == "cuda":
            out[name]["peak_memory_gib"] = max(out[name]["peak_memory_gib"] or 0.0, peak_memory_gib(device))

    for _ in range(warmup):
        for name in fns:
            call(name, timed=False)
    for _ in range(iters):
        for name in fns:
            call(name, timed=True)
    return out


def paired_speedup(ours: Sequence[float], dense: Sequence[float]) -> float | None:
    """Median over interleaved pairs of ``dense_i / ours_i``: robust to the load of a shared machine changing during
    the run (each pair ran back to back). None when either side has no timings."""
    if not ours or not dense:
        return None
    return statistics.median(d / o for o, d in zip(ours, dense, strict=False))


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """CUDA: ``max_memory_allocated`` since the last reset; CPU: the process's peak resident set size (Linux KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
