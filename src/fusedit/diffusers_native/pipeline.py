"""fusedit's pipeline as a diffusers ``DiffusionPipeline``: :class:`FuseDiTPipeline`.

Components (each a folder of a saved pipeline, loaded by ``DiffusionPipeline.from_pretrained``):

* ``transformer``: :class:`~fusedit.diffusers_native.transformer.FuseDiTTransformer2DModel` (deep or shallow fusion);
* ``scheduler``: ``FlowMatchEulerDiscreteScheduler``;
* ``text_encoder``: the frozen Hugging Face decoder (e.g. ``Gemma2Model``) whose per-layer keys/values the DiT reads,
  saved with ``save_pretrained`` (only the layers the model reads; its config patched for the reference's attention
  when ``text_config.attention`` is ``reference``), and ``tokenizer``;
* ``vae``: a diffusers autoencoder, or none for a pixel-space model;
* ``text_encoder_2`` / ``tokenizer_2``: the CLIP text model of ``text.pooled: clip``, or none.

Beside them ``model_index.json`` holds ``text_config``, ``sample_defaults`` and ``run_config``
(:mod:`fusedit.diffusers_native.components`). The sampling itself is fusedit's
(:class:`fusedit.sampling.pipeline.FuseDiTPipeline`'s request, checks and text conditioning,
:func:`fusedit.sampling.denoise.denoise`), so this class gives the same numbers as ``fusedit.load_pipeline`` did
before it existed. What diffusers users expect works: ``num_images_per_prompt``, lists of generators,
``callback_on_step_end``, ``set_progress_bar_config``, ``enable_model_cpu_offload``, ``output_type``,
``return_dict``.

diffusers finds this class by name in its own namespace, so ``import fusedit.diffusers_native`` (or any of
``fusedit.load_pipeline``, ``from fusedit import FuseDiTPipeline``) must run before
``DiffusionPipeline.from_pretrained``; no remote code is involved.
"""

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import PreTrainedModel

from fusedit.config import to_dict
from fusedit.data.codec import PixelCodec, VAECodec
from fusedit.diffusers_native.components import (
    align_cpu_tensors,
    experiment_of,
    match_config_to_layers,
    prepare_tokenizer,
    read_sample_defaults,
    read_text_config,
)
from fusedit.diffusers_native.lora import FuseDiTLoraLoaderMixin
from fusedit.diffusers_native.transformer import FuseDiTTransformer2DModel
from fusedit.experiment import ExperimentConfig, SampleConfig
from fusedit.progress import track
from fusedit.sampling.denoise import denoise
from fusedit.sampling.inputs import optional_positive_int
from fusedit.sampling.pipeline import FuseDiTPipeline as Sampler
from fusedit.sampling.pipeline import postprocess
from fusedit.text.context import TextContext
from fusedit.text.encoder import TextEncoder
from fusedit.text.expansion import PromptExpander
from fusedit.text.llm import extract_decoder
from fusedit.text.pooled import CLIPPooler

logger = logging.getLogger(__name__)

StepCallback = Callable[..., dict[str, Any]] | PipelineCallback | MultiPipelineCallbacks


@dataclasses.dataclass
class FuseDiTPipelineOutput(BaseOutput):
    """``images``: PIL images, a ``(B, H, W, 3)`` array or a ``(B, 3, H, W)`` tensor in [0, 1], or latents
    ``(B, C, h, w)`` (``output_type="latent"``); ``num_truncated``: prompts cut at the maximum text length."""

    images: Any
    num_truncated: int = 0


