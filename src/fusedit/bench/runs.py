"""One benchmark run: a random-weight model on synthetic inputs, timed on the production code paths.

What one iteration is:

* ``train``: one optimiser step on a batch of ``B`` images, through the trainer's own step functions
  (:func:`fusedit.train.step.flow_loss` and :func:`fusedit.train.step.train_step`): the frozen LLM forward under
  ``no_grad`` through :meth:`fusedit.text.encoder.TextEncoder.encode_padded` (skipped with ``llm=False``: the text
  keys/values are then random and precomputed), padding trimmed, the DiT forward and backward (bf16 autocast on
  CUDA, fp32 master weights), the flow-matching loss, grad-norm clipping and AdamW. Reported as images per second.
* ``sample``: ``B`` images by 25 Euler steps with classifier-free guidance as one batch of ``2B``, through the
  pipeline's denoising loop (:func:`fusedit.sampling.denoise.denoise`) and its cached text conditioning
  (unconditional context cached across calls, conditional context computed once per call). Reported as seconds
  per image.

``vs_dense`` also times the reference's formulation (:func:`fusedit.reference.joint.joint_velocity`) of the same
computation with the same weights and the same step functions / loop: joint attention over ``[text ; image]`` with a
dense ``(L+N)²`` mask, the text stream advanced through the LLM layers inside the loop (with gradients flowing
through the text rows when training), no trimming, and for sampling the LLM rerun at every step.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch._dynamo.config as dynamo_config
from torch import nn

from fusedit.bench.flops import SAMPLE_STEPS, gpu_peak_flops, measure_matmul_peak, model_flops_per_iteration
from fusedit.bench.inputs import NoTokenizer, build_llm, random_text_context, synthetic_tokens
from fusedit.bench.presets import BenchError, BenchPreset, get_preset
from fusedit.bench.timing import paired_speedup, peak_memory_gib, time_interleaved
from fusedit.models.dit import DiffusionTransformer, build_model
from fusedit.reference.joint import joint_velocity
from fusedit.sampling.denoise import denoise
from fusedit.sampling.pipeline import make_scheduler
from fusedit.sampling.text import CachedText, JointText
from fusedit.text.config import TextConfig
from fusedit.text.context import TextContext
from fusedit.text.encoder import TextEncoder, TokenizedPrompts
from fusedit.train.optimizers import make_optimizer
from fusedit.train.step import flow_loss, train_step

MODES = ("train", "sample")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GUIDANCE_SCALE = 6.0


@dataclass
class BenchSetup:
    """Everything an iteration needs (built once)."""

    preset: BenchPreset
    device: torch.device
    dtype: torch.dtype
    batch: int
    model: DiffusionTransformer
    encoder: TextEncoder | None
    llm: nn.Module | None
    input_ids: torch.Tensor
    mask: torch.Tensor
    context: TextContext | None  # precomputed (no LLM) or None


def resolve_device(device: str) -> torch.device:
    """``cpu`` or ``cuda`` as a device; :class:`BenchError` when CUDA is asked for and missing."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(
            "--device cuda was requested but CUDA is not available on this machine "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); use --device cpu"
        )
    if dev.type not in ("cpu", "cuda"):
        raise BenchError(f"unsupported device {device!r}; expected cpu or cuda")
    return dev


def build_setup(
    preset: BenchPreset,
    device: torch.device,
    dtype: torch.dtype,
    batch: int,
    mode: str,
    llm: bool,
    need_llm: bool,
    seed: int = 0,
    llm_attention: str = "reference",
) -> BenchSetup:
    """Random-weight model (and LLM + text encoder when ``llm`` or ``need_llm``) and synthetic prompts."""
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
        config = TextConfig(llm="<random weights>", max_length=preset.text_tokens, attention=llm_attention)  # type: ignore[arg-type]
        encoder = TextEncoder(decoder, NoTokenizer(), config, model.text_requirements())
    if not llm:
        context = random_text_context(model, mask, generator, dtype).trimmed().to(device)
    return BenchSetup(
        preset, device, dtype, batch, model, encoder if llm else None, decoder, ids.to(device), mask.to(device), context
    )


