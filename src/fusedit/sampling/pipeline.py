"""Sampling with diffusers' conventions: Euler on the flow-match schedule, CFG as one batch, cached text context.

``pipe(prompt, negative_prompt=None, height=, width=, num_inference_steps=, guidance_scale=, generator=, latents=,
output_type="pil"|"np"|"pt"|"latent", max_sequence_length=)`` returns a :class:`PipelineOutput` with ``.images``.

The text context of the prompts is computed once per call and reused at every step; the unconditional context is
cached across calls (keyed by negative prompt and length). ``use_text_cache=False`` keeps no text context at all:
every step runs the LLM inside the DiT over ``[text ; image]``, the reference's formulation
(:class:`~fusedit.sampling.text.JointText`) — a different computation that gives the same numbers (tested).
The loop, guidance and guidance interval are :func:`fusedit.sampling.denoise.denoise`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torch import nn

from fusedit.experiment import SampleConfig, guidance_interval_problem
from fusedit.sampling import inputs
from fusedit.sampling.denoise import VelocityFn, denoise
from fusedit.sampling.text import CachedText, JointText
from fusedit.text.context import TextContext

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class PipelineOutput:
    """``images``: list of PIL images, ``(B, H, W, 3)`` float array in [0, 1], ``(B, 3, H, W)`` tensor in [0, 1], or
    latents ``(B, C, h, w)``; ``num_truncated``: prompts cut at the maximum length."""

    images: Any
    num_truncated: int = 0


def make_scheduler(shift: float = 3.0) -> FlowMatchEulerDiscreteScheduler:
    """diffusers' ``FlowMatchEulerDiscreteScheduler`` with SD3's settings and the given shift."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def postprocess(images: torch.Tensor, output_type: str) -> Any:
    """``images`` ``(B, 3, H, W)`` in [-1, 1] -> the requested output type (values in [0, 1])."""
    images = (images.float() / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images
    array = images.permute(0, 2, 3, 1).cpu().numpy()
    if output_type == "np":
        return array
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]


@dataclass
class _Request:
    """One call's prompts and settings, defaults filled in."""

    prompts: list[str]
    negatives: list[str] | None  # one per image, or None: ``negative`` for every image
    negative: str
    height: int
    width: int
    steps: int
    guidance: float
    interval: Sequence[float] | None


