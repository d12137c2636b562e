"""Model FLOPs of a benchmark iteration (for MFU), counted analytically and only for useful work: matmuls of every
linear layer and attention ``QKᵀ``/``AV`` over the *real* text tokens (padding excluded), the LLM causal; training =
3 × DiT forward + LLM forward; sampling = steps × 2 (CFG) × DiT forward + LLM forward of the conditional prompts. The
same count is used for both formulations, so the MFU ratio is the speed ratio. Peaks: datasheet values for known
GPUs, a measured matmul peak on CPU."""

from __future__ import annotations

import math
import time

import torch

from fusedit.bench.presets import BenchPreset
from fusedit.bench.timing import sync
from fusedit.models.config import ResolvedModelConfig

SAMPLE_STEPS = 25


def _layer_linear_params(hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int) -> int:
    """Weights of q/k/v/o and the GeGLU MLP of one layer (norms excluded)."""
    return hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * intermediate


def dit_forward_flops(resolved: ResolvedModelConfig, image_tokens: int, text_keys: int) -> int:
    """Matmul FLOPs of one DiT forward for one image: ``image_tokens`` queries over ``text_keys`` text keys (fused
    layers) plus the image keys; patch embedding and output projection included."""
    n, d, heads, hidden = image_tokens, resolved.head_dim, resolved.num_attention_heads, resolved.hidden_size
    per_layer = 2 * n * _layer_linear_params(hidden, heads, resolved.num_key_value_heads, d, resolved.intermediate_size)
    total = 0
    for llm_layer in resolved.layer_map:
        keys = n + (text_keys if llm_layer is not None else 0)
        total += per_layer + 4 * n * keys * heads * d
    patch = resolved.config.patch_size**2
    total += 2 * n * patch * hidden * (resolved.config.in_channels + resolved.out_channels)
    return total


def llm_forward_flops(resolved: ResolvedModelConfig, tokens: int) -> int:
    """Matmul FLOPs of the LLM forward (up to its deepest fused layer) on one prompt of ``tokens`` real tokens."""
    llm = resolved.llm
    layers = max(resolved.fused_llm_layers) + 1
    linear = (
        2
        * tokens
        * _layer_linear_params(
            llm.hidden_size, llm.num_attention_heads, llm.num_key_value_heads, llm.head_dim, llm.intermediate_size
        )
    )
    causal_pairs = tokens * (tokens + 1) // 2
    return layers * (linear + 4 * causal_pairs * llm.num_attention_heads * llm.head_dim)


def model_flops_per_iteration(
    resolved: ResolvedModelConfig, preset: BenchPreset, mode: str, batch: int, llm: bool = True
) -> int:
    """Useful FLOPs of one benchmark iteration (see the module docstring)."""
    real, n = preset.real_tokens, preset.image_tokens
    text = llm_forward_flops(resolved, real) if llm else 0
    if mode == "train":
        return batch * (3 * dit_forward_flops(resolved, n, real) + text)
    # sampling: conditional rows see the prompt, unconditional rows the empty prompt (one BOS token)
    step = dit_forward_flops(resolved, n, real) + dit_forward_flops(resolved, n, 1)
    return batch * (SAMPLE_STEPS * step + text)


#: Dense (no sparsity) peak FLOP/s by GPU name fragment and compute dtype; first match wins.
GPU_PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bfloat16": 989e12, "float32": 67e12}),
    ("H100 PCIe", {"bfloat16": 756e12, "float32": 51e12}),
    ("H100", {"bfloat16": 989e12, "float32": 67e12}),  # SXM
    ("A100", {"bfloat16": 312e12, "float32": 19.5e12}),
)


def gpu_peak_flops(name: str, dtype: str) -> float | None:
    for fragment, peaks in GPU_PEAK_FLOPS:
        if fragment.lower() in name.lower():
            return peaks.get(dtype)
    return None


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 1024, repeats: int = 10) -> float:
    """Best FLOP/s of a ``size³`` matmul on ``device`` (the CPU's practical peak, for a CPU MFU)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = math.inf
    for _ in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
