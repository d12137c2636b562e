"""What a run's ``finetune:`` section does to its freshly built parts, in training and when the run is loaded.

* :func:`apply_finetune`: the starting DiT weights (``init_from``), then the LoRA adapters (DiT, optionally LLM);
  used by ``fusedit train`` before the trainer is built.
* :class:`AdapterWriter`: after each checkpoint and ``final/`` is written, the adapters alone in peft's format
  (``adapter/``, and ``adapter_ema/`` from the EMA weights) beside the run's own files.
* :func:`adapter_parts`: a LoRA run's trained weights (as the trainer names them) as adapter parts, which the
  pipeline loads with ``load_lora_weights`` (:func:`fusedit.sampling.loading.load_pipeline` of a LoRA run).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fusedit.checkpoint.layout import read_state
from fusedit.checkpoint.sharded import is_sharded_checkpoint
from fusedit.checkpoint.single import EMA_FILE
from fusedit.checkpoint.weights import LLM_PREFIX, RunWeights
from fusedit.finetune.adapters import AdapterPart, lora_config_dict, save_adapter
from fusedit.finetune.config import FinetuneConfig, LoRAConfig
from fusedit.finetune.init import load_init_weights
from fusedit.finetune.lora import count_parameters, inject_dit_lora, inject_llm_lora, peft_config, to_peft_keys

logger = logging.getLogger(__name__)

#: Prefix of the LLM adapters' names among a run's trained weights (``llm.`` + the TextEncoder's ``decoder.``).
LLM_ADAPTER_PREFIX = LLM_PREFIX + "decoder."
ADAPTER_DIR = "adapter"
ADAPTER_EMA_DIR = "adapter_ema"


@dataclass
class FinetuneSetup:
    """What :func:`apply_finetune` did: ``lora`` (None: full fine-tuning or from scratch) and the parameter
    counts of the DiT after it (``trainable`` of ``total``, adapters included)."""

    lora: LoRAConfig | None
    trainable: int
    total: int


def apply_finetune(config: FinetuneConfig, model: nn.Module, text_encoder: Any) -> FinetuneSetup:
    """Load ``config.init_from``'s DiT weights into ``model``, then inject the adapters of ``config.lora`` (the
    LLM's too when it names LLM projections: the text encoder becomes trainable, its adapters only)."""
    if config.init_from:
        load_init_weights(model, config.init_from)
        logger.info("fine-tuning from %s", config.init_from)
    if config.lora is not None:
        inject_dit_lora(model, config.lora)
        decoder = getattr(text_encoder, "decoder", None)
        if decoder is not None and inject_llm_lora(decoder, config.lora) is not None:
            text_encoder.trainable = True  # encode() keeps gradients; only the adapters require them
    trainable, total = count_parameters(model)
    if config.lora is not None:
        logger.info("LoRA: %d of %d DiT parameters train (%.2f %%)", trainable, total, 100 * trainable / total)
    return FinetuneSetup(config.lora, trainable, total)


def _targets(weights: Mapping[str, torch.Tensor]) -> list[str]:
    return sorted({name.split(".lora_A.")[0] for name in weights if ".lora_A." in name})


def adapter_parts(weights: Mapping[str, torch.Tensor], lora: LoRAConfig) -> tuple[AdapterPart, AdapterPart | None]:
    """The DiT's and the LLM's adapters (None without LLM adapters) of a LoRA run's trained weights, in peft's
    naming with peft's ``LoraConfig``."""
    dit = {k: v for k, v in weights.items() if not k.startswith(LLM_PREFIX)}
    llm = {k.removeprefix(LLM_ADAPTER_PREFIX): v for k, v in weights.items() if k.startswith(LLM_ADAPTER_PREFIX)}
    dit_part = AdapterPart(to_peft_keys(dit), lora_config_dict(peft_config(lora, _targets(dit))))
    if not llm:
        return dit_part, None
    return dit_part, AdapterPart(to_peft_keys(llm), lora_config_dict(peft_config(lora, _targets(llm))))


class AdapterWriter:
    """``writer(directory)``: write ``directory/adapter`` (and ``adapter_ema`` when the directory holds EMA weights)
    from a checkpoint or ``final/`` directory just written (either checkpoint format)."""

    def __init__(self, lora: LoRAConfig):
        self.lora = lora

    def __call__(self, directory: Path) -> None:
        sharded = is_sharded_checkpoint(directory)
        has_ema = bool((read_state(directory) or {}).get("has_ema")) if sharded else (directory / EMA_FILE).is_file()
        for name, ema in ((ADAPTER_DIR, False), (ADAPTER_EMA_DIR, True)):
            if ema and not has_ema:
                continue
            weights = RunWeights(directory, ema=ema, sharded=sharded).read()
            save_adapter(directory / name, *adapter_parts(weights, self.lora))


def adapter_name_of(run_name: str) -> str:
    """The adapter name a LoRA run's adapters get when the run is loaded (its name; characters other than letters,
    digits, ``-`` and ``_`` become ``_``, since peft names modules after adapters)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", run_name) or "run"