class FuseDiTPipeline:
    """A trained model + its text encoder + a scheduler + a codec (pixels or a VAE).

    Args:
        model: ``forward(x, timestep = σ·1000, context) -> velocity``.
        text_encoder: :class:`fusedit.text.encoder.TextEncoder` built for this model's requirements.
        scheduler: a diffusers ``FlowMatchEulerDiscreteScheduler``.
        codec: ``decode(latents) -> images in [-1, 1]``, ``channels``, ``spatial_factor``.
        defaults: :class:`fusedit.experiment.SampleConfig` (steps, CFG, negative prompt) or None.
        config: the :class:`ExperimentConfig` the model was trained with (kept for export), or None.
    """

    def __init__(
        self,
        model: nn.Module,
        text_encoder: Any,
        scheduler: Any,
        codec: Any,
        defaults: SampleConfig | None = None,
        config: Any = None,
    ) -> None:
        self.model: Any = model.eval()
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

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> FuseDiTPipeline:
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
    def check_inputs(
        self,
        prompts: Sequence[str],
        height: int,
        width: int,
        output_type: str,
        latents: torch.Tensor | None,
        steps: int,
    ) -> None:
        """Raise ``ValueError``/``TypeError`` naming the problem for bad prompts, sizes, output types or latents."""
        prompts = inputs.prompt_list(prompts)
        height, width = inputs.positive_int(height, "height"), inputs.positive_int(width, "width")
        for i, prompt in enumerate(prompts):
            if not prompt.strip():
                raise ValueError(
                    f"prompt {i} is empty; describe the image to generate (the empty string is the "
                    f"unconditional prompt, used as negative_prompt)"
                )
        multiple = self.patch_multiple
        if height <= 0 or width <= 0 or height % multiple or width % multiple:
            raise ValueError(
                f"height and width must be positive multiples of {multiple} (patch size "
                f"{self.model.patch_size} × codec factor {self.codec.spatial_factor}); got {height}x{width}"
            )
        config = self.model.resolved.config
        if not config.sincos_table_covers(max(height, width) // multiple):
            largest = config.pos_embed_max_size * multiple
            raise ValueError(
                f"{height}x{width} is larger than this model's sin-cos position table allows: at most "
                f"{largest}x{largest} (model.pos_embed_max_size={config.pos_embed_max_size} patches of "
                f"{multiple} px)"
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type {output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")
        inputs.positive_int(steps, "num_inference_steps")
        if latents is not None:
            f = self.codec.spatial_factor
            expected = (len(prompts), self.codec.channels, height // f, width // f)
            if tuple(latents.shape) != expected:
                raise ValueError(
                    f"latents have shape {tuple(latents.shape)}, expected {expected} "
                    f"(prompts × images per prompt, channels, height/{f}, width/{f})"
                )

    def encode_prompt(self, prompts: Sequence[str], max_sequence_length: int | None = None) -> TextContext:
        """The text context of ``prompts`` (one LLM forward)."""
        return self.text_encoder.encode(list(prompts), max_length=max_sequence_length)

    def unconditional_context(
        self, negative_prompt: str, batch_size: int, max_sequence_length: int | None = None
    ) -> TextContext:
        """The negative prompt's context repeated ``batch_size`` times; cached across calls."""
        key = (negative_prompt, max_sequence_length or -1)
        context = self._uncond_cache.get(key)
        if context is None:
            context = self._uncond_cache[key] = self.encode_prompt([negative_prompt], max_sequence_length)
        return context.repeat(batch_size)

    def prepare_latents(
        self, batch_size: int, height: int, width: int, generator: Any, latents: torch.Tensor | None
    ) -> torch.Tensor:
        """Initial noise ``(B, C, h, w)`` in float32 (``latents`` given: used as is)."""
        if latents is not None:
            return latents.to(device=self.device, dtype=torch.float32)
        f = self.codec.spatial_factor
        shape = (batch_size, self.codec.channels, height // f, width // f)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)

    def text_conditioning(
        self, request: _Request, max_sequence_length: int | None, use_text_cache: bool
    ) -> tuple[VelocityFn, int]:
        """The velocity function of the request's steps and the number of truncated prompts."""
        guided = request.guidance > 1.0
        negatives = request.negatives or [request.negative] * len(request.prompts)
        if not use_text_cache:
            joint = JointText.for_prompts(
                self.model, self.text_encoder, request.prompts, negatives if guided else None, max_sequence_length
            )
            return joint, joint.num_truncated
        cond = self.encode_prompt(request.prompts, max_sequence_length)
        if not guided:
            return CachedText(self.model, cond), cond.num_truncated
        if request.negatives is not None:  # different negative prompts per image
            uncond = self.encode_prompt(request.negatives, max_sequence_length)
        else:
            uncond = self.unconditional_context(request.negative, len(request.prompts), max_sequence_length)
        both = TextContext.cat([uncond, cond])
        return CachedText(self.model, cond, both), both.num_truncated

    def _request(
        self,
        prompt: str | Sequence[str] | None,
        negative_prompt: str | Sequence[str] | None,
        height: int | None,
        width: int | None,
        steps: int | None,
        guidance_scale: float | None,
        guidance_interval: Sequence[float] | None,
        num_images_per_prompt: int,
    ) -> _Request:
        prompts = inputs.prompt_list(prompt)
        height, width = inputs.optional_positive_int(height, "height"), inputs.optional_positive_int(width, "width")
        steps = inputs.optional_positive_int(steps, "num_inference_steps")
        num_images_per_prompt = inputs.positive_int(num_images_per_prompt, "num_images_per_prompt")
        if guidance_scale is not None:
            guidance_scale = inputs.guidance_scale(guidance_scale)
        negatives = None
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            negatives = list(negative_prompt)
            if len(negatives) != len(prompts) or not all(isinstance(n, str) for n in negatives):
                raise ValueError(
                    f"negative_prompt must be a string or a list of {len(prompts)} strings (one per "
                    f"prompt); got {negative_prompt!r}"
                )
            negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
            negative_prompt = negatives[0] if len(set(negatives)) == 1 else None
            if negative_prompt is not None:
                negatives = None
        d = self.defaults
        interval = d.guidance_interval if guidance_interval is None else guidance_interval
        if interval is not None and (problem := guidance_interval_problem(interval)) is not None:
            raise ValueError(f"guidance_interval: {problem}")
        return _Request(
            prompts=[p for p in prompts for _ in range(num_images_per_prompt)],
            negatives=negatives,
            negative=d.negative_prompt if negative_prompt is None else negative_prompt,
            height=self.default_size if height is None else height,
            width=self.default_size if width is None else width,
            steps=d.num_inference_steps if steps is None else steps,
            guidance=d.guidance_scale if guidance_scale is None else guidance_scale,
            interval=interval,
        )

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        max_sequence_length: int | None = None,
        num_images_per_prompt: int = 1,
        use_text_cache: bool = True,
        progress: bool = False,
        guidance_interval: Sequence[float] | None = None,
    ) -> PipelineOutput:
        request = self._request(
            prompt,
            negative_prompt,
            height,
            width,
            num_inference_steps,
            guidance_scale,
            guidance_interval,
            num_images_per_prompt,
        )
        self.check_inputs(request.prompts, request.height, request.width, output_type, latents, request.steps)
        inputs.optional_positive_int(max_sequence_length, "max_sequence_length")
        velocity, num_truncated = self.text_conditioning(request, max_sequence_length, use_text_cache)
        if num_truncated:
            logger.warning("%d prompt(s) were longer than the maximum text length and were truncated", num_truncated)
        x = self.prepare_latents(len(request.prompts), request.height, request.width, generator, latents)
        x = denoise(velocity, x, self.scheduler, request.steps, request.guidance, request.interval, progress)
        if output_type == "latent":
            return PipelineOutput(images=x, num_truncated=num_truncated)
        return PipelineOutput(images=postprocess(self.codec.decode(x), output_type), num_truncated=num_truncated)
