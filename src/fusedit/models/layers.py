"""Building blocks shared by every DiT variant: norms, the GeGLU MLP, rotary embeddings and masked attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Rope = tuple[torch.Tensor, torch.Tensor] | None
"""``(cos, sin)``, each ``(B, N, D)`` for ``N`` tokens and head_dim ``D``; None: no rotary embedding."""


class SelfInitializing:
    """Mixin of the modules whose :meth:`reset_parameters` sets the reference's initialisation of their own weights.

    The model first gives every ``nn.Linear`` Xavier-uniform weights and zero biases (the reference's default), then
    calls ``reset_parameters()`` of each such module, in module order (see
    :meth:`fusedit.models.dit.DiffusionTransformer.reset_parameters`).
    """

    def reset_parameters(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError


def xavier_linears(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every ``nn.Linear`` under ``module`` (children first)."""

    def init(child: nn.Module) -> None:
        if isinstance(child, nn.Linear):
            nn.init.xavier_uniform_(child.weight)
            if child.bias is not None:
                nn.init.zeros_(child.bias)

    module.apply(init)


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: computed in float32 as ``x · rsqrt(mean(x²) + eps) · (1 + w)``; ``w`` starts at zero."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class GeGLU(nn.Module):
    """Gemma's MLP: ``down(gelu_tanh(gate(x)) · up(x))``, no biases. ``(..., H) -> (..., H)``."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


def rotary_tables(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary ``(cos, sin)`` for integer ``positions`` ``(B, N)``: each ``(B, N, dim)`` in float32.

    Rotate-half layout (as in transformers' Llama/Gemma): frequencies ``theta^(-2i/dim)`` for ``i < dim/2``,
    duplicated so that element ``j`` pairs with ``j + dim/2``.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.int64).float() / dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate ``x`` ``(B, H, N, D)`` by ``rope`` = ``(cos, sin)`` ``(B, N, D)``."""
    cos, sin = (t.unsqueeze(1).to(x.dtype) for t in rope)
    return x * cos + rotate_half(x) * sin


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, N, H·D) -> (B, H, N, D)``."""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, N, D) -> (B, N, H·D)``."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """Bidirectional attention of ``q`` ``(B, H, N, D)`` over ``k, v`` ``(B, H_kv, M, D)``.

    ``key_mask``: ``(B, M)`` bool (True = attend) or None when every key is valid (lets SDPA pick its flash /
    memory-efficient kernels). Grouped-query attention is handled by SDPA without materialising repeated heads.
    Scale ``D^-0.5``, no soft-capping. Returns ``(B, H, N, D)``.
    """
    mask = None if key_mask is None else key_mask[:, None, None, :]
    if q.shape[1] != k.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