def text_context(setup: BenchSetup, ids: torch.Tensor, mask: torch.Tensor) -> TextContext:
    """The text context of the prompts ``ids``/``mask`` ``(B, L)`` as the trainer and the pipeline compute it (one
    LLM forward, padding trimmed), or the precomputed random one without an LLM."""
    if setup.encoder is None:
        assert setup.context is not None
        return setup.context
    with torch.no_grad():
        return setup.encoder.encode_padded(ids, mask)


def compile_blocks_(model: DiffusionTransformer) -> None:
    """``torch.compile`` every DiT block in place.

    Each block reads its LLM layer's keys/values by a Python int index, which dynamo specialises on, so every block
    compiles its own graph; the recompile limit is raised to the depth so none falls back to eager.
    """
    limit = 2 * len(model.layers) + 8
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), limit))
            break
    for block in model.layers:
        block.compile()


def train_step_fns(
    setup: BenchSetup, compile_blocks: bool = False, optimizer_name: str = "adamw"
) -> tuple[Callable[[], None], Callable[[], None]]:
    """``(ours, dense)``: closures running one optimiser step of each formulation, both through the trainer's
    :func:`~fusedit.train.step.flow_loss` and :func:`~fusedit.train.step.train_step` (``optimizer_name``: as
    ``train.optimizer``)."""
    model, dev, b = setup.model, setup.device, setup.batch
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(
        optimizer_name, params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4, fused=dev.type == "cuda"
    )
    g = torch.Generator(device="cpu").manual_seed(1)
    c, s = model.resolved.config.in_channels, setup.preset.latent_size
    x0 = torch.randn(b, c, s, s, generator=g).to(dev)
    noise = torch.randn(b, c, s, s, generator=g).to(dev)
    sigmas = torch.sigmoid(torch.randn(b, generator=g)).to(dev)
    autocast = setup.dtype if setup.dtype != torch.float32 else None
    if compile_blocks:
        compile_blocks_(model)

    def dense_forward(x_t: torch.Tensor, timestep: torch.Tensor, _context: object) -> torch.Tensor:
        assert setup.llm is not None
        return joint_velocity(model, setup.llm, x_t, timestep, setup.input_ids, setup.mask)

    def ours() -> None:
        train_step(
            optimizer,
            params,
            [
                lambda: flow_loss(
                    model,
                    x0,
                    noise,
                    sigmas,
                    lambda: text_context(setup, setup.input_ids, setup.mask),
                    autocast_dtype=autocast,
                )
            ],
            grad_clip=1.0,
        )

    def dense() -> None:
        train_step(
            optimizer,
            params,
            [lambda: flow_loss(dense_forward, x0, noise, sigmas, lambda: None, autocast_dtype=autocast)],
            grad_clip=1.0,
        )

    return ours, dense


def sample_fns(setup: BenchSetup, compile_blocks: bool = False) -> tuple[Callable[[], None], Callable[[], None]]:
    """``(ours, dense)``: closures sampling ``B`` images (25 Euler steps, CFG 6 as one batch of ``2B``) through the
    pipeline's :func:`~fusedit.sampling.denoise.denoise` loop."""
    model, dev, b = setup.model, setup.device, setup.batch
    model.eval()
    if compile_blocks:
        compile_blocks_(model)
    g = torch.Generator(device="cpu").manual_seed(2)
    c, s = model.resolved.config.in_channels, setup.preset.latent_size
    noise = torch.randn(b, c, s, s, generator=g).to(dev)
    uncond_ids, uncond_mask = synthetic_tokens(setup.preset, 1, g, real=1)  # the empty prompt: BOS only
    uncond_ids, uncond_mask = uncond_ids.to(dev), uncond_mask.to(dev)
    if setup.encoder is not None:
        uncond = text_context(setup, uncond_ids, uncond_mask)  # cached across calls, as in the pipeline
    else:
        uncond = random_text_context(model, uncond_mask.cpu(), g, setup.dtype).trimmed().to(dev)
    scheduler = make_scheduler(3.0)

    @torch.no_grad()
    def ours() -> None:
        cond = text_context(setup, setup.input_ids, setup.mask)
        velocity = CachedText(model, cond, TextContext.cat([uncond.repeat(b), cond]))
        denoise(velocity, noise.clone(), scheduler, SAMPLE_STEPS, GUIDANCE_SCALE)

    @torch.no_grad()
    def dense() -> None:
        assert setup.llm is not None
        both = TokenizedPrompts(
            torch.cat([uncond_ids.expand(b, -1), setup.input_ids]), torch.cat([uncond_mask.expand(b, -1), setup.mask])
        )
        velocity = JointText(model, setup.llm, TokenizedPrompts(setup.input_ids, setup.mask), both)
        denoise(velocity, noise.clone(), scheduler, SAMPLE_STEPS, GUIDANCE_SCALE)

    return ours, dense


