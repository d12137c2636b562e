"""``fusedit bench``: training and sampling throughput of FuseDiT on synthetic inputs with random weights.

What one iteration is:

* ``train``: one optimiser step on a batch of ``B`` images: the frozen LLM forward under ``no_grad`` through
  :meth:`fusedit.text.TextEncoder.encode_tokens` (skipped with ``llm=False``: the text keys/values are then random
  and precomputed), padding trimmed, the DiT forward and backward (bf16 autocast on CUDA, fp32 master weights), the
  flow-matching loss, grad-norm clipping and AdamW. Reported as images per second.
* ``sample``: ``B`` images by 25 Euler steps with classifier-free guidance as one batch of ``2B`` (unconditional
  text context cached across calls, conditional context computed once per call). Reported as seconds per image.

``vs_dense`` also times the reference's formulation (:mod:`fusedit.bench_dense`) of the same computation with the same
weights: joint attention over ``[text ; image]`` with a dense ``(L+N)²`` float mask, the text stream advanced through
the LLM layers inside the loop (with gradients flowing through the text rows when training), no trimming, and for
sampling the LLM rerun at every step.

Model FLOPs (for MFU) are counted analytically and only for useful work: matmuls of every linear layer and attention
``QKᵀ``/``AV`` over the *real* text tokens (padding excluded), the LLM causal; training = 3 × DiT forward + LLM
forward; sampling = steps × 2 (CFG) × DiT forward + LLM forward of the conditional prompts. The same count is used for
both formulations, so the MFU ratio is the speed ratio.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from fusedit.models import DiffusionTransformer, LLMGeometry, ModelConfig, build_model
from fusedit.models.config import ResolvedModelConfig
from fusedit.text.context import TextContext

MODES = ("train", "sample")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SAMPLE_STEPS = 25
GUIDANCE_SCALE = 6.0
PAD_ID, BOS_ID = 0, 2


class BenchError(ValueError):
    """A user mistake in the benchmark's arguments (unknown preset, CUDA unavailable, ...)."""


