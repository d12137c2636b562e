"""Sampling with diffusers' conventions: Euler on the flow-match schedule, CFG as one batch, cached text context.

``pipe(prompt, negative_prompt=None, height=, width=, num_inference_steps=, guidance_scale=, generator=, latents=,
output_type="pil"|"np"|"pt"|"latent", max_sequence_length=)`` returns a :class:`PipelineOutput` with ``.images``.

The text context of the prompts is computed once per call and reused at every step; the unconditional context is
cached across calls (keyed by negative prompt and length). ``use_text_cache=False`` recomputes both at every step —
the same numbers, slower (tested).

The CFG batch is ``[unconditional ; conditional]`` (the reference's order) and the guided velocity is
``v_u + s·(v_c - v_u)``; scale 1 (or less) skips the unconditional half. With a guidance interval ``[σ_low,
σ_high]`` (``guidance_interval=``, default: the model's ``sample.guidance_interval``), steps whose σ lies outside it
use the conditional velocity alone.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from fusedit.text.context import TextContext

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class PipelineOutput:
    """``images``: list of PIL images, ``(B, H, W, 3)`` float array in [0, 1], ``(B, 3, H, W)`` tensor in [0, 1], or
    latents ``(B, C, h, w)``; ``num_truncated``: prompts cut at the maximum length."""

    images: Any
    num_truncated: int = 0


def make_scheduler(shift: float = 3.0):
    """diffusers' ``FlowMatchEulerDiscreteScheduler`` with SD3's settings and the given shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def postprocess(images: torch.Tensor, output_type: str):
    """``images`` ``(B, 3, H, W)`` in [-1, 1] -> the requested output type (values in [0, 1])."""
    images = (images.float() / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images
    array = images.permute(0, 2, 3, 1).cpu().numpy()
    if output_type == "np":
        return array
    from PIL import Image

    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]


