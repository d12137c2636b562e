"""Find and load what a path holds: a training run, an exported pipeline folder (diffusers' format, or the older
fusedit layout with ``config.yaml``), or a reference folder; each becomes the same diffusers pipeline class,
:class:`~fusedit.diffusers_native.pipeline.FuseDiTPipeline` (the reference importer and the run loader are its
converters)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from fusedit.builders import build_components, default_device, resolve_relative_paths
from fusedit.checkpoint.errors import CheckpointError
from fusedit.checkpoint.verify import check_finite_parameters
from fusedit.checkpoint.weights import FINAL_DIR, RunWeights, find_run_weights, load_model_weights
from fusedit.data.codec import load_codec
from fusedit.diffusers_native.convert import is_diffusers_folder, load_diffusers_folder, pipeline_from_parts
from fusedit.diffusers_native.lora import lora_state_of
from fusedit.diffusers_native.pipeline import FuseDiTPipeline
from fusedit.experiment import SampleConfig, load_experiment
from fusedit.finetune.init import load_init_weights
from fusedit.finetune.setup import adapter_name_of, adapter_parts
from fusedit.reference.importer import is_reference_folder, load_reference_folder
from fusedit.sampling.pipeline import make_scheduler
from fusedit.text.encoder import TextEncoder
from fusedit.text.pooled import load_clip_pooler

#: The key of an exported folder's ``model_index.json`` that marks it as fusedit's.
EXPORT_MARKER = "fusedit"


def _is_export(path: Path) -> bool:
    index = path / "model_index.json"
    if not index.is_file():
        return False
    try:
        return EXPORT_MARKER in json.loads(index.read_text())
    except json.JSONDecodeError:
        return False


def load_pipeline(
    path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    use_ema: bool = True,
) -> FuseDiTPipeline:
    """Load a pipeline from a training run directory, an exported pipeline folder or a reference (fuse-dit) folder.

    Args:
        path: run directory (``config.yaml`` + ``final/`` or ``checkpoints/``; the latest checkpoint of an
            unfinished run, single-process or sharded, is read), folder written by
            :func:`fusedit.sampling.export.export_pipeline` (or ``FuseDiTPipeline.save_pretrained``), or a
            reference pipeline folder.
        device: defaults to CUDA when available, else CPU.
        dtype: model dtype (default: bfloat16 on CUDA, float32 on CPU).
        use_ema: load EMA weights when the run has them.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(
            f"{root} does not exist; expected a training run, an exported pipeline folder or a "
            f"reference pipeline folder"
        )
    device = default_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipe = _load_any(root, device, dtype, use_ema)
    # every format: a corrupt weight file that still parsed must not sample black images
    check_finite_parameters(pipe.transformer.named_parameters(), f"{root} (transformer weights)")
    return pipe


def _load_any(root: Path, device: torch.device, dtype: torch.dtype, use_ema: bool) -> FuseDiTPipeline:
    if is_reference_folder(root):
        return _load_reference(root, device, dtype)
    if is_diffusers_folder(root):
        return _quiet(load_diffusers_folder(root, device, dtype))
    if _is_export(root):
        weights = RunWeights(root / "transformer", ema=False, sharded=False)
        return _load_ours(root, root / "config.yaml", weights, device, dtype, relative_to=root)
    if (root / "config.yaml").is_file() or (root / FINAL_DIR).is_dir() or (root / "checkpoints").is_dir():
        config_path = root / "config.yaml"
        if not config_path.is_file():
            config_path = root / FINAL_DIR / "config.yaml"
        return _load_ours(root, config_path, find_run_weights(root, use_ema), device, dtype, relative_to=None)
    raise ValueError(
        f"{root} is neither a training run (config.yaml, final/, checkpoints/), nor an exported pipeline "
        f"(model_index.json with a '{EXPORT_MARKER}' entry), nor a reference pipeline folder"
    )


def _load_ours(
    root: Path,
    config_path: Path,
    weights: RunWeights,
    device: torch.device,
    dtype: torch.dtype,
    relative_to: Path | None,
) -> FuseDiTPipeline:
    if not config_path.is_file():
        raise CheckpointError(f"{config_path} is missing; cannot rebuild the model of {root}")
    config = resolve_relative_paths(load_experiment(config_path), relative_to)
    parts = build_components(config, device=device)
    lora = config.finetune.lora
    if lora is None:
        load_model_weights(parts.model, parts.text_encoder, weights.read(), weights.source)
    else:  # a LoRA run: the base it adapted, then its adapters (named after the run)
        load_init_weights(parts.model, str(config.finetune.init_from))
    parts.model.to(dtype=dtype)
    scheduler = make_scheduler(config.sample.shift)
    pipe = pipeline_from_parts(parts.model, parts.text_encoder, scheduler, parts.codec, config.sample, config)
    if lora is not None:
        state, metadata = lora_state_of(*adapter_parts(weights.read(), lora))
        pipe.load_lora_weights(state, adapter_name=adapter_name_of(config.name), metadata=metadata)
    return _quiet(pipe)


def _load_reference(root: Path, device: torch.device, dtype: torch.dtype) -> FuseDiTPipeline:
    ref = load_reference_folder(root, dtype=torch.float32)
    pooled = None
    if ref.text_config.pooled == "clip" and ref.text_config.clip_model is not None:
        pooled = load_clip_pooler(ref.text_config.clip_model, device=device)
    text_encoder = TextEncoder(
        ref.decoder.to(device=device, dtype=dtype),
        ref.tokenizer,
        ref.text_config,
        ref.model.text_requirements(),
        pooled_encoder=pooled,
    )
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(ref.scheduler_path))
    codec = load_codec(str(ref.vae_path), device=device) if ref.vae_path is not None else None
    defaults = SampleConfig(
        num_inference_steps=25, guidance_scale=6.0, negative_prompt="", shift=float(scheduler.config.shift)
    )
    model = ref.model.to(device=device, dtype=dtype)
    return _quiet(pipeline_from_parts(model, text_encoder, scheduler, codec, defaults))


def _quiet(pipe: FuseDiTPipeline) -> FuseDiTPipeline:
    """No per-call progress bar by default (fusedit's commands sample many batches); ``pipe(..., progress=True)`` or
    ``pipe.set_progress_bar_config(disable=False)`` shows one."""
    pipe.set_progress_bar_config(disable=True)
    return pipe
