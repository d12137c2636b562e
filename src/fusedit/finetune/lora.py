"""LoRA adapters through ``peft``: which projections of the DiT (and optionally the LLM) get adapters, injecting
them, and the adapters' weights in peft's naming.

``peft.inject_adapter_in_model`` replaces each targeted ``nn.Linear`` by a LoRA layer holding the frozen linear
(``base_layer``) and the trainable ``lora_A`` (r, in) / ``lora_B`` (out, r) (``B`` starts at zero: the adapted
model starts as the base model); only the adapters keep ``requires_grad``. The trainer then optimises, averages
and checkpoints exactly those parameters (:func:`fusedit.checkpoint.weights.trainable_named_parameters`), named as
``named_parameters`` names them, e.g. ``layers.0.self_attn.q_proj.lora_A.default.weight``. The saved adapter
(:mod:`fusedit.finetune.adapters`) uses peft's own key names, ``base_model.model.<module>.lora_A.weight``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from fusedit.config import ConfigError
from fusedit.finetune.config import DIT_GROUPS, LLM_GROUPS, LoRAConfig

#: The adapter name used in training (peft's default).
ADAPTER_NAME = "default"
#: Where the DiT's adapted projections live: inside its blocks (``layers.<i>.``).
DIT_BLOCKS_PREFIX = "layers."


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def find_targets(
    module: nn.Module, names: list[str], groups: Mapping[str, tuple[str, ...]], where: str, prefix: str = ""
) -> list[str]:
    """Full names of the ``nn.Linear`` modules under ``module`` (whose name starts with ``prefix``) whose last name is
    named by ``names`` (projection names, or group names standing for several). Raises :class:`ConfigError` naming
    ``where`` when a name matches nothing in this model (a group matches when any of its members is there)."""
    linears = [
        name for name, child in module.named_modules() if isinstance(child, nn.Linear) and name.startswith(prefix)
    ]
    found: list[str] = []
    for wanted in names:
        leaves = groups.get(wanted, (wanted,))
        matched = [name for name in linears if _leaf(name) in leaves]
        if not matched:
            present = sorted({_leaf(name) for name in linears})
            raise ConfigError(
                f"{where}: {wanted!r} matches no linear layer of this model (its projections: {', '.join(present)}); "
                f"remove it from the list"
            )
        found += [name for name in matched if name not in found]
    return sorted(found, key=linears.index)


def peft_config(config: LoRAConfig, targets: list[str]) -> LoraConfig:
    """peft's ``LoraConfig`` of ``config`` for the modules ``targets`` (full names: matched exactly by peft)."""
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,  # type: ignore[arg-type]  # peft annotates int; it scales by alpha / r
        lora_dropout=config.dropout,
        target_modules=list(targets),
        init_lora_weights=True,
    )


def inject_dit_lora(model: nn.Module, config: LoRAConfig) -> LoraConfig:
    """Freeze ``model`` and add adapters on its blocks' projections named by ``config.target_modules``; returns the
    peft config (saved with the adapter)."""
    targets = find_targets(model, config.target_modules, DIT_GROUPS, "finetune.lora.target_modules", DIT_BLOCKS_PREFIX)
    lora = peft_config(config, targets)
    model.requires_grad_(False)
    inject_adapter_in_model(lora, model, adapter_name=ADAPTER_NAME)
    return lora


def inject_llm_lora(decoder: nn.Module, config: LoRAConfig) -> LoraConfig | None:
    """Add adapters on the LLM decoder's projections named by ``config.llm_target_modules`` (None when empty); the
    LLM's own weights stay frozen."""
    if not config.llm_target_modules:
        return None
    targets = find_targets(decoder, config.llm_target_modules, LLM_GROUPS, "finetune.lora.llm_target_modules")
    lora = peft_config(config, targets)
    decoder.requires_grad_(False)
    inject_adapter_in_model(lora, decoder, adapter_name=ADAPTER_NAME)
    return lora


def is_adapted(module: nn.Module) -> bool:
    """Whether ``module`` holds peft adapter layers."""
    return any(isinstance(child, BaseTunerLayer) for child in module.modules())


def to_peft_keys(weights: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Adapter weights named as the trainer names them (``[prefix]<module>.lora_A.default.weight``) in peft's saved
    naming (``base_model.model.<module>.lora_A.weight``); weights without ``lora_`` in their name are left out."""
    marker = f".{ADAPTER_NAME}."
    out = {}
    for name, tensor in weights.items():
        if not name.startswith(prefix) or ".lora_" not in name:
            continue
        name = name[len(prefix) :]
        if marker not in name:
            raise ValueError(f"{name!r}: not an adapter weight of the {ADAPTER_NAME!r} adapter")
        out["base_model.model." + name.replace(marker, ".", 1)] = tensor
    return out


def from_peft_keys(weights: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_peft_keys`: peft's saved names back to ``[prefix]<module>.lora_A.default.weight``."""
    out = {}
    for name, tensor in weights.items():
        stem = name.removeprefix("base_model.model.")
        for kind in (".lora_A.", ".lora_B."):
            if kind in stem:
                stem = stem.replace(kind, f"{kind}{ADAPTER_NAME}.", 1)
                break
        else:
            raise ValueError(f"{name!r} is not a LoRA weight (no lora_A / lora_B in its name)")
        out[prefix + stem] = tensor
    return out


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts of ``model`` (adapters included in the total)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
