"""Rectified-flow math: time (σ) sampling, the noising path, the velocity target and loss weights.

Time convention (the one convention of fusedit; SD3 / diffusers' ``FlowMatchEulerDiscreteScheduler``):

* ``x_t = (1 - σ)·x_0 + σ·ε`` with ``σ ∈ [0, 1]``: σ = 0 is the clean image/latent ``x_0``, σ = 1 pure noise ``ε``.
* The model predicts the velocity ``v = dx_t/dσ = ε - x_0`` (the regression target).
* The model's ``timestep`` input is ``σ · num_train_timesteps`` (``σ·1000``), a float tensor of shape ``(B,)``.
* Sampling integrates from σ = 1 to σ = 0 with Euler steps ``x ← x + (σ_next - σ)·v`` — exactly what
  ``FlowMatchEulerDiscreteScheduler.step`` does, so a perfect velocity recovers ``x_0``.

Everything here is pure (no global RNG): randomness comes from an explicit :class:`torch.Generator`, so a run is
reproducible and resumable from the generator's state.
"""

from __future__ import annotations

import math
from typing import Any, Literal, cast

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

TimeSampling = Literal["reference", "uniform", "logit_normal", "mode"]
LossWeighting = Literal["none", "sigma_sqrt", "cosmap"]

TIME_SAMPLING_METHODS = ("reference", "uniform", "logit_normal", "mode")
LOSS_WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "cosmap")


def timestep_input(sigmas: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The model's ``timestep`` input for noise levels ``sigmas`` (any shape): ``σ · num_train_timesteps``."""
    return sigmas * num_train_timesteps


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's time shift ``shift·σ / (1 + (shift - 1)·σ)`` (``shift > 1`` moves mass towards noise). Any shape."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * sigmas / (1 + (shift - 1) * sigmas)


class FlowMatchSchedule:
    """The training time schedule: diffusers' ``FlowMatchEulerDiscreteScheduler`` training sigmas plus σ sampling.

    Attributes:
        scheduler: the diffusers scheduler (its training-time state; never ``set_timesteps`` on it here).
        sigmas: ``(num_train_timesteps,)`` float32, **descending** shifted sigmas, ``sigmas[0] = 1``.
        timesteps: ``(num_train_timesteps,)`` float32, ``sigmas · num_train_timesteps`` (the model's time input).
    """

    def __init__(self, shift: float = 3.0, num_train_timesteps: int = 1000) -> None:
        if shift <= 0:
            raise ValueError(f"FlowMatchSchedule: shift must be > 0, got {shift}")
        if num_train_timesteps <= 0:
            raise ValueError(f"FlowMatchSchedule: num_train_timesteps must be > 0, got {num_train_timesteps}")
        self.shift = float(shift)
        self.num_train_timesteps = int(num_train_timesteps)
        self.scheduler: Any = cast(
            Any, FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)
        )
        self.sigmas = self.scheduler.sigmas.clone().to(torch.float32)
        self.timesteps = self.scheduler.timesteps.clone().to(torch.float32)

    def timesteps_for(self, sigmas: torch.Tensor) -> torch.Tensor:
        """The model's timestep input for ``sigmas`` (any shape): ``σ · num_train_timesteps``."""
        return timestep_input(sigmas, self.num_train_timesteps)

    def sample_sigmas(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        method: TimeSampling = "reference",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        apply_shift: bool = True,
        uniform_fraction: float = 0.0,
    ) -> torch.Tensor:
        """Draw training noise levels σ, shape ``(batch_size,)`` float32 on the generator's device (CPU if none).

        Methods:
            ``reference``: the reference recipe. ``u = sigmoid(N(logit_mean, logit_std²))``, index
                ``⌊u·N⌋`` (N = num_train_timesteps) into the descending scheduler timesteps, σ = that step's sigma
                (already shifted by the scheduler). ``u`` is clamped to index ``N - 1`` in the (float-rounding)
                case ``u = 1``, where the reference would index out of range.
            ``uniform``: ``u ~ U[0, 1)``.
            ``logit_normal``: ``u = sigmoid(N(logit_mean, logit_std²))`` (SD3).
            ``mode``: SD3's mode sampling ``u = 1 - v - mode_scale·(cos²(π v / 2) - 1 + v)``, ``v ~ U[0, 1)``.
            For the three continuous methods σ = ``shift_sigmas(u, self.shift)`` if ``apply_shift`` else ``u``
            (``apply_shift`` is ignored by ``reference``, whose sigmas are the scheduler's shifted ones).

        ``uniform_fraction``: each σ is replaced, with this probability, by an unshifted ``U[0, 1)`` draw (a mixture
        that keeps training the low noise levels a strong shift almost never visits; those decide the last sampling
        steps, e.g. whether a flat background comes out clean). With 0 no extra random numbers are drawn.

        The random numbers are drawn exactly as diffusers' ``compute_density_for_timestep_sampling`` draws them.
        """
        if batch_size <= 0:
            raise ValueError(f"sample_sigmas: batch_size must be > 0, got {batch_size}")
        device = generator.device if generator is not None else torch.device("cpu")
        if method in ("reference", "logit_normal"):
            if logit_std <= 0:
                raise ValueError(f"sample_sigmas: logit_std must be > 0, got {logit_std}")
            u = torch.normal(mean=logit_mean, std=logit_std, size=(batch_size,), device=device, generator=generator)
            u = torch.sigmoid(u)
        elif method == "uniform":
            u = torch.rand((batch_size,), device=device, generator=generator)
        elif method == "mode":
            v = torch.rand((batch_size,), device=device, generator=generator)
            u = 1 - v - mode_scale * (torch.cos(math.pi * v / 2) ** 2 - 1 + v)
        else:
            raise ValueError(f"sample_sigmas: unknown method {method!r}; expected one of {TIME_SAMPLING_METHODS}")

        if method == "reference":
            indices = (u * self.num_train_timesteps).long().clamp_(max=self.num_train_timesteps - 1)
            sigmas = self.sigmas.to(device)[indices]
        else:
            u = u.to(torch.float32)
            sigmas = shift_sigmas(u, self.shift) if apply_shift else u
        if not 0.0 <= uniform_fraction <= 1.0:
            raise ValueError(f"sample_sigmas: uniform_fraction must be in [0, 1], got {uniform_fraction}")
        if uniform_fraction > 0:
            pick = torch.rand((batch_size,), device=device, generator=generator) < uniform_fraction
            uniform = torch.rand((batch_size,), device=device, generator=generator)
            sigmas = torch.where(pick, uniform, sigmas)
        return sigmas


