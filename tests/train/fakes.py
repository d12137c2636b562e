"""Small fakes of the trainer's collaborators: a conv-net velocity model, text encoders and a dataset."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset


def caption_features(captions: list[str], dim: int = 8) -> torch.Tensor:
    """A deterministic (B, dim) embedding of captions (empty caption -> zeros)."""
    rows = []
    for c in captions:
        codes = torch.tensor([ord(ch) for ch in c] or [0], dtype=torch.float32)
        rows.append(torch.stack([torch.cos(codes * (k + 1) / 50).mean() * (len(c) > 0) for k in range(dim)]))
    return torch.stack(rows)


class FrozenTextEncoder(nn.Module):
    """encode -> (B, 8) context; has parameters (which must never be trained or saved)."""

    trainable = False

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def trainable_parameters(self):
        return iter(())

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self.proj(caption_features(prompts))


class TrainableTextEncoder(FrozenTextEncoder):
    trainable = True

    def trainable_parameters(self):
        return self.proj.parameters()


class TinyVelocityModel(nn.Module):
    """forward(x (B, 3, H, W), timestep (B,), context (B, 8)) -> (B, 3, H, W). Has dropout (global RNG)."""

    def __init__(self, channels: int = 3, hidden: int = 8) -> None:
        super().__init__()
        self.inp = nn.Conv2d(channels, hidden, 3, padding=1)
        self.time = nn.Linear(1, hidden)
        self.text = nn.Linear(8, hidden)
        self.drop = nn.Dropout(0.1)
        self.out = nn.Conv2d(hidden, channels, 3, padding=1)
        self.frozen = nn.Parameter(torch.ones(1), requires_grad=False)

    def forward(self, x, timestep, context):
        h = self.inp(x) + (self.time(timestep[:, None] / 1000) + self.text(context))[:, :, None, None]
        return self.out(self.drop(torch.nn.functional.silu(h))) * self.frozen


class ImageCaptionDataset(Dataset):
    """``n`` fixed random images (3, size, size) in [-1, 1] with captions."""

    def __init__(self, n: int = 10, size: int = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, size, size, generator=g) * 2 - 1
        self.captions = [f"a {c} square number {i}" for i, c in zip(range(n), ["red", "blue", "green"] * n)]
        self.fetches = 0
        self.crash_after: int | None = None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        self.fetches += 1
        if self.crash_after is not None and self.fetches > self.crash_after:
            raise RuntimeError("simulated crash")
        return {"image": self.images[i], "caption": self.captions[i]}
