"""Timestep conditioning variants (``adaln-zero``, ``adaln-single``, ``addition``, ``none``), resolved at build time.

Each variant is three small pieces:

* a :class:`TimestepEmbedder` (top level): ``timestep (B,) -> Conditioning`` — the embedding (plus the pooled text
  modulation, if any), what the layers read, and what the output head reads;
* per-layer modulation (:class:`AdaLNZeroModulation`, :class:`AdaLNSingleModulation`, or none): the six tensors
  ``shift/scale/gate`` for attention and MLP;
* an output modulation (:class:`AdaLNZeroOutput`, :class:`AdaLNSingleOutput`, or none): shift/scale after the final
  norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from diffusers.models.embeddings import Timesteps
from torch import nn

from fusedit.models.layers import RMSNorm, SelfInitializing


@dataclass
class Conditioning:
    """``layer``: ``(B, E)`` input of per-layer modulation; ``final``: ``(B, H)`` input of the output modulation and of
    token addition. Both None when the model has no timestep input."""

    layer: torch.Tensor | None = None
    final: torch.Tensor | None = None


class Modulation(NamedTuple):
    """Six ``(B, H)`` tensors of an adaptive layer norm."""

    shift_msa: torch.Tensor
    scale_msa: torch.Tensor
    gate_msa: torch.Tensor
    shift_mlp: torch.Tensor
    scale_mlp: torch.Tensor
    gate_mlp: torch.Tensor


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x (B, N, H) · (1 + scale) + shift`` with ``(B, H)`` shift/scale."""
    return x * (1 + scale[:, None]) + shift[:, None]


class NoTimestep(nn.Module):
    """``none``: the model sees no timestep at all."""

    adds_to_tokens = False

    def forward(self, timestep: torch.Tensor, pooled: torch.Tensor | None, dtype: torch.dtype) -> Conditioning:
        return Conditioning()


class TimestepEmbedder(SelfInitializing, nn.Module):
    """``timestep (B,)`` -> sinusoidal features (256, cos first) -> Linear -> SiLU -> Linear ``(B, H)``.

    Optionally adds a pooled text embedding through RMSNorm -> Linear -> SiLU -> Linear (text modulation), and
    optionally maps the sum through ``t_block`` (SiLU -> Linear to ``6H``, AdaLN-single) for the layers.

    Attributes:
        adds_to_tokens: ``addition`` variant — the embedding is added to every patch token.
    """

    def __init__(
        self,
        hidden_size: int,
        *,
        pooled_dim: int | None = None,
        eps: float = 1e-6,
        single: bool = False,
        adds_to_tokens: bool = False,
    ):
        super().__init__()
        self.time_proj = Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.timestep_embedder = nn.Sequential(
            nn.Linear(256, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.condition_embedder = None
        if pooled_dim is not None:
            self.condition_embedder = nn.Sequential(
                RMSNorm(pooled_dim, eps),
                nn.Linear(pooled_dim, hidden_size),
                nn.SiLU(),
                nn.Linear(hidden_size, hidden_size),
            )
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size)) if single else None
        self.adds_to_tokens = adds_to_tokens

    def reset_parameters(self) -> None:
        """The reference's initialisation: every linear layer's weight ~ N(0, 0.02) (biases stay zero)."""
        linears = [m for m in self.timestep_embedder if isinstance(m, nn.Linear)]
        for extra in (self.condition_embedder, self.t_block):
            if extra is not None:
                linears += [m for m in extra if isinstance(m, nn.Linear)]
        for linear in linears:
            nn.init.normal_(linear.weight, std=0.02)

    def forward(self, timestep: torch.Tensor, pooled: torch.Tensor | None, dtype: torch.dtype) -> Conditioning:
        emb = self.timestep_embedder(self.time_proj(timestep).to(dtype))
        if self.condition_embedder is not None:
            if pooled is None:
                raise ValueError(
                    "this model uses text modulation but the text context has no pooled embedding; "
                    "set text.pooled to llm-mean or clip"
                )
            emb = emb + self.condition_embedder(pooled.to(dtype))
        layer = self.t_block(emb) if self.t_block is not None else emb
        return Conditioning(layer=layer, final=emb)


class AdaLNZeroModulation(SelfInitializing, nn.Module):
    """Per-layer AdaLN-Zero: ``Linear(SiLU(temb)) (B, 6H)`` -> shift/scale/gate for attention and MLP."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 6 * hidden_size)

    def reset_parameters(self) -> None:
        """Zero (the "Zero" of AdaLN-Zero): every block starts as the identity."""
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, emb: torch.Tensor) -> Modulation:
        return Modulation(*self.linear(nn.functional.silu(emb)).chunk(6, dim=1))


class AdaLNSingleModulation(nn.Module):
    """Per-layer AdaLN-single (PixArt): a learned ``(6H,)`` table plus the shared ``t_block`` output."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.randn(6 * hidden_size) / hidden_size**0.5)

    def forward(self, emb: torch.Tensor) -> Modulation:
        return Modulation(*(self.scale_shift_table + emb).chunk(6, dim=1))


class AdaLNZeroOutput(SelfInitializing, nn.Module):
    """Final AdaLN: ``Linear(SiLU(temb))`` -> chunks **scale, shift** (the reference's order)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 2 * hidden_size)

    def reset_parameters(self) -> None:
        """Zero, like the per-layer modulation."""
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(nn.functional.silu(emb)).chunk(2, dim=1)
        return modulate(x, shift, scale)


class AdaLNSingleOutput(nn.Module):
    """Final AdaLN-single: ``table (2H,) + [temb, temb]`` -> chunks **shift, scale** (the reference's order)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.randn(2 * hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table + torch.cat([emb, emb], dim=1)).chunk(2, dim=1)
        return modulate(x, shift, scale)


@dataclass
class TimestepVariant:
    """The pieces of one timestep-conditioning variant (factories for per-layer and output modules)."""

    embedder: nn.Module
    layer_modulation: type | None
    output_modulation: type | None


def build_timestep_variant(name: str, hidden_size: int, pooled_dim: int | None, eps: float) -> TimestepVariant:
    """Resolve ``model.timestep_conditioning`` into modules (done once, at build time)."""
    if name == "none":
        return TimestepVariant(NoTimestep(), None, None)
    if name == "adaln-zero":
        return TimestepVariant(
            TimestepEmbedder(hidden_size, pooled_dim=pooled_dim, eps=eps), AdaLNZeroModulation, AdaLNZeroOutput
        )
    if name == "adaln-single":
        return TimestepVariant(
            TimestepEmbedder(hidden_size, pooled_dim=pooled_dim, eps=eps, single=True),
            AdaLNSingleModulation,
            AdaLNSingleOutput,
        )
    if name == "addition":
        return TimestepVariant(
            TimestepEmbedder(hidden_size, pooled_dim=pooled_dim, eps=eps, adds_to_tokens=True), None, None
        )
    raise ValueError(f"unknown timestep conditioning {name!r}")
