"""The one denoising loop of fusedit: Euler steps of the flow-match scheduler with classifier-free guidance.

Used by the pipeline (:class:`~fusedit.sampling.pipeline.FuseDiTPipeline`), by ``fusedit bench sample`` and, with
the reference's formulation as the velocity, by the pipeline's uncached path and the benchmark's dense side.

Guidance (``docs/design.md``, "Sampling"): the CFG batch is ``[x ; x]`` with text rows ``[unconditional ;
conditional]`` (the reference's order) and the guided velocity is ``v_u + s·(v_c - v_u)``. A scale of 1 or less runs
the conditional half alone. With a guidance interval ``[σ_low, σ_high]`` the steps whose σ lies outside it use the
conditional velocity alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import torch

from fusedit.progress import track


class VelocityFn(Protocol):
    """``velocity(x, timestep, guided) -> v``: the model's velocity for latents ``x`` ``(N, C, h, w)`` at
    ``timestep`` ``(N,)`` = σ·1000. ``guided``: ``x`` is the CFG batch ``[x ; x]`` and the text rows are
    ``[unconditional ; conditional]``; else ``x`` is the conditional batch alone."""

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, guided: bool) -> torch.Tensor: ...


def guided_velocity(velocity: VelocityFn, x: torch.Tensor, t: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """The classifier-free-guided velocity ``v_u + s·(v_c - v_u)`` at scheduler timestep ``t`` (a scalar tensor) for
    latents ``x`` ``(B, C, h, w)``, in float32."""
    batch = x.shape[0]
    v_uncond, v_cond = velocity(torch.cat([x, x]), t.expand(2 * batch).to(x.device), True).float().chunk(2)
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def conditional_velocity(velocity: VelocityFn, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The unguided (conditional) velocity at ``t`` for ``x`` ``(B, C, h, w)``, in float32."""
    return velocity(x, t.expand(x.shape[0]).to(x.device), False).float()


def denoise(
    velocity: VelocityFn,
    latents: torch.Tensor,
    scheduler: Any,
    num_inference_steps: int,
    guidance_scale: float,
    guidance_interval: Sequence[float] | None = None,
    progress: bool | Callable[[Iterable[torch.Tensor]], Iterable[torch.Tensor]] = False,
    on_step_end: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Integrate ``latents`` ``(B, C, h, w)`` (float32 noise at σ = 1) to σ = 0 and return the result.

    Args:
        velocity: the model's velocity (see :class:`VelocityFn`).
        scheduler: a diffusers ``FlowMatchEulerDiscreteScheduler`` (its timesteps are set here).
        num_inference_steps: Euler steps.
        guidance_scale: CFG scale ``s`` (``<= 1``: no guidance, the conditional batch alone).
        guidance_interval: guide only at steps whose σ lies in ``[σ_low, σ_high]`` (``None``: every step).
        progress: show the steps' progress (:func:`fusedit.progress.track`), or a function wrapping the timesteps'
            iterable (a progress bar of the caller's; it may also stop early by ending the iteration).
        on_step_end: ``on_step_end(i, t, x) -> x`` after step ``i`` (timestep ``t``), returning the latents to go on
            with (diffusers' ``callback_on_step_end``).
    """
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    timesteps: Iterable[torch.Tensor] = scheduler.timesteps
    if callable(progress):
        timesteps = progress(timesteps)
    elif progress:
        timesteps = track(timesteps, len(scheduler.timesteps), desc="sampling", unit="step")
    guided = guidance_scale > 1.0
    x = latents
    for i, t in enumerate(timesteps):
        sigma = float(t) / 1000.0
        inside = guidance_interval is None or guidance_interval[0] <= sigma <= guidance_interval[1]
        if guided and inside:
            v = guided_velocity(velocity, x, t, guidance_scale)
        else:
            v = conditional_velocity(velocity, x, t)
        x = scheduler.step(v, t, x, return_dict=False)[0]
        if on_step_end is not None:
            x = on_step_end(i, t, x)
    return x