def _params_m(module: nn.Module | None) -> float | None:
    return None if module is None else round(sum(p.numel() for p in module.parameters()) / 1e6, 3)


def _check_arguments(
    mode: str,
    device: str,
    dtype: str | None,
    llm_attention: str,
    iters: int,
    warmup: int,
    batch: int,
    threads: int | None,
) -> tuple[torch.device, str]:
    if mode not in MODES:
        raise BenchError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    dev = resolve_device(device)
    dtype_name = dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    if dtype_name not in DTYPES:
        raise BenchError(f"unknown dtype {dtype_name!r}; expected one of {', '.join(DTYPES)}")
    if llm_attention not in ("reference", "hf"):
        raise BenchError(f"unknown llm_attention {llm_attention!r}; expected reference or hf")
    if iters < 1 or warmup < 0:
        raise BenchError(f"iters must be >= 1 and warmup >= 0; got iters={iters}, warmup={warmup}")
    if batch < 1:
        raise BenchError(f"batch size must be positive, got {batch}")
    if threads is not None and threads < 1:
        raise BenchError(f"threads must be positive, got {threads}")
    return dev, dtype_name


def _peak(dev: torch.device, dtype_name: str) -> tuple[str, float | None, str]:
    """``(device name, peak FLOP/s, where the peak comes from)``."""
    if dev.type == "cuda":
        device_name = torch.cuda.get_device_name(dev)
        peak = gpu_peak_flops(device_name, dtype_name)
        return device_name, peak, "datasheet (dense)" if peak else "unknown GPU"
    peak = measure_matmul_peak(dev, DTYPES[dtype_name])
    return f"cpu ({torch.get_num_threads()} threads)", peak, "measured: best 1024^3 matmul, before and after the runs"


def _summarise(measured: dict, mode: str, batch: int, flops: int, peak: float | None) -> dict:
    times = measured["times_s"]
    if not times:
        return {
            "time_per_iter_s": None,
            "times_s": [],
            "error": measured["error"],
            "peak_memory_gib": measured["peak_memory_gib"],
        }
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


def _measure(
    setup: BenchSetup, mode: str, vs_dense: bool, compile: bool, warmup: int, iters: int, llm: bool
) -> tuple[dict[str, dict], int, tuple[str, float | None, str]]:
    """Time our formulation (and the dense one) and summarise: ``(measured per formulation, model FLOPs per
    iteration, (device name, peak FLOP/s, where the peak comes from))``."""
    p, dev, batch = setup.preset, setup.device, setup.batch
    dtype_name = next(name for name, dtype in DTYPES.items() if dtype == setup.dtype)
    ours, dense = (train_step_fns if mode == "train" else sample_fns)(setup, compile_blocks=compile)
    flops = model_flops_per_iteration(setup.model.resolved, p, mode, batch, llm=llm)
    device_name, peak, peak_source = _peak(dev, dtype_name)
    timed = time_interleaved({"ours": ours, "dense": dense} if vs_dense else {"ours": ours}, dev, warmup, iters)
    if dev.type == "cpu" and peak is not None:  # a shared CPU's speed varies: keep the best before and after
        peak = max(peak, measure_matmul_peak(dev, setup.dtype))
    measured = {name: _summarise(m, mode, batch, flops, peak) for name, m in timed.items()}
    if dev.type != "cuda":
        measured["ours"]["peak_memory_gib"] = peak_memory_gib(dev)
    return measured, flops, (device_name, peak, peak_source)