class FuseDiTPipeline(DiffusionPipeline, FuseDiTLoraLoaderMixin):
    """Text-to-image sampling with a fusedit model (deep fusion or a shallow baseline); see the module docstring.

    Besides the components, ``pipe.model`` (the transformer), ``pipe.context_encoder`` (the
    :class:`~fusedit.text.encoder.TextEncoder` over ``text_encoder`` and ``tokenizer``), ``pipe.codec``,
    ``pipe.defaults`` (:class:`~fusedit.experiment.SampleConfig`) and ``pipe.experiment`` (the run's
    :class:`~fusedit.experiment.ExperimentConfig`, None for a converted reference folder) are fusedit's views.
    LoRA adapters load as in diffusers (``load_lora_weights``, ``set_adapters``, ``fuse_lora``,
    ``unload_lora_weights``; :class:`~fusedit.diffusers_native.lora.FuseDiTLoraLoaderMixin`).
    """

    transformer: FuseDiTTransformer2DModel
    scheduler: FlowMatchEulerDiscreteScheduler
    text_encoder: PreTrainedModel
    tokenizer: Any
    vae: ModelMixin | None
    text_encoder_2: PreTrainedModel | None
    tokenizer_2: Any

    model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer->vae"  # type: ignore[assignment]
    _optional_components = ["vae", "text_encoder_2", "tokenizer_2"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        transformer: FuseDiTTransformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        text_encoder: PreTrainedModel,
        tokenizer: Any,
        vae: ModelMixin | None = None,
        text_encoder_2: PreTrainedModel | None = None,
        tokenizer_2: Any = None,
        text_config: dict | None = None,
        sample_defaults: dict | None = None,
        run_config: dict | None = None,
    ):
        super().__init__()
        self.register_modules(
            transformer=transformer,
            scheduler=scheduler,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            vae=vae,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
        )
        for component in (transformer, text_encoder, vae, text_encoder_2):
            align_cpu_tensors(component)  # bit-identical samples from memory-mapped weights (see its docstring)
        text, defaults = read_text_config(text_config), read_sample_defaults(sample_defaults)
        self.register_to_config(text_config=to_dict(text), sample_defaults=to_dict(defaults), run_config=run_config)
        self._guidance_scale, self._num_timesteps, self._interrupt = defaults.guidance_scale, 0, False
        #: the run's own ExperimentConfig when the pipeline was made from it (local paths kept); else rebuilt
        self.source_experiment: ExperimentConfig | None = None
        #: ``text.expansion``: the LLM with its output head that continues every prompt (:mod:`fusedit.text.expansion`);
        #: set by :func:`~fusedit.diffusers_native.convert.pipeline_from_parts` from a run's text encoder (a saved
        #: pipeline keeps only the layers the transformer reads, so it cannot expand prompts itself)
        self.prompt_expander: PromptExpander | None = None
        self._sampler = self._build_sampler()

    def _build_sampler(self) -> Sampler:
        """fusedit's sampler over the current components (rebuilt when the text components change)."""
        text = read_text_config(self.config["text_config"])
        defaults = read_sample_defaults(self.config["sample_defaults"])
        decoder = extract_decoder(self.text_encoder)
        pooled = None
        if self.text_encoder_2 is not None:
            pooled = CLIPPooler(self.text_encoder_2, self.tokenizer_2)
        encoder = TextEncoder(
            decoder,
            prepare_tokenizer(self.tokenizer, text.padding_side),
            dataclasses.replace(text, trainable=False),
            self.transformer.text_requirements(),
            pooled_encoder=pooled,
            expander=self.prompt_expander,
        )
        match_config_to_layers(decoder)  # the encoder may have dropped layers the model never reads
        codec = VAECodec(self.vae) if self.vae is not None else PixelCodec()
        experiment = experiment_of(self.config["run_config"], self.transformer.model_config, text, defaults)
        return Sampler(self.transformer, encoder, self.scheduler, codec, defaults=defaults, config=experiment)

    def _current_sampler(self) -> Sampler:
        sampler = self._sampler
        if (
            sampler.text_encoder.decoder is not extract_decoder(self.text_encoder)
            or sampler.model is not self.transformer
            or getattr(sampler.text_encoder.formatter, "expander", None) is not self.prompt_expander
        ):
            sampler = self._sampler = self._build_sampler()
        if sampler.text_encoder.config.expansion != "none" and self.prompt_expander is None:
            raise ValueError(
                "this pipeline's text config asks for prompt expansion (text.expansion), which needs the whole LLM "
                "with its output head; a saved pipeline holds only the layers the transformer reads. Sample from the "
                "training run directory instead (fusedit sample RUN ...)"
            )
        sampler.scheduler = self.scheduler
        return sampler

    # fusedit's views --------------------------------------------------------------------------------------------------
    @property
    def model(self) -> FuseDiTTransformer2DModel:
        """The transformer (fusedit's name for it)."""
        return self.transformer

    @property
    def context_encoder(self) -> TextEncoder:
        """prompts -> :class:`~fusedit.text.context.TextContext` (one LLM forward)."""
        return self._current_sampler().text_encoder

    @property
    def codec(self) -> Any:
        """``decode(latents) -> images in [-1, 1]``: the VAE's, or the identity of a pixel-space model."""
        return self._current_sampler().codec

    @property
    def defaults(self) -> SampleConfig:
        """The model's sampling defaults (steps, CFG, negative prompt, guidance interval)."""
        return self._current_sampler().defaults

    @property
    def experiment(self) -> ExperimentConfig | None:
        """The :class:`ExperimentConfig` of the run the model comes from (None for a converted reference folder): the
        run's own when loaded from the run, else rebuilt from the folder (paths naming its components)."""
        return self.source_experiment or self._current_sampler().config

    @property
    def default_size(self) -> int:
        """The image side used when none is given (the model's ``sample_size`` × the codec's factor)."""
        return self._current_sampler().default_size

    @property
    def patch_multiple(self) -> int:
        """Image sides must be multiples of this (patch size × the codec's spatial factor)."""
        return self._current_sampler().patch_multiple

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` (e.g. from ``callback_on_step_end``) to stop after the current step."""
        return self._interrupt

    def encode_prompt(self, prompts: Sequence[str], max_sequence_length: int | None = None) -> TextContext:
        """The text context of ``prompts`` (one LLM forward)."""
        return self._current_sampler().encode_prompt(prompts, max_sequence_length)

    def unconditional_context(
        self, negative_prompt: str, batch_size: int, max_sequence_length: int | None = None
    ) -> TextContext:
        """The negative prompt's context repeated ``batch_size`` times (cached across calls)."""
        return self._current_sampler().unconditional_context(negative_prompt, batch_size, max_sequence_length)

    def _adapters_changed(self) -> None:
        """LoRA adapters were loaded, weighted, fused or removed: cached text contexts are stale."""
        self._current_sampler()._uncond_cache.clear()

    def to(self, *args: Any, **kwargs: Any) -> "FuseDiTPipeline":
        """diffusers' ``to`` (device and/or dtype of every component); clears the cached unconditional context."""
        super().to(*args, **kwargs)
        self._current_sampler()._uncond_cache.clear()
        return self

    # sampling ------------------------------------------------------------------------------------------------------
    def prepare_latents(
        self, batch_size: int, height: int, width: int, generator: Any, latents: torch.Tensor | None
    ) -> torch.Tensor:
        """Initial noise ``(B, C, h, w)`` in float32 on the execution device (``latents`` given: used as is)."""
        device = self._execution_device
        if latents is not None:
            return latents.to(device=device, dtype=torch.float32)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"got a list of {len(generator)} generators for {batch_size} images (prompts × "
                f"num_images_per_prompt); pass one generator, or one per image"
            )
        codec = self.codec
        f = codec.spatial_factor
        shape = (batch_size, codec.channels, height // f, width // f)
        return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)

    def _steps(self, progress: bool | None, total: int) -> Callable[[Iterable[torch.Tensor]], Iterator[torch.Tensor]]:
        """Wrap the timesteps: the progress bar (``None``: diffusers' bar, as ``set_progress_bar_config`` says;
        ``True``: fusedit's; ``False``: none), ending early once :attr:`interrupt` is set."""

        def steps(timesteps: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
            bar = self.progress_bar(total=total) if progress is None else None
            iterable = track(timesteps, total, desc="sampling", unit="step") if progress else timesteps
            try:
                for t in iterable:
                    if self.interrupt:
                        break
                    yield t
                    if bar is not None:
                        bar.update()
            finally:
                if bar is not None:
                    bar.close()

        return steps

    def _on_step_end(
        self, callback: StepCallback | None, tensor_inputs: Sequence[str]
    ) -> Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None:
        """diffusers' ``callback_on_step_end(pipe, i, t, {name: tensor}) -> {name: tensor}`` as the loop's hook."""
        if callback is None:
            return None
        if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            tensor_inputs = callback.tensor_inputs
        unknown = [name for name in tensor_inputs if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs: {unknown} are not among {self._callback_tensor_inputs}"
            )

        def on_step_end(i: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
            values = {"latents": latents}
            outputs = callback(self, i, t, {name: values[name] for name in tensor_inputs}) or {}
            return outputs.pop("latents", latents)

        return on_step_end

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: StepCallback | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        max_sequence_length: int | None = None,
        use_text_cache: bool = True,
        guidance_interval: Sequence[float] | None = None,
        progress: bool | None = None,
    ) -> Any:  # FuseDiTPipelineOutput, or a tuple with return_dict=False
        """Sample images for ``prompt`` (a string or a list); unset settings come from :attr:`defaults`.

        fusedit's additions: ``max_sequence_length`` (prompt tokens), ``use_text_cache=False`` (the reference's
        formulation: the LLM inside every step; same numbers), ``guidance_interval`` (``[σ_low, σ_high]``: CFG only
        there), ``progress`` (see :meth:`_steps`). Returns :class:`FuseDiTPipelineOutput`, or ``(images,)`` with
        ``return_dict=False``.
        """
        sampler = self._current_sampler()  # its request and checks refuse bad arguments (fusedit.sampling.inputs)
        request = sampler._request(
            prompt,
            negative_prompt,
            height,
            width,
            num_inference_steps,
            guidance_scale,
            guidance_interval,
            num_images_per_prompt,
        )
        sampler.check_inputs(request.prompts, request.height, request.width, output_type, latents, request.steps)
        optional_positive_int(max_sequence_length, "max_sequence_length")
        on_step_end = self._on_step_end(callback_on_step_end, callback_on_step_end_tensor_inputs)
        self._guidance_scale, self._num_timesteps, self._interrupt = request.guidance, request.steps, False
        velocity, num_truncated = sampler.text_conditioning(request, max_sequence_length, use_text_cache)
        if num_truncated:
            logger.warning("%d prompt(s) were longer than the maximum text length and were truncated", num_truncated)
        x = self.prepare_latents(len(request.prompts), request.height, request.width, generator, latents)
        steps = self._steps(progress, request.steps)
        x = denoise(velocity, x, self.scheduler, request.steps, request.guidance, request.interval, steps, on_step_end)
        images = x if output_type == "latent" else postprocess(sampler.codec.decode(x), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return FuseDiTPipelineOutput(images=images, num_truncated=num_truncated)