# --------------------------------------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchPreset:
    """A model + input geometry to benchmark.

    Attributes:
        name, description: registry key and one line for ``--help``.
        llm_*: the LLM's (Gemma 2 layout) geometry; the DiT copies width, depth and head geometry.
        vocab_size: LLM vocabulary (Gemma's 256000 for the full-size preset: it sets the embedding's memory only).
        image_size: side in pixels; ``latent_factor``/``latent_channels``: the autoencoder (1/3 = pixel space,
            8/16 = SD3's VAE); the DiT sees ``(image_size / latent_factor)²`` latents, ``patch_size``-patchified.
        text_tokens: prompt length with padding (``text.max_length``); ``real_tokens``: real tokens of every prompt
            (left padding: the last ``real_tokens`` positions).
        batch_size: default images per iteration.
        model: :class:`ModelConfig` overrides (the paper's scaled recipe by default).
    """

    name: str
    description: str
    llm_hidden_size: int
    llm_num_layers: int
    llm_num_heads: int
    llm_num_kv_heads: int
    llm_head_dim: int
    llm_intermediate_size: int
    vocab_size: int
    image_size: int
    latent_factor: int
    latent_channels: int
    patch_size: int
    text_tokens: int
    real_tokens: int
    batch_size: int = 8
    model: dict = field(default_factory=dict)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.latent_factor

    @property
    def image_tokens(self) -> int:
        return (self.latent_size // self.patch_size) ** 2

    def geometry(self) -> LLMGeometry:
        return LLMGeometry(model_type="gemma2", hidden_size=self.llm_hidden_size, num_hidden_layers=self.llm_num_layers,
                           num_attention_heads=self.llm_num_heads, num_key_value_heads=self.llm_num_kv_heads,
                           head_dim=self.llm_head_dim, intermediate_size=self.llm_intermediate_size,
                           rms_norm_eps=1e-6, rope_theta=10000.0)

    def model_config(self) -> ModelConfig:
        """The paper's scaled recipe: deep fusion, self-attention, 2D RoPE, no timestep, sandwich norm, QK-norm."""
        base = ModelConfig(fusion="deep", attention="self", pos_embed="2d-rope", timestep_conditioning="none",
                           qk_norm=True, sandwich_norm=True, patch_size=self.patch_size,
                           in_channels=self.latent_channels, sample_size=self.latent_size,
                           pos_embed_max_size=max(64, self.latent_size // self.patch_size))
        return replace(base, **self.model)


PRESETS: dict[str, BenchPreset] = {p.name: p for p in (
    BenchPreset("tiny", "CPU-sized: 4-layer LLM of width 128, 32 px pixel space (256 image tokens), prompts of 12 "
                "tokens padded to the reference's 256",
                llm_hidden_size=128, llm_num_layers=4, llm_num_heads=4, llm_num_kv_heads=2, llm_head_dim=32,
                llm_intermediate_size=256, vocab_size=256, image_size=32, latent_factor=1, latent_channels=3,
                patch_size=2, text_tokens=256, real_tokens=12),
    BenchPreset("small", "8 layers of width 512, 256 px with an SD3-like VAE (256 image tokens), 128 text tokens",
                llm_hidden_size=512, llm_num_layers=8, llm_num_heads=8, llm_num_kv_heads=4, llm_head_dim=64,
                llm_intermediate_size=2048, vocab_size=32000, image_size=256, latent_factor=8, latent_channels=16,
                patch_size=2, text_tokens=128, real_tokens=48),
    BenchPreset("base", "16 layers of width 1024, 512 px with an SD3-like VAE (1024 image tokens), 256 text tokens",
                llm_hidden_size=1024, llm_num_layers=16, llm_num_heads=8, llm_num_kv_heads=4, llm_head_dim=128,
                llm_intermediate_size=4096, vocab_size=256000, image_size=512, latent_factor=8, latent_channels=16,
                patch_size=2, text_tokens=256, real_tokens=96),
    BenchPreset("fusedit-2b", "FuseDiT-2B: Gemma-2-2B geometry (26 layers, width 2304), 512 px SD3 VAE latents "
                "(1024 image tokens), 256 text tokens of which 96 real",
                llm_hidden_size=2304, llm_num_layers=26, llm_num_heads=8, llm_num_kv_heads=4, llm_head_dim=256,
                llm_intermediate_size=9216, vocab_size=256000, image_size=512, latent_factor=8, latent_channels=16,
                patch_size=2, text_tokens=256, real_tokens=96),
)}


def get_preset(name: str) -> BenchPreset:
    if name not in PRESETS:
        raise BenchError(f"unknown preset {name!r}; available presets: {', '.join(PRESETS)}")
    return PRESETS[name]


# --------------------------------------------------------------------------------------------------------------------
# model FLOPs and peaks
# --------------------------------------------------------------------------------------------------------------------

def _layer_linear_params(hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int) -> int:
    """Weights of q/k/v/o and the GeGLU MLP of one layer (norms excluded)."""
    return hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * intermediate


def dit_forward_flops(r: ResolvedModelConfig, image_tokens: int, text_keys: int) -> int:
    """Matmul FLOPs of one DiT forward for one image: ``image_tokens`` queries over ``text_keys`` text keys (fused
    layers) plus the image keys; patch embedding and output projection included."""
    n, d, heads = image_tokens, r.head_dim, r.num_attention_heads
    per_layer = 2 * n * _layer_linear_params(r.hidden_size, heads, r.num_key_value_heads, d, r.intermediate_size)
    total = 0
    for llm_layer in r.layer_map:
        keys = n + (text_keys if llm_layer is not None else 0)
        total += per_layer + 4 * n * keys * heads * d
    patch = r.config.patch_size ** 2
    total += 2 * n * patch * r.config.in_channels * r.hidden_size + 2 * n * r.hidden_size * patch * r.out_channels
    return total


def llm_forward_flops(r: ResolvedModelConfig, tokens: int) -> int:
    """Matmul FLOPs of the LLM forward (up to its deepest fused layer) on one prompt of ``tokens`` real tokens."""
    g = r.llm
    layers = max(r.fused_llm_layers) + 1
    linear = 2 * tokens * _layer_linear_params(g.hidden_size, g.num_attention_heads, g.num_key_value_heads,
                                               g.head_dim, g.intermediate_size)
    causal_pairs = tokens * (tokens + 1) // 2
    return layers * (linear + 4 * causal_pairs * g.num_attention_heads * g.head_dim)


def model_flops_per_iteration(r: ResolvedModelConfig, preset: BenchPreset, mode: str, batch: int,
                              llm: bool = True) -> int:
    """Useful FLOPs of one benchmark iteration (see the module docstring)."""
    real, n = preset.real_tokens, preset.image_tokens
    text = llm_forward_flops(r, real) if llm else 0
    if mode == "train":
        return batch * (3 * dit_forward_flops(r, n, real) + text)
    # sampling: conditional rows see the prompt, unconditional rows the empty prompt (one BOS token)
    step = dit_forward_flops(r, n, real) + dit_forward_flops(r, n, 1)
    return batch * (SAMPLE_STEPS * step + text)


#: Dense (no sparsity) peak FLOP/s by GPU name fragment and compute dtype; first match wins.
GPU_PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bfloat16": 989e12, "float32": 67e12}),
    ("H100 PCIe", {"bfloat16": 756e12, "float32": 51e12}),
    ("H100", {"bfloat16": 989e12, "float32": 67e12}),  # SXM
    ("A100", {"bfloat16": 312e12, "float32": 19.5e12}),
)


def gpu_peak_flops(name: str, dtype: str) -> Optional[float]:
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
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


# --------------------------------------------------------------------------------------------------------------------
# synthetic inputs
# --------------------------------------------------------------------------------------------------------------------

def synthetic_tokens(preset: BenchPreset, batch: int, generator: torch.Generator, real: Optional[int] = None):
    """Left-padded prompts: ``(input_ids, attention_mask)`` ``(B, L)``, the last ``real`` tokens real (BOS first)."""
    length, real = preset.text_tokens, preset.real_tokens if real is None else real
    ids = torch.randint(4, preset.vocab_size, (batch, length), generator=generator)
    ids[:, length - real] = BOS_ID
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[:, length - real:] = True
    return ids.masked_fill(~mask, PAD_ID), mask


def random_text_context(model: DiffusionTransformer, mask: torch.Tensor, generator: torch.Generator,
                        dtype: torch.dtype) -> TextContext:
    """A context of random keys/values ``(B, H_kv, L, D)`` for every fused layer (no LLM), padded slots zeroed."""
    r = model.resolved
    b, length = mask.shape
    shape = (b, r.num_key_value_heads, length, r.head_dim)
    keep = mask[:, None, :, None]

    def rand():
        return (torch.randn(shape, generator=generator) * keep).to(dtype)

    layers = r.fused_llm_layers
    return TextContext(mask=mask, keys={i: rand() for i in layers}, values={i: rand() for i in layers})


class _NoTokenizer:
    """Stand-in tokenizer: the benchmark feeds token ids directly (``encode_tokens``), so none is needed."""

    def __call__(self, text, **_kwargs):
        if text:
            raise RuntimeError("the benchmark's text encoder takes token ids, not strings")
        return SimpleNamespace(input_ids=[])


def build_llm(preset: BenchPreset, device: torch.device, dtype: torch.dtype, attention: str = "reference") -> nn.Module:
    """A randomly initialised Hugging Face ``Gemma2Model`` of the preset's geometry (``attention: reference``: plain
    softmax attention, as in the reference's fused layers)."""
    from transformers import AutoModel, Gemma2Config

    from fusedit.text.llm import reference_attention_config

    config = Gemma2Config(
        vocab_size=preset.vocab_size, hidden_size=preset.llm_hidden_size,
        intermediate_size=preset.llm_intermediate_size, num_hidden_layers=preset.llm_num_layers,
        num_attention_heads=preset.llm_num_heads, num_key_value_heads=preset.llm_num_kv_heads,
        head_dim=preset.llm_head_dim, query_pre_attn_scalar=preset.llm_head_dim,
        max_position_embeddings=max(8192, preset.text_tokens), sliding_window=max(4096, preset.text_tokens),
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=1,
    )
    if attention == "reference":
        config = reference_attention_config(config)
    with torch.device(device):
        decoder = AutoModel.from_config(config, dtype=dtype)
    return decoder.to(device).eval()


# --------------------------------------------------------------------------------------------------------------------
# timing and memory
# --------------------------------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
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


def time_interleaved(fns: dict[str, Callable[[], None]], device: torch.device, warmup: int,
                     iters: int) -> dict[str, dict]:
    """Time several closures in alternation (``a b a b ...``) so that a change of machine load affects all alike.

    Each closure gets ``warmup`` untimed calls, then ``iters`` timed calls. Returns, per name, ``times_s``,
    ``peak_memory_gib`` (CUDA: the largest ``max_memory_allocated`` over its calls, the counter reset before each
    call; CPU: None, the process RSS peak cannot be attributed to one closure) and ``error`` (``"out of memory"``
    when a call ran out of memory: that closure is dropped, the others go on; else None).
    """
    out = {name: {"times_s": [], "peak_memory_gib": None, "error": None} for name in fns}

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


def paired_speedup(ours: Sequence[float], dense: Sequence[float]) -> Optional[float]:
    """Median over interleaved pairs of ``dense_i / ours_i``: robust to the load of a shared machine changing during
    the run (each pair ran back to back). None when either side has no timings."""
    if not ours or not dense:
        return None
    return statistics.median(d / o for o, d in zip(ours, dense))


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """CUDA: ``max_memory_allocated`` since the last reset; CPU: the process's peak resident set size (Linux KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


# --------------------------------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class BenchSetup:
    """Everything an iteration needs (built once)."""

    preset: BenchPreset
    device: torch.device
    dtype: torch.dtype
    batch: int
    model: DiffusionTransformer
    encoder: Optional[nn.Module]
    llm: Optional[nn.Module]
    input_ids: torch.Tensor
    mask: torch.Tensor
    context: Optional[TextContext]  # precomputed (no LLM) or None


def resolve_device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda was requested but CUDA is not available on this machine "
                         f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise BenchError(f"unsupported device {device!r}; expected cpu or cuda")
    return dev


def build_setup(preset: BenchPreset, device: torch.device, dtype: torch.dtype, batch: int, mode: str,
                llm: bool, need_llm: bool, seed: int = 0, llm_attention: str = "reference") -> BenchSetup:
    """Random-weight model (and LLM + text encoder when ``llm`` or ``need_llm``) and synthetic prompts."""
    from fusedit.text.config import TextConfig
    from fusedit.text.encoder import TextEncoder

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.device(device):
        model = build_model(preset.model_config(), preset.geometry())
    model = model.to(device)
    # Sampling runs the model in the compute dtype (like the pipeline); training keeps fp32 master weights + autocast.
    if mode == "sample":
        model = model.to(dtype)
    ids, mask = synthetic_tokens(preset, batch, generator)
    decoder = encoder = context = None
    if llm or need_llm:
        decoder = build_llm(preset, device, dtype, attention=llm_attention)
        config = TextConfig(llm="<random weights>", max_length=preset.text_tokens, attention=llm_attention)
        encoder = TextEncoder(decoder, _NoTokenizer(), config, model.text_requirements())
    if not llm:
        context = random_text_context(model, mask, generator, dtype).trimmed().to(device)
    return BenchSetup(preset, device, dtype, batch, model, encoder if llm else None, decoder,
                      ids.to(device), mask.to(device), context)


def _autocast(setup: BenchSetup):
    enabled = setup.dtype != torch.float32
    return torch.autocast(device_type=setup.device.type, dtype=setup.dtype, enabled=enabled)


def _text_context(setup: BenchSetup, ids: torch.Tensor, mask: torch.Tensor) -> TextContext:
    if setup.encoder is None:
        return setup.context
    with torch.no_grad():
        return setup.encoder.encode_padded(ids, mask).trimmed()


def compile_blocks_(model: DiffusionTransformer) -> None:
    """``torch.compile`` every DiT block in place (DESIGN.md §6).

    Each block reads its LLM layer's keys/values by a Python int index, which dynamo specialises on, so every block
    compiles its own graph; the recompile limit is raised to the depth so none falls back to eager.
    """
    import torch._dynamo.config as dynamo_config

    limit = 2 * len(model.layers) + 8
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), limit))
            break
    for block in model.layers:
        block.compile()


def train_step_fns(setup: BenchSetup, compile_blocks: bool = False):
    """``(ours, dense)``: closures running one optimiser step of each formulation."""
    from fusedit.bench_dense import dense_velocity
    from fusedit.flow import flow_matching_loss, interpolate, velocity_target

    model, dev, b = setup.model, setup.device, setup.batch
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4, fused=dev.type == "cuda")
    g = torch.Generator(device="cpu").manual_seed(1)
    c, s = model.resolved.config.in_channels, setup.preset.latent_size
    x0 = torch.randn(b, c, s, s, generator=g).to(dev)
    noise = torch.randn(b, c, s, s, generator=g).to(dev)
    sigmas = torch.sigmoid(torch.randn(b, generator=g)).to(dev)
    x_t, target, timestep = interpolate(x0, noise, sigmas), velocity_target(x0, noise), sigmas * 1000
    forward = model
    if compile_blocks:
        compile_blocks_(model)

    def step(predict):
        optimizer.zero_grad(set_to_none=True)
        with _autocast(setup):
            pred = predict()
        loss = flow_matching_loss(pred, target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    def ours():
        step(lambda: forward(x_t, timestep, _text_context(setup, setup.input_ids, setup.mask)))

    def dense():
        step(lambda: dense_velocity(model, setup.llm, x_t, timestep, setup.input_ids, setup.mask))

    return ours, dense


def sample_fns(setup: BenchSetup, compile_blocks: bool = False):
    """``(ours, dense)``: closures sampling ``B`` images (25 Euler steps, CFG 6 as one batch of ``2B``)."""
    from fusedit.bench_dense import dense_velocity
    from fusedit.pipeline import make_scheduler

    model, dev, b = setup.model, setup.device, setup.batch
    model.eval()
    if compile_blocks:
        compile_blocks_(model)
    g = torch.Generator(device="cpu").manual_seed(2)
    c, s = model.resolved.config.in_channels, setup.preset.latent_size
    noise = torch.randn(b, c, s, s, generator=g).to(dev)
    uncond_ids, uncond_mask = synthetic_tokens(setup.preset, 1, g, real=1)  # the empty prompt: BOS only
    uncond_ids, uncond_mask = uncond_ids.to(dev), uncond_mask.to(dev)
    uncond = None
    if setup.encoder is not None:
        uncond = _text_context(setup, uncond_ids, uncond_mask)  # cached across calls, as in the pipeline
    else:
        uncond = random_text_context(model, uncond_mask.cpu(), g, setup.dtype).trimmed().to(dev)
    scheduler = make_scheduler(3.0)

    def euler(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        scheduler.set_timesteps(SAMPLE_STEPS, device=dev)
        x = noise.clone()
        for t in scheduler.timesteps:
            v = velocity(torch.cat([x, x]).to(setup.dtype), t.expand(2 * b).to(dev)).float()
            v_uncond, v_cond = v.chunk(2)
            x = scheduler.step(v_uncond + GUIDANCE_SCALE * (v_cond - v_uncond), t, x, return_dict=False)[0]
        return x

    @torch.no_grad()
    def ours():
        cond = _text_context(setup, setup.input_ids, setup.mask)
        context = TextContext.cat([uncond.repeat(b), cond])
        euler(lambda x, t: model(x, t, context))

    @torch.no_grad()
    def dense():
        ids = torch.cat([uncond_ids.expand(b, -1), setup.input_ids])
        mask = torch.cat([uncond_mask.expand(b, -1), setup.mask])
        euler(lambda x, t: dense_velocity(model, setup.llm, x, t, ids, mask))

    return ours, dense


def _params_m(module: Optional[nn.Module]) -> Optional[float]:
    return None if module is None else round(sum(p.numel() for p in module.parameters()) / 1e6, 3)


def run_bench(mode: str, preset: str, device: str = "cpu", batch_size: Optional[int] = None, vs_dense: bool = False,
              iters: int = 5, warmup: int = 2, compile: bool = False, dtype: Optional[str] = None, llm: bool = True,
              llm_attention: str = "reference", seed: int = 0, threads: Optional[int] = None) -> dict:
    """Benchmark one mode of one preset and return the results as a JSON-able dict.

    Args:
        mode: ``train`` (images/s of optimiser steps) or ``sample`` (s/image of 25-step CFG sampling).
        preset: a key of :data:`PRESETS`.
        device: ``cpu`` or ``cuda`` (raises :class:`BenchError` when CUDA is unavailable).
        batch_size: images per iteration (default: the preset's).
        vs_dense: also time the reference's dense formulation and report the speed ratio.
        iters, warmup: timed and untimed iterations of each formulation (run alternately when ``vs_dense``);
            the reported time is the median (``min_time_s``: the fastest).
        compile: ``torch.compile`` each DiT block (our formulation only).
        dtype: ``float32`` or ``bfloat16`` (default: bfloat16 on CUDA, float32 on CPU); training autocasts to it.
        llm: include the LLM forward in each iteration (False: random precomputed text keys/values).
        llm_attention: ``reference`` (plain softmax in the LLM, as the reference's fused layers) or ``hf``.
        threads: CPU threads for PyTorch (``torch.set_num_threads``; default: unchanged).
    Returns:
        dict with keys ``preset, mode, device, device_name, dtype, batch_size, iters, warmup, llm, compile,
        image_tokens, text_tokens, real_text_tokens, dit_params_m, llm_params_m, time_per_iter_s, times_s,
        img_per_s | s_per_image, model_tflop_per_iter, achieved_tflops, peak_tflops, peak_source, mfu,
        peak_memory_gib, memory_source`` and, with ``vs_dense``, ``dense`` (same timing keys) and
        ``speedup_vs_dense`` (median over the interleaved pairs of dense time / our time). On CPU the memory is the process's RSS peak (with ``vs_dense``
        it covers both formulations; the dense entry is None).
    """
    if mode not in MODES:
        raise BenchError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    p = get_preset(preset)
    dev = resolve_device(device)
    dtype_name = dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    if dtype_name not in DTYPES:
        raise BenchError(f"unknown dtype {dtype_name!r}; expected one of {', '.join(DTYPES)}")
    if llm_attention not in ("reference", "hf"):
        raise BenchError(f"unknown llm_attention {llm_attention!r}; expected reference or hf")
    if iters < 1 or warmup < 0:
        raise BenchError(f"iters must be >= 1 and warmup >= 0; got iters={iters}, warmup={warmup}")
    batch = batch_size or p.batch_size
    if batch < 1:
        raise BenchError(f"batch size must be positive, got {batch}")
    torch_dtype = DTYPES[dtype_name]
    if threads is not None:
        if threads < 1:
            raise BenchError(f"threads must be positive, got {threads}")
        torch.set_num_threads(threads)

    setup = build_setup(p, dev, torch_dtype, batch, mode, llm=llm, need_llm=vs_dense, seed=seed,
                        llm_attention=llm_attention)
    make = train_step_fns if mode == "train" else sample_fns
    ours, dense = make(setup, compile_blocks=compile)

    flops = model_flops_per_iteration(setup.model.resolved, p, mode, batch, llm=llm)
    if dev.type == "cuda":
        device_name = torch.cuda.get_device_name(dev)
        peak = gpu_peak_flops(device_name, dtype_name)
        peak_source = "datasheet (dense)" if peak else "unknown GPU"
    else:
        device_name = f"cpu ({torch.get_num_threads()} threads)"
        peak = measure_matmul_peak(dev, torch_dtype)
        peak_source = "measured: best 1024^3 matmul, before and after the runs"

    timed = time_interleaved({"ours": ours, "dense": dense} if vs_dense else {"ours": ours}, dev, warmup, iters)
    if dev.type == "cpu":  # a shared CPU's speed varies: keep the best of a measurement before and after the runs
        peak = max(peak, measure_matmul_peak(dev, torch_dtype))

    def summarise(measured: dict) -> dict:
        times = measured["times_s"]
        if not times:
            return {"time_per_iter_s": None, "times_s": [], "error": measured["error"],
                    "peak_memory_gib": measured["peak_memory_gib"]}
        seconds = statistics.median(times)
        out = {"time_per_iter_s": seconds, "min_time_s": min(times), "times_s": times}
        if mode == "train":
            out["img_per_s"] = batch / seconds
        else:
            out["s_per_image"] = seconds / batch
        out["achieved_tflops"] = flops / seconds / 1e12
        out["mfu"] = flops / seconds / peak if peak else None
        out["peak_memory_gib"] = measured["peak_memory_gib"]
        return out

    measured = {name: summarise(m) for name, m in timed.items()}
    if dev.type != "cuda":
        measured["ours"]["peak_memory_gib"] = peak_memory_gib(dev)

    result = {
        "preset": p.name, "mode": mode, "device": dev.type, "device_name": device_name, "dtype": dtype_name,
        "batch_size": batch, "iters": iters, "warmup": warmup, "llm": llm, "llm_attention": llm_attention,
        "compile": compile, "image_tokens": p.image_tokens, "text_tokens": p.text_tokens,
        "real_text_tokens": p.real_tokens, "dit_params_m": _params_m(setup.model), "llm_params_m": _params_m(setup.llm),
    }
    if mode == "sample":
        result.update(steps=SAMPLE_STEPS, guidance_scale=GUIDANCE_SCALE)
    result.update(model_tflop_per_iter=flops / 1e12, peak_tflops=peak / 1e12 if peak else None,
                  peak_source=peak_source)
    result.update(measured["ours"])
    result["memory_source"] = "cuda max_memory_allocated" if dev.type == "cuda" else "process peak RSS (ru_maxrss)"
    if vs_dense:
        result["dense"] = measured["dense"]
        result["speedup_vs_dense"] = paired_speedup(measured["ours"]["times_s"], measured["dense"]["times_s"])
    return result


# --------------------------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    presets = "\n".join(f"  {p.name:<11} {p.description}" for p in PRESETS.values())
    parser = argparse.ArgumentParser(
        prog="fusedit bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Training (img/s) or sampling (s/image) throughput of FuseDiT with random weights and synthetic "
                    "inputs. The last line printed is one JSON object.",
        epilog=f"presets:\n{presets}")
    parser.add_argument("mode", choices=MODES, help="train: optimiser steps; sample: 25 Euler steps with CFG")
    parser.add_argument("--preset", required=True, help=f"one of: {', '.join(PRESETS)}")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per iteration (default: the preset's)")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations (default: 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up iterations (default: 2)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="compute dtype (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--vs-dense", action="store_true",
                        help="also time the reference's dense joint-attention formulation and report the ratio")
    parser.add_argument("--compile", action="store_true", help="torch.compile each DiT block")
    parser.add_argument("--no-llm", action="store_true",
                        help="leave the LLM forward out (random precomputed text keys/values)")
    parser.add_argument("--llm-attention", choices=("reference", "hf"), default="reference",
                        help="LLM attention: reference (plain softmax, like the reference's fused layers) or hf")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch (default: PyTorch's)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``fusedit bench train|sample --preset NAME ...``; prints a summary, then one JSON line. Returns 0."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset not in PRESETS:
        parser.error(f"unknown preset {args.preset!r}; available presets: {', '.join(PRESETS)}")
    try:
        result = run_bench(args.mode, args.preset, device=args.device, batch_size=args.batch_size,
                           vs_dense=args.vs_dense, iters=args.iters, warmup=args.warmup, compile=args.compile,
                           dtype=args.dtype, llm=not args.no_llm, llm_attention=args.llm_attention, seed=args.seed,
                           threads=args.threads)
    except BenchError as error:
        parser.error(str(error))
    print(summary_line(result), file=sys.stderr)
    print(json.dumps(result))
    return 0


def summary_line(result: dict) -> str:
    """One human-readable line of a :func:`run_bench` result."""
    def speed(r):
        if r.get("error"):
            return r["error"]
        return f"{r['img_per_s']:.2f} img/s" if "img_per_s" in r else f"{r['s_per_image']:.4f} s/image"

    mfu = f", MFU {result['mfu']:.1%}" if result.get("mfu") is not None else ""
    memory = result.get("peak_memory_gib")
    memory = f", peak memory {memory:.2f} GiB" if memory is not None else ""
    line = (f"{result['preset']} {result['mode']} on {result['device_name']} ({result['dtype']}, batch "
            f"{result['batch_size']}): {speed(result)}{mfu}{memory}")
    if "dense" in result:
        ratio = result["speedup_vs_dense"]
        line += f"; dense formulation {speed(result['dense'])}" + (f" -> {ratio:.2f}x" if ratio else "")
    return line


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
