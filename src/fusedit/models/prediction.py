"""What the network's output means: the velocity itself, or the clean sample from which the velocity follows.

The model's contract never changes: ``forward`` returns the rectified-flow velocity ``v = ε - x_0`` (see
:mod:`fusedit.flow`), so training, sampling and the reference checkpoints are untouched by the choice.

* ``velocity`` (the reference's): the network's output is ``v``.
* ``sample``: the network predicts the clean sample ``x̂_0`` and ``v = (x_σ - x̂_0) / max(σ, σ_min)`` (exact for
  ``σ ≥ σ_min``, since ``x_σ - x_0 = σ·v``). Clean images of a simple world lie on a low-dimensional manifold while
  ``v`` carries the full-rank noise, so a small network predicts ``x̂_0`` far more easily ("Back to Basics: Let
  Denoising Generative Models Denoise", Li & He, 2025); measured on the shapes world in ``docs/results/demo.md``.
  The floor keeps the division finite near σ = 0.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Prediction = Literal["velocity", "sample"]
PREDICTIONS: tuple[str, ...] = ("velocity", "sample")


class VelocityPrediction(nn.Module):
    """The output is the velocity."""

    def forward(self, output: torch.Tensor, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return output


class SamplePrediction(nn.Module):
    """The output is ``x̂_0``; returns ``(x - x̂_0) / max(σ, sigma_min)`` with ``σ = timestep / num_train_timesteps``.

    Args:
        sigma_min: floor of σ in the division.
        num_train_timesteps: the timestep scale (``timestep = σ · num_train_timesteps``).
    """

    def __init__(self, sigma_min: float = 0.05, num_train_timesteps: int = 1000):
        super().__init__()
        self.sigma_min = float(sigma_min)
        self.num_train_timesteps = int(num_train_timesteps)

    def forward(self, output: torch.Tensor, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """``output``, ``x``: ``(B, C, H, W)``; ``timestep``: ``(B,)``."""
        sigma = (timestep.to(torch.float32) / self.num_train_timesteps).clamp_min(self.sigma_min)
        velocity = (x.to(torch.float32) - output.to(torch.float32)) / sigma.view(-1, *([1] * (x.ndim - 1)))
        return velocity.to(output.dtype)


def build_prediction(kind: str) -> nn.Module:
    """The output parametrisation for ``model.prediction``."""
    if kind == "velocity":
        return VelocityPrediction()
    if kind == "sample":
        return SamplePrediction()
    raise ValueError(f"model.prediction: got {kind!r}, expected one of {PREDICTIONS}")
