"""Naive formulas shared by the model tests: written out in full, independent of fusedit's modules."""

from __future__ import annotations

import math

import torch


def gemma_rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1 + weight)


def rope_tables(positions, dim, theta):
    """positions (B, N) -> cos, sin (B, N, dim) in the rotate-half layout."""
    inv = 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim)
    angles = positions.float()[..., None] * inv
    angles = torch.cat([angles, angles], -1)
    return angles.cos(), angles.sin()


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos[:, None] + rotated * sin[:, None]


def heads(x, n):
    b, length, _ = x.shape
    return x.view(b, length, n, -1).transpose(1, 2)


def softmax_attention(q, k, v, allowed):
    """q (B,H,Nq,D), k/v (B,Hkv,Nk,D), allowed (B,Nq,Nk) bool -> (B,Nq,H*D). Explicit scores and softmax."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    weights = torch.nan_to_num(weights)  # fully masked rows (padding queries) -> zeros
    out = weights @ v
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


def image_rope(kind, h, w, offsets, head_dim, theta):
    rows = torch.arange(h).repeat_interleave(w)[None] + offsets[:, None]
    cols = torch.arange(w).repeat(h)[None] + offsets[:, None]
    if kind == "1d-rope":
        return rope_tables(torch.arange(h * w)[None] + offsets[:, None], head_dim, theta)
    if kind == "2d-rope":
        rc, rs = rope_tables(rows, head_dim // 2, theta)
        cc, cs = rope_tables(cols, head_dim // 2, theta)
        q = head_dim // 4
        mix = lambda r, c: torch.cat([r[..., :q], c[..., :q], r[..., q:], c[..., q:]], -1)  # noqa: E731
        return mix(rc, cc), mix(rs, cs)
    if kind == "m-rope":
        rc, rs = rope_tables(rows, head_dim, theta)
        cc, cs = rope_tables(cols, head_dim, theta)
        q = head_dim // 4
        mix = lambda r, c: torch.cat([r[..., :q], c[..., q : 2 * q], r[..., 2 * q : 3 * q], c[..., 3 * q :]], -1)  # noqa
        return mix(rc, cc), mix(rs, cs)
    return None
