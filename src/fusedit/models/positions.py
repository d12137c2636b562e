"""Position encoders for image tokens, one class per ``pos_embed`` variant (chosen at build time).

Image tokens are laid out row-major on an ``h × w`` grid. Text tokens keep the LLM's own 1D RoPE at positions
``0..L-1`` (pad slots included, the Hugging Face default); their keys arrive already rotated in the text context.
RoPE variants place the image after the prompt: the offset is the number of *real* text tokens of each prompt
(``L - n_pad``, the reference's convention), so it does not change when padding is trimmed.
"""

from __future__ import annotations

import torch
from torch import nn

from fusedit.models.layers import Rope, rotary_tables


def grid_ids(h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column index of each of the ``h·w`` row-major tokens: two ``(h·w,)`` long tensors."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    return rows, cols


class ImagePositions(nn.Module):
    """Interface: ``forward(h, w, offsets (B,)) -> Rope`` for the image tokens (None: no rotary embedding)."""

    def forward(self, h: int, w: int, offsets: torch.Tensor) -> Rope:  # pragma: no cover - interface
        raise NotImplementedError


class AbsolutePositions(ImagePositions):
    """``ape``: image positions come from the 2D sin-cos table added at patch embedding; no RoPE on images."""

    def forward(self, h: int, w: int, offsets: torch.Tensor) -> Rope:
        return None


class Rope1D(ImagePositions):
    """``1d-rope``: token ``i`` (row-major) at position ``offset + i``, full head_dim rotary table."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, h: int, w: int, offsets: torch.Tensor) -> Rope:
        ids = offsets[:, None] + torch.arange(h * w, device=offsets.device)[None]
        return rotary_tables(ids, self.head_dim, self.theta)


class Rope2D(ImagePositions):
    """``2d-rope``: half of head_dim encodes the row, half the column, each with a ``head_dim/2`` rotary table.

    Layout (rotate-half pairs ``j`` with ``j + D/2``): ``[rows q1, cols q1, rows q2, cols q2]`` where q1/q2 are the two
    halves of the ``D/2`` table (which are equal, so each pair rotates by one row or one column frequency).
    Both ids are offset by the number of real text tokens.
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, h: int, w: int, offsets: torch.Tensor) -> Rope:
        rows, cols = grid_ids(h, w, offsets.device)
        half = self.head_dim // 2
        row_cos, row_sin = rotary_tables(offsets[:, None] + rows[None], half, self.theta)
        col_cos, col_sin = rotary_tables(offsets[:, None] + cols[None], half, self.theta)
        q = half // 2

        def interleave(r, c):
            return torch.cat([r[..., :q], c[..., :q], r[..., q:], c[..., q:]], dim=-1)

        return interleave(row_cos, col_cos), interleave(row_sin, col_sin)


class MRope(ImagePositions):
    """``m-rope`` (Qwen2-VL style): full-dim rotary tables for rows and for columns; head_dim quarters alternate
    ``[rows, cols, rows, cols]``. Text tokens (row = col = position) reduce to plain 1D RoPE."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, h: int, w: int, offsets: torch.Tensor) -> Rope:
        rows, cols = grid_ids(h, w, offsets.device)
        row_cos, row_sin = rotary_tables(offsets[:, None] + rows[None], self.head_dim, self.theta)
        col_cos, col_sin = rotary_tables(offsets[:, None] + cols[None], self.head_dim, self.theta)
        q = self.head_dim // 4

        def interleave(r, c):
            return torch.cat([r[..., :q], c[..., q : 2 * q], r[..., 2 * q : 3 * q], c[..., 3 * q :]], dim=-1)

        return interleave(row_cos, col_cos), interleave(row_sin, col_sin)


def build_positions(pos_embed: str, head_dim: int, theta: float) -> ImagePositions:
    """The position encoder for a ``model.pos_embed`` value."""
    if pos_embed == "ape":
        return AbsolutePositions()
    classes = {"1d-rope": Rope1D, "2d-rope": Rope2D, "m-rope": MRope}
    return classes[pos_embed](head_dim, theta)
