"""Find and load what a path holds: a training run, an exported pipeline folder, or a reference folder."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from fusedit.train.errors import CheckpointError

EXPORT_MARKER = "fusedit"


def default_device(device=None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(str(path))
    except Exception as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({error}); the checkpoint is corrupt") from None


def run_weights_path(run_dir: Path, use_ema: bool) -> Path:
    """The weights file of a training run: ``final/`` if the run finished, else its latest checkpoint."""
    from fusedit.train.checkpoint import find_latest

    candidates = []
    final = run_dir / "final"
    if final.is_dir():
        candidates.append(final)
    else:
        latest = find_latest(run_dir)
        if latest is not None:
            candidates.append(latest)
    if not candidates:
        raise CheckpointError(f"{run_dir} has no final/ weights and no checkpoint under checkpoints/; "
                              f"train first (fusedit train CONFIG) or give the path of an exported pipeline")
    folder = candidates[0]
    from fusedit.dist.checkpoint import is_sharded_checkpoint

    if folder != final and is_sharded_checkpoint(folder):
        raise CheckpointError(f"{folder} is a sharded (torch.distributed.checkpoint) checkpoint of an unfinished "
                              f"ddp/fsdp run; sample from a finished run (its final/ holds full weights) or resume "
                              f"training to the end (fusedit train CONFIG --run-dir {run_dir})")
    if use_ema and (folder / "ema.safetensors").is_file():
        return folder / "ema.safetensors"
    return folder / "model.safetensors"


def load_model_weights(model: torch.nn.Module, text_encoder, weights: dict[str, torch.Tensor], source: str) -> None:
    """Load trained weights (the model's trainable parameters, plus ``llm.*`` when the LLM was trained)."""
    from fusedit.train.trainer import LLM_PREFIX, load_trainable_weights

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if any(k.startswith(LLM_PREFIX) for k in weights):
        params.update({LLM_PREFIX + n: p for n, p in text_encoder.named_parameters()
                       if LLM_PREFIX + n in weights})
    load_trainable_weights(params, weights, source=source)


def _is_export(path: Path) -> bool:
    index = path / "model_index.json"
    if not index.is_file():
        return False
    try:
        return EXPORT_MARKER in json.loads(index.read_text())
    except json.JSONDecodeError:
        return False


def load_pipeline_from_path(path, *, device=None, dtype: Optional[torch.dtype] = None, use_ema: bool = True):
    """See :func:`fusedit.pipeline.load_pipeline`."""
    from fusedit.reference.importer import is_reference_folder

    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist; expected a training run, an exported pipeline folder or a "
                                f"reference pipeline folder")
    device = default_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if is_reference_folder(root):
        return _load_reference(root, device, dtype)
    if _is_export(root):
        return _load_ours(root, root / "config.yaml", root / "transformer" / "model.safetensors", device, dtype,
                          relative_to=root)
    if (root / "config.yaml").is_file() or (root / "final").is_dir() or (root / "checkpoints").is_dir():
        config_path = root / "config.yaml"
        if not config_path.is_file():
            config_path = root / "final" / "config.yaml"
        return _load_ours(root, config_path, run_weights_path(root, use_ema), device, dtype, relative_to=None)
    raise ValueError(f"{root} is neither a training run (config.yaml, final/, checkpoints/), nor an exported pipeline "
                     f"(model_index.json with a '{EXPORT_MARKER}' entry), nor a reference pipeline folder")


def _load_ours(root: Path, config_path: Path, weights_path: Path, device, dtype, relative_to: Optional[Path]):
    from fusedit.builders import build_components, resolve_relative_paths
    from fusedit.experiment import load_experiment
    from fusedit.pipeline import FuseDiTPipeline, make_scheduler

    if not config_path.is_file():
        raise CheckpointError(f"{config_path} is missing; cannot rebuild the model of {root}")
    config = resolve_relative_paths(load_experiment(config_path), relative_to)
    parts = build_components(config, device=device)
    load_model_weights(parts.model, parts.text_encoder, _read_weights(weights_path), str(weights_path))
    parts.model.to(dtype=dtype)
    return FuseDiTPipeline(parts.model, parts.text_encoder, make_scheduler(config.sample.shift), parts.codec,
                           defaults=config.sample, config=config)


def _load_reference(root: Path, device, dtype):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fusedit.data.codec import load_codec
    from fusedit.experiment import SampleConfig
    from fusedit.pipeline import FuseDiTPipeline
    from fusedit.reference.importer import load_reference_folder
    from fusedit.text.encoder import TextEncoder

    ref = load_reference_folder(root, dtype=torch.float32)
    pooled = None
    if ref.text_config.pooled == "clip":
        from fusedit.text.pooled import load_clip_pooler

        pooled = load_clip_pooler(ref.text_config.clip_model, device=device)
    text_encoder = TextEncoder(ref.decoder.to(device=device, dtype=dtype), ref.tokenizer, ref.text_config,
                               ref.model.text_requirements(), pooled_encoder=pooled)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(ref.scheduler_path))
    codec = load_codec(str(ref.vae_path), device=device) if ref.vae_path is not None else None
    defaults = SampleConfig(num_inference_steps=25, guidance_scale=6.0, negative_prompt="",
                            shift=float(scheduler.config.shift))
    return FuseDiTPipeline(ref.model.to(device=device, dtype=dtype), text_encoder, scheduler, codec, defaults=defaults)
