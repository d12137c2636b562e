"""Adapter folders in peft's format, written alone (without the base model) and read back.

::

    adapter/
        adapter_config.json          peft's LoraConfig of the DiT's adapters (rank, alpha, dropout, target modules)
        adapter_model.safetensors    base_model.model.<module>.lora_A.weight (r, in) / .lora_B.weight (out, r)
        text_encoder/                the LLM's adapters, the same two files (only with finetune.lora.llm_target_modules)

``peft.PeftModel.from_pretrained(dit, "adapter")`` reads the DiT's part as any peft adapter; the pipeline reads the
whole folder with ``pipe.load_lora_weights("adapter", adapter_name=...)``
(:class:`fusedit.diffusers_native.lora.FuseDiTLoraLoaderMixin`). A training run writes one into every checkpoint
(``checkpoints/step-N/adapter/``) and into ``final/adapter/`` (plus ``adapter_ema/`` from the EMA weights when EMA
is on); the tensors are those of the checkpoint's ``model.safetensors`` (``ema.safetensors``), renamed.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fusedit.atomic import fsync_tree, replace_dir
from fusedit.checkpoint.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: Subfolder of an adapter folder that holds the LLM's adapters.
TEXT_ENCODER_DIR = "text_encoder"


@dataclass
class AdapterPart:
    """One model's adapters: peft-named weights and peft's ``LoraConfig`` as a JSON-ready mapping."""

    weights: dict[str, torch.Tensor]
    config: dict[str, Any]


def lora_config_dict(config: Any) -> dict[str, Any]:
    """A peft ``LoraConfig`` as the mapping ``adapter_config.json`` holds (sets are written as sorted lists)."""
    data = config.to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in data.items()}


def _write_part(folder: Path, part: AdapterPart) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in part.weights.items()}
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(part.config, indent=2, sort_keys=True) + "\n")


def save_adapter(folder: str | Path, dit: AdapterPart, llm: AdapterPart | None = None) -> Path:
    """Write an adapter folder atomically (a temporary sibling renamed into place; an existing one is replaced)."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    _write_part(tmp, dit)
    if llm is not None:
        _write_part(tmp / TEXT_ENCODER_DIR, llm)
    fsync_tree(tmp)
    replace_dir(tmp, folder)
    return folder


def is_adapter_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder with peft's adapter files."""
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and (path / ADAPTER_WEIGHTS).is_file()


def _read_part(folder: Path) -> AdapterPart:
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
        weights = load_file(str(folder / ADAPTER_WEIGHTS))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{folder}: unreadable adapter ({error})") from None
    if not isinstance(config, dict) or config.get("peft_type") not in (None, "LORA"):
        raise CheckpointError(f"{folder / ADAPTER_CONFIG}: not a LoRA adapter config")
    return AdapterPart(weights, config)


def read_adapter(path: str | Path) -> tuple[AdapterPart, AdapterPart | None]:
    """The DiT's and (when present) the LLM's adapters of an adapter folder."""
    path = Path(path)
    if not is_adapter_folder(path):
        raise CheckpointError(
            f"{path} is not an adapter folder: expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (peft's format, as "
            f"fusedit writes into a LoRA run's final/adapter and checkpoints/step-N/adapter)"
        )
    text = path / TEXT_ENCODER_DIR
    return _read_part(path), (_read_part(text) if is_adapter_folder(text) else None)


#: The peft ``LoraConfig`` fields diffusers passes on when it builds an adapter from saved metadata.
LORA_CONFIG_KEYS = ("r", "lora_alpha", "lora_dropout", "target_modules", "rank_pattern", "alpha_pattern", "bias")


def lora_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """The ``LoraConfig`` keyword arguments of an ``adapter_config.json`` mapping (diffusers' adapter metadata)."""
    return {k: config[k] for k in LORA_CONFIG_KEYS if k in config and config[k] is not None}