class FuseDiTPipeline:
    """A trained model + its text encoder + a scheduler + a codec (pixels or a VAE).

    Args:
        model: ``forward(x, timestep = σ·1000, context) -> velocity``.
        text_encoder: :class:`fusedit.text.TextEncoder` built for this model's requirements.
        scheduler: a diffusers ``FlowMatchEulerDiscreteScheduler``.
        codec: ``decode(latents) -> images in [-1, 1]``, ``channels``, ``spatial_factor``.
        defaults: :class:`fusedit.experiment.SampleConfig` (steps, CFG, negative prompt) or None.
        config: the :class:`ExperimentConfig` the model was trained with (kept for export), or None.
    """

    def __init__(self, model: nn.Module, text_encoder, scheduler, codec, defaults=None, config=None):
        from fusedit.experiment import SampleConfig

        self.model = model.eval()
        self.text_encoder = text_encoder
        self.scheduler = scheduler
        self.codec = codec
        self.defaults = defaults or SampleConfig()
        self.config = config
        self._uncond_cache: dict[tuple[str, int], TextContext] = {}

    # ----------------------------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device=None, dtype=None) -> "FuseDiTPipeline":
        """Move the model (and, for ``device``, the text encoder and codec); clears the unconditional cache."""
        self.model.to(device=device, dtype=dtype)
        if device is not None:
            self.text_encoder.to(device)
            if hasattr(self.codec, "to"):
                self.codec.to(device=device)
        self._uncond_cache.clear()
        return self

    @property
    def patch_multiple(self) -> int:
        """Image sides must be multiples of this: patch size × the codec's spatial factor."""
        return self.model.patch_size * self.codec.spatial_factor

    @property
    def default_size(self) -> int:
        return self.model.resolved.config.sample_size * self.codec.spatial_factor

    # ----------------------------------------------------------------------------------------------------------------
    def check_inputs(self, prompts: Sequence[str], height: int, width: int, output_type: str, latents, steps: int):
        if len(prompts) == 0:
            raise ValueError("no prompt given: pass a string or a non-empty list of strings")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompt {i} is a {type(prompt).__name__}, expected a string")
            if not prompt.strip():
                raise ValueError(f"prompt {i} is empty; describe the image to generate (the empty string is the "
                                 f"unconditional prompt, used as negative_prompt)")
        multiple = self.patch_multiple
        if height <= 0 or width <= 0 or height % multiple or width % multiple:
            raise ValueError(f"height and width must be positive multiples of {multiple} (patch size "
                             f"{self.model.patch_size} × codec factor {self.codec.spatial_factor}); got {height}x{width}")
        config = self.model.resolved.config
        if not config.sincos_table_covers(max(height, width) // multiple):
            largest = config.pos_embed_max_size * multiple
            raise ValueError(f"{height}x{width} is larger than this model's sin-cos position table allows: at most "
                             f"{largest}x{largest} (model.pos_embed_max_size={config.pos_embed_max_size} patches of "
                             f"{multiple} px)")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type {output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")
        if steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {steps}")
        if latents is not None:
            f = self.codec.spatial_factor
            expected = (len(prompts), self.codec.channels, height // f, width // f)
            if tuple(latents.shape) != expected:
                raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {expected} "
                                 f"(prompts × images per prompt, channels, height/{f}, width/{f})")

    def encode_prompt(self, prompts: Sequence[str], max_sequence_length: Optional[int] = None) -> TextContext:
        """The text context of ``prompts`` (one LLM forward)."""
        return self.text_encoder.encode(list(prompts), max_length=max_sequence_length)

    def unconditional_context(self, negative_prompt: str, batch_size: int,
                              max_sequence_length: Optional[int] = None, cache: bool = True) -> TextContext:
        """The negative prompt's context repeated ``batch_size`` times; cached across calls when ``cache``."""
        key = (negative_prompt, max_sequence_length or -1)
        context = self._uncond_cache.get(key) if cache else None
        if context is None:
            context = self.encode_prompt([negative_prompt], max_sequence_length)
            if cache:
                self._uncond_cache[key] = context
        return context.repeat(batch_size)

    def prepare_latents(self, batch_size: int, height: int, width: int, generator, latents) -> torch.Tensor:
        """Initial noise ``(B, C, h, w)`` in float32 (``latents`` given: used as is)."""
        if latents is not None:
            return latents.to(device=self.device, dtype=torch.float32)
        f = self.codec.spatial_factor
        shape = (batch_size, self.codec.channels, height // f, width // f)
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)

    def velocity(self, latents: torch.Tensor, t: torch.Tensor, context: TextContext, guidance_scale: float,
                 cfg: bool) -> torch.Tensor:
        """Guided velocity at time ``t`` (scheduler timestep = σ·1000). ``context`` is ``[uncond ; cond]`` with CFG."""
        x = torch.cat([latents, latents]) if cfg else latents
        timestep = t.expand(x.shape[0]).to(self.device)
        v = self.model(x.to(self.dtype), timestep, context).float()
        if cfg:
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + guidance_scale * (v_cond - v_uncond)
        return v

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, Sequence[str]],
        negative_prompt: Union[str, Sequence[str], None] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        generator: Union[torch.Generator, list[torch.Generator], None] = None,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        max_sequence_length: Optional[int] = None,
        num_images_per_prompt: int = 1,
        use_text_cache: bool = True,
        progress: bool = False,
        guidance_interval: Optional[Sequence[float]] = None,
    ) -> PipelineOutput:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = None
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            negatives = list(negative_prompt)
            if len(negatives) != len(prompts) or not all(isinstance(n, str) for n in negatives):
                raise ValueError(f"negative_prompt must be a string or a list of {len(prompts)} strings (one per "
                                 f"prompt); got {negative_prompt!r}")
            negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
            negative_prompt = negatives[0] if len(set(negatives)) == 1 else None
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        height = height or self.default_size
        width = width or self.default_size
        steps = num_inference_steps or self.defaults.num_inference_steps
        guidance = self.defaults.guidance_scale if guidance_scale is None else guidance_scale
        negative = self.defaults.negative_prompt if negative_prompt is None else negative_prompt
        interval = self.defaults.guidance_interval if guidance_interval is None else guidance_interval
        self.check_inputs(prompts, height, width, output_type, latents, steps)
        if interval is not None:
            from fusedit.experiment import guidance_interval_problem

            problem = guidance_interval_problem(interval)
            if problem is not None:
                raise ValueError(f"guidance_interval: {problem}")
        cfg = guidance > 1.0

        def contexts() -> TextContext:
            cond = self.encode_prompt(prompts, max_sequence_length)
            if not cfg:
                return cond
            if negatives is not None and negative_prompt is None:  # different negative prompts per image
                uncond = self.encode_prompt(negatives, max_sequence_length)
            else:
                uncond = self.unconditional_context(negative, len(prompts), max_sequence_length,
                                                    cache=use_text_cache)
            return TextContext.cat([uncond, cond])

        context = contexts()
        num_truncated = context.num_truncated
        if num_truncated:
            logger.warning("%d prompt(s) were longer than the maximum text length and were truncated", num_truncated)
        self.scheduler.set_timesteps(steps, device=self.device)
        x = self.prepare_latents(len(prompts), height, width, generator, latents)
        timesteps = self.scheduler.timesteps
        iterator = timesteps
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(timesteps, desc="sampling", leave=False)
        conditional = None  # the conditional half of the CFG context, for steps outside the guidance interval
        for t in iterator:
            if not use_text_cache:
                context, conditional = contexts(), None
            sigma = float(t) / 1000.0
            if cfg and interval is not None and not interval[0] <= sigma <= interval[1]:
                if conditional is None:
                    conditional = context.select(slice(len(prompts), None))
                v = self.velocity(x, t, conditional, 1.0, cfg=False)
            else:
                v = self.velocity(x, t, context, guidance, cfg)
            x = self.scheduler.step(v, t, x, return_dict=False)[0]
        if output_type == "latent":
            return PipelineOutput(images=x, num_truncated=num_truncated)
        images = self.codec.decode(x)
        return PipelineOutput(images=postprocess(images, output_type), num_truncated=num_truncated)


def load_pipeline(path, *, device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None,
                  use_ema: bool = True) -> FuseDiTPipeline:
    """Load a pipeline from a training run directory, an exported pipeline folder or a reference (fuse-dit) folder.

    Args:
        path: run directory (``config.yaml`` + ``final/`` or ``checkpoints/``), folder written by
            :func:`fusedit.export.export_pipeline`, or a reference pipeline folder.
        device: defaults to CUDA when available, else CPU.
        dtype: model dtype (default: bfloat16 on CUDA, float32 on CPU).
        use_ema: load EMA weights when the run has them.
    """
    from fusedit.loading import load_pipeline_from_path

    return load_pipeline_from_path(path, device=device, dtype=dtype, use_ema=use_ema)
