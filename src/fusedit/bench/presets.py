"""Benchmark presets: a model + input geometry each (plain data: the command line lists them without importing
torch)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from fusedit.models.config import LLMGeometry, ModelConfig


class BenchError(ValueError):
    """A user mistake in the benchmark's arguments (unknown preset, CUDA unavailable, ...)."""


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
        return LLMGeometry(
            model_type="gemma2",
            hidden_size=self.llm_hidden_size,
            num_hidden_layers=self.llm_num_layers,
            num_attention_heads=self.llm_num_heads,
            num_key_value_heads=self.llm_num_kv_heads,
            head_dim=self.llm_head_dim,
            intermediate_size=self.llm_intermediate_size,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
        )

    def model_config(self) -> ModelConfig:
        """The paper's scaled recipe: deep fusion, self-attention, 2D RoPE, no timestep, sandwich norm, QK-norm."""
        base = ModelConfig(
            fusion="deep",
            attention="self",
            pos_embed="2d-rope",
            timestep_conditioning="none",
            qk_norm=True,
            sandwich_norm=True,
            patch_size=self.patch_size,
            in_channels=self.latent_channels,
            sample_size=self.latent_size,
            pos_embed_max_size=max(64, self.latent_size // self.patch_size),
        )
        return replace(base, **self.model)


PRESETS: dict[str, BenchPreset] = {
    p.name: p
    for p in (
        BenchPreset(
            "tiny",
            "CPU-sized: 4-layer LLM of width 128, 32 px pixel space (256 image tokens), prompts of 12 "
            "tokens padded to the reference's 256",
            llm_hidden_size=128,
            llm_num_layers=4,
            llm_num_heads=4,
            llm_num_kv_heads=2,
            llm_head_dim=32,
            llm_intermediate_size=256,
            vocab_size=256,
            image_size=32,
            latent_factor=1,
            latent_channels=3,
            patch_size=2,
            text_tokens=256,
            real_tokens=12,
        ),
        BenchPreset(
            "small",
            "8 layers of width 512, 256 px with an SD3-like VAE (256 image tokens), 128 text tokens",
            llm_hidden_size=512,
            llm_num_layers=8,
            llm_num_heads=8,
            llm_num_kv_heads=4,
            llm_head_dim=64,
            llm_intermediate_size=2048,
            vocab_size=32000,
            image_size=256,
            latent_factor=8,
            latent_channels=16,
            patch_size=2,
            text_tokens=128,
            real_tokens=48,
        ),
        BenchPreset(
            "base",
            "16 layers of width 1024, 512 px with an SD3-like VAE (1024 image tokens), 256 text tokens",
            llm_hidden_size=1024,
            llm_num_layers=16,
            llm_num_heads=8,
            llm_num_kv_heads=4,
            llm_head_dim=128,
            llm_intermediate_size=4096,
            vocab_size=256000,
            image_size=512,
            latent_factor=8,
            latent_channels=16,
            patch_size=2,
            text_tokens=256,
            real_tokens=96,
        ),
        BenchPreset(
            "fusedit-2b",
            "FuseDiT-2B: Gemma-2-2B geometry (26 layers, width 2304), 512 px SD3 VAE latents "
            "(1024 image tokens), 256 text tokens of which 96 real",
            llm_hidden_size=2304,
            llm_num_layers=26,
            llm_num_heads=8,
            llm_num_kv_heads=4,
            llm_head_dim=256,
            llm_intermediate_size=9216,
            vocab_size=256000,
            image_size=512,
            latent_factor=8,
            latent_channels=16,
            patch_size=2,
            text_tokens=256,
            real_tokens=96,
        ),
    )
}


def get_preset(name: str) -> BenchPreset:
    """The preset called ``name``; :class:`BenchError` listing the presets otherwise."""
    if name not in PRESETS:
        raise BenchError(f"unknown preset {name!r}; available presets: {', '.join(PRESETS)}")
    return PRESETS[name]