def run_bench(
    mode: str,
    preset: str,
    device: str = "cpu",
    batch_size: int | None = None,
    vs_dense: bool = False,
    iters: int = 5,
    warmup: int = 2,
    compile: bool = False,
    dtype: str | None = None,
    llm: bool = True,
    llm_attention: str = "reference",
    seed: int = 0,
    threads: int | None = None,
) -> dict:
    """Benchmark one mode of one preset and return the results as a JSON-able dict.

    Args:
        mode: ``train`` (images/s of optimiser steps) or ``sample`` (s/image of 25-step CFG sampling).
        preset: a key of :data:`fusedit.bench.presets.PRESETS`.
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
        a dict: the run's settings and sizes, ``time_per_iter_s``, ``times_s``, ``img_per_s`` | ``s_per_image``,
        ``model_tflop_per_iter``, ``achieved_tflops``, ``peak_tflops``, ``mfu``, ``peak_memory_gib`` (CPU: the
        process's RSS peak) and, with ``vs_dense``, ``dense`` and ``speedup_vs_dense`` (median of paired ratios).
    """
    p = get_preset(preset)
    batch = p.batch_size if batch_size is None else batch_size
    dev, dtype_name = _check_arguments(mode, device, dtype, llm_attention, iters, warmup, batch, threads)
    if threads is not None:
        torch.set_num_threads(threads)
    setup = build_setup(
        p, dev, DTYPES[dtype_name], batch, mode, llm=llm, need_llm=vs_dense, seed=seed, llm_attention=llm_attention
    )
    measured, flops, (device_name, peak, peak_source) = _measure(setup, mode, vs_dense, compile, warmup, iters, llm)
    result = {
        "preset": p.name, "mode": mode, "device": dev.type, "device_name": device_name, "dtype": dtype_name,
        "batch_size": batch, "iters": iters, "warmup": warmup, "llm": llm, "llm_attention": llm_attention,
        "compile": compile, "image_tokens": p.image_tokens, "text_tokens": p.text_tokens,
        "real_text_tokens": p.real_tokens, "dit_params_m": _params_m(setup.model), "llm_params_m": _params_m(setup.llm),
    }  # fmt: skip
    if mode == "sample":
        result.update(steps=SAMPLE_STEPS, guidance_scale=GUIDANCE_SCALE)
    result.update(model_tflop_per_iter=flops / 1e12, peak_tflops=peak / 1e12 if peak else None, peak_source=peak_source)
    result.update(measured["ours"])
    result["memory_source"] = "cuda max_memory_allocated" if dev.type == "cuda" else "process peak RSS (ru_maxrss)"
    if vs_dense:
        result["dense"] = measured["dense"]
        result["speedup_vs_dense"] = paired_speedup(measured["ours"]["times_s"], measured["dense"]["times_s"])
    return result


def summary_line(result: dict) -> str:
    """One human-readable line of a :func:`run_bench` result."""

    def speed(r: dict) -> str:
        if r.get("error"):
            return r["error"]
        return f"{r['img_per_s']:.2f} img/s" if "img_per_s" in r else f"{r['s_per_image']:.4f} s/image"

    mfu = f", MFU {result['mfu']:.1%}" if result.get("mfu") is not None else ""
    memory = result.get("peak_memory_gib")
    memory = f", peak memory {memory:.2f} GiB" if memory is not None else ""
    line = (
        f"{result['preset']} {result['mode']} on {result['device_name']} ({result['dtype']}, batch "
        f"{result['batch_size']}): {speed(result)}{mfu}{memory}"
    )
    if "dense" in result:
        ratio = result["speedup_vs_dense"]
        line += f"; dense formulation {speed(result['dense'])}" + (f" -> {ratio:.2f}x" if ratio else "")
    return line
