"""What :mod:`fusedit.bench.memory` estimates, from a benchmark preset or from a training config (``fusedit bench
train --estimate-memory``): the resolved model, the parameter counts of the DiT and the LLM (built on the ``meta``
device: nothing is allocated or downloaded; a config's LLM needs only its ``config.json``), and the settings."""

from __future__ import annotations

from dataclasses import dataclass, replace

from fusedit.bench.inputs import llm_config
from fusedit.bench.memory import (
    MemoryEstimate,
    MemorySettings,
    ParameterCounts,
    dit_parameter_counts,
    estimate_training_memory,
    llm_parameter_counts,
)
from fusedit.bench.presets import BenchError, BenchPreset
from fusedit.config import ConfigError
from fusedit.models.config import LLMGeometry, ResolvedModelConfig, resolve_model_config
from fusedit.text.llm import load_llm_config
from fusedit.train.optimizers import OPTIMIZERS

LLM_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class MemoryPlan:
    """Everything one estimate needs; :meth:`estimate` runs it."""

    resolved: ResolvedModelConfig
    dit: ParameterCounts
    llm: ParameterCounts
    settings: MemorySettings
    source: str

    def estimate(self) -> MemoryEstimate:
        return estimate_training_memory(self.resolved, self.dit, self.llm, self.settings)

    def with_settings(self, **changes) -> MemoryPlan:
        return replace(self, settings=replace(self.settings, **changes))


def _keep_layers(resolved: ResolvedModelConfig) -> int:
    """LLM layers the text encoder keeps (deep fusion drops those past its deepest fused layer)."""
    if resolved.config.fusion == "deep" and not resolved.config.text_modulation:
        return max(resolved.fused_llm_layers, default=-1) + 1
    return 0  # all


def check_options(batch: int, world_size: int, sharding: str, precision: str, optimizer: str) -> None:
    """:class:`BenchError` for impossible settings."""
    if batch < 1:
        raise BenchError(f"the batch per process must be at least 1, got {batch}")
    if world_size < 1:
        raise BenchError(f"--world-size must be at least 1, got {world_size}")
    if sharding not in ("none", "ddp", "fsdp"):
        raise BenchError(f"--sharding: got {sharding!r}, expected none, ddp or fsdp")
    if precision not in ("fp32", "bf16"):
        raise BenchError(f"precision: got {precision!r}, expected fp32 or bf16")
    if optimizer not in OPTIMIZERS:
        raise BenchError(f"--optimizer: got {optimizer!r}, expected {', '.join(OPTIMIZERS[:-1])} or {OPTIMIZERS[-1]}")


def plan_for_preset(preset: BenchPreset, batch: int, device: str = "cpu", **options) -> MemoryPlan:
    """The plan of ``fusedit bench train --preset NAME``'s training step (``options``: :class:`MemorySettings`
    fields, e.g. ``optimizer="adamw8bit"``, ``activation_checkpointing=True``, ``precision="bf16"``)."""
    resolved = resolve_model_config(preset.model_config(), preset.geometry())
    settings = MemorySettings(
        batch=batch,
        image_tokens=preset.image_tokens,
        latent_channels=preset.latent_channels,
        latent_size=preset.latent_size,
        text_keys=preset.real_tokens,
        llm_tokens=preset.real_tokens,
        device=device,
        optimizer_kernel="foreach" if device == "cuda" else "single",
    )
    settings = replace(settings, **options)
    check_options(batch, settings.world_size, settings.sharding, settings.precision, settings.optimizer)
    llm = llm_parameter_counts(llm_config(preset), _keep_layers(resolved))
    return MemoryPlan(resolved, dit_parameter_counts(resolved), llm, settings, f"preset {preset.name}")


def _spatial_factor(data) -> int:
    """The VAE's downsampling factor from its ``config.json`` (1 in pixel space)."""
    if not data.vae:
        return 1
    from diffusers import AutoencoderKL

    try:
        config = AutoencoderKL.load_config(data.vae, subfolder=data.vae_subfolder)
    except Exception as error:
        raise ConfigError(f"data.vae: cannot read the VAE config at {data.vae!r}: {error}") from None
    return 2 ** (len(config.get("block_out_channels", [0])) - 1)


def plan_for_experiment(config, world_size: int = 1, device: str = "cuda") -> MemoryPlan:
    """The plan of ``fusedit train CONFIG`` on ``world_size`` processes of ``device`` (from the config's ``train``,
    ``text``, ``data`` and ``model`` sections; the prompt length is ``text.max_length``, an upper bound)."""
    hf_config = load_llm_config(config.text.llm)
    resolved = resolve_model_config(config.model, LLMGeometry.from_hf_config(hf_config))
    train, text = config.train, config.text
    factor = _spatial_factor(config.data)
    latent = config.data.resolution // factor
    check_options(1, world_size, train.distributed, "fp32", train.optimizer)
    if world_size > 1 and train.distributed == "none":
        raise BenchError(f"--world-size {world_size} needs train.distributed=ddp or fsdp in the config")
    micro = train.batch_size // (train.gradient_accumulation_steps * world_size)
    if micro < 1:
        raise BenchError(
            f"train.batch_size {train.batch_size} over {train.gradient_accumulation_steps} accumulation step(s) and "
            f"{world_size} process(es) leaves no sample per micro-batch"
        )
    dtype = text.dtype if text.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    settings = MemorySettings(
        batch=micro,
        image_tokens=(latent // config.model.patch_size) ** 2,
        latent_channels=config.model.in_channels,
        latent_size=latent,
        text_keys=text.max_length,
        llm_tokens=text.max_length,
        precision="bf16" if (train.mixed_precision == "bf16" and device == "cuda") else "fp32",
        optimizer=train.optimizer,
        optimizer_kernel="fused" if train.fused_adamw else ("foreach" if device == "cuda" else "single"),
        activation_checkpointing=train.activation_checkpointing,
        world_size=world_size,
        sharding=train.distributed,
        llm_bytes=LLM_BYTES[dtype],
        llm_int8=text.quantization == "int8",
        llm_offload=text.offload,
        device=device,
    )
    llm = llm_parameter_counts(hf_config, _keep_layers(resolved))
    return MemoryPlan(resolved, dit_parameter_counts(resolved), llm, settings, f"config {config.name}")