def _expand_like(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape ``sigma`` of shape ``(B,)`` (or a scalar) to broadcast over ``x`` of shape ``(B, ...)``."""
    if sigma.ndim == 0:
        return sigma.to(dtype=x.dtype, device=x.device)
    if sigma.ndim != 1 or sigma.shape[0] != x.shape[0]:
        raise ValueError(f"sigma must have shape (B,) = ({x.shape[0]},) or be a scalar, got {tuple(sigma.shape)}")
    return sigma.to(dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))


def interpolate(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The noised sample ``x_t = (1 - σ)·x_0 + σ·ε``. ``x0``, ``noise``: ``(B, ...)``; ``sigma``: ``(B,)`` or scalar."""
    if x0.shape != noise.shape:
        raise ValueError(f"interpolate: x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
    s = _expand_like(sigma, x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The regression target ``v = ε - x_0`` (same shape as the inputs)."""
    if x0.shape != noise.shape:
        raise ValueError(f"velocity_target: x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} differ in shape")
    return noise - x0


def loss_weighting(sigmas: torch.Tensor, scheme: LossWeighting = "none") -> torch.Tensor:
    """SD3's per-sample loss weights, float32, same shape as ``sigmas``.

    ``none``: 1; ``sigma_sqrt``: ``σ⁻²`` (infinite at σ = 0); ``cosmap``: ``2 / (π·(1 - 2σ + 2σ²))``.
    """
    sigmas = sigmas.to(torch.float32)
    if scheme == "none":
        return torch.ones_like(sigmas)
    if scheme == "sigma_sqrt":
        return sigmas**-2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    raise ValueError(f"loss_weighting: unknown scheme {scheme!r}; expected one of {LOSS_WEIGHTING_SCHEMES}")


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted MSE: ``mean_b( w_b · mean_{c,h,w} (pred - target)² )``, computed in float32. Returns a scalar.

    ``pred``, ``target``: ``(B, ...)``; ``weights``: ``(B,)`` or ``None`` (uniform).
    """
    if pred.shape != target.shape:
        raise ValueError(f"flow_matching_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    per_sample = ((pred.float() - target.float()) ** 2).reshape(pred.shape[0], -1).mean(dim=1)
    if weights is not None:
        if weights.shape != per_sample.shape:
            raise ValueError(
                f"flow_matching_loss: weights must have shape ({pred.shape[0]},), got {tuple(weights.shape)}"
            )
        per_sample = weights.to(per_sample) * per_sample
    return per_sample.mean()
