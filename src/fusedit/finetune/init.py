"""The starting weights of a fine-tuning run (``finetune.init_from``): the DiT of a training run, of an exported
pipeline folder (diffusers' format or the older fusedit layout) or of a reference (fuse-dit) pipeline folder.

Only the DiT's weights are read; the LLM comes from ``text.*`` as in any run. A source run that trained LoRA
adapters gives its base weights with the adapters merged (``W + alpha/r · B·A``); a source run that trained its LLM
is refused (its LLM weights would be lost).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from fusedit.checkpoint.errors import CheckpointError
from fusedit.checkpoint.weights import LLM_PREFIX, RunWeights, find_run_weights
from fusedit.config import ConfigError
from fusedit.diffusers_native.convert import is_diffusers_folder
from fusedit.diffusers_native.transformer import FuseDiTTransformer2DModel
from fusedit.experiment import load_experiment
from fusedit.reference.importer import is_reference_folder, load_reference_folder

Weights = dict[str, torch.Tensor]


def _is_old_export(root: Path) -> bool:
    index = root / "model_index.json"
    try:
        return index.is_file() and "fusedit" in json.loads(index.read_text())
    except json.JSONDecodeError:
        return False


def merge_lora(base: Weights, adapter: Weights, scale: float) -> Weights:
    """``base`` with every adapted weight ``W`` replaced by ``W + scale · B @ A``; ``adapter``: trainer-named adapter
    weights (``<module>.lora_A.default.weight`` (r, in), ``<module>.lora_B.default.weight`` (out, r))."""
    merged = dict(base)
    for name, a in adapter.items():
        if ".lora_A." not in name:
            continue
        module = name.split(".lora_A.")[0]
        b = adapter[name.replace(".lora_A.", ".lora_B.")]
        merged[f"{module}.weight"] = base[f"{module}.weight"] + scale * (b.double() @ a.double()).float()
    return merged


def _run_weights(root: Path, seen: tuple[Path, ...]) -> Weights:
    config = load_experiment(root / "config.yaml")
    weights = find_run_weights(root, use_ema=True)
    state = weights.read()
    if any(name.startswith(LLM_PREFIX) for name in state):
        raise ConfigError(
            f"finetune.init_from: {root} trained its LLM ({weights.source} holds llm.* weights); fine-tuning from "
            f"it would drop them. Export it (fusedit export) and start from a run that keeps the LLM frozen"
        )
    lora = config.finetune.lora
    if lora is None:
        return state
    if not config.finetune.init_from:
        raise CheckpointError(f"{root}: a LoRA run without finetune.init_from in its config.yaml")
    base = read_init_weights(config.finetune.init_from, seen + (root,))
    return merge_lora(base, state, lora.alpha / lora.rank)


def read_init_weights(path: str | Path, _seen: tuple[Path, ...] = ()) -> Weights:
    """The DiT weights (and buffers) of ``path``, named as :class:`~fusedit.models.dit.DiffusionTransformer` names
    them, float32 on the CPU."""
    root = Path(path).expanduser().resolve()
    if root in _seen:
        raise ConfigError(f"finetune.init_from: {root} starts from itself ({' -> '.join(map(str, _seen))})")
    if not root.exists():
        raise ConfigError(
            f"finetune.init_from: {root} does not exist; give a training run, an exported pipeline folder or a "
            f"reference pipeline folder"
        )
    if is_reference_folder(root):
        return {k: v.float() for k, v in load_reference_folder(root).model.state_dict().items()}
    if is_diffusers_folder(root):
        transformer = FuseDiTTransformer2DModel.from_pretrained(str(root / "transformer"), torch_dtype=torch.float32)
        return {k: v.float() for k, v in transformer.state_dict().items()}
    if _is_old_export(root):
        return RunWeights(root / "transformer", ema=False, sharded=False).read()
    if (root / "config.yaml").is_file():
        return _run_weights(root, _seen)
    raise ConfigError(
        f"finetune.init_from: {root} is neither a training run (config.yaml), an exported pipeline folder "
        f"(model_index.json) nor a reference pipeline folder"
    )


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_init_weights(model: nn.Module, weights: Weights, source: str) -> None:
    """Raise :class:`ConfigError` unless ``weights`` hold every parameter of ``model`` with its shape (and buffers
    they hold have the model's shapes)."""
    own = dict(model.state_dict())
    params = {name for name, _ in model.named_parameters()}
    missing = sorted(params - set(weights))
    unexpected = sorted(set(weights) - set(own))
    wrong = [
        f"{name}: {_shape(weights[name])} in the source, {_shape(own[name])} in this config"
        for name in sorted(set(weights) & set(own))
        if _shape(weights[name]) != _shape(own[name])
    ]
    if missing or unexpected or wrong:
        problems = []
        if wrong:
            problems.append(f"shapes differ ({'; '.join(wrong[:3])}{'; ...' if len(wrong) > 3 else ''})")
        if missing:
            problems.append(f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if unexpected:
            problems.append(f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
        raise ConfigError(
            f"finetune.init_from: the DiT of {source} does not fit this config's model.*: {', '.join(problems)}; "
            f"set model.* (and text.llm) as the source has them, e.g. base: SOURCE_RUN/config.yaml"
        )


@torch.no_grad()
def load_init_weights(model: nn.Module, path: str | Path) -> None:
    """Copy the DiT weights of ``path`` into ``model`` (shapes checked first, see :func:`check_init_weights`)."""
    weights = read_init_weights(path)
    check_init_weights(model, weights, str(path))
    model.load_state_dict(weights, strict=False)
