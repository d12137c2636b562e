"""Trained weights: which parameters a run trains and saves, copying weights into them, and reading a run's weights
for sampling and export (from ``final/`` or from its latest checkpoint, single-process or sharded)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fusedit.checkpoint.errors import CheckpointError
from fusedit.checkpoint.layout import find_latest, read_state
from fusedit.checkpoint.sharded import is_sharded_checkpoint, read_sharded_weights
from fusedit.checkpoint.single import EMA_FILE, MODEL_FILE, read_safetensors

#: Prefix of a trained LLM's parameters in weight files (``llm.<name in the text encoder>``).
LLM_PREFIX = "llm."
#: The folder of a finished run that holds its full weights and config.
FINAL_DIR = "final"


def trainable_named_parameters(model: nn.Module, text_encoder: Any = None) -> dict[str, nn.Parameter]:
    """The parameters the trainer optimises: the model's with ``requires_grad`` (``named_parameters`` names) and,
    if ``text_encoder.trainable``, its ``trainable_parameters()`` under ``llm.<name>``."""
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if text_encoder is not None and getattr(text_encoder, "trainable", False):
        if not hasattr(text_encoder, "named_parameters"):
            raise TypeError(
                f"a trainable text encoder must have named_parameters() (e.g. be an nn.Module) so its weights can be "
                f"saved under '{LLM_PREFIX}'; {type(text_encoder).__name__} has not"
            )
        wanted = {id(p) for p in text_encoder.trainable_parameters()}
        llm = {LLM_PREFIX + name: p for name, p in text_encoder.named_parameters() if id(p) in wanted}
        if len(llm) != len(wanted):
            raise ValueError(
                f"text_encoder.trainable_parameters() yields {len(wanted)} parameters but only {len(llm)} of them "
                f"appear in text_encoder.named_parameters()"
            )
        if not llm:
            raise ValueError("text_encoder.trainable is True but trainable_parameters() is empty")
        named.update(llm)
    if not named:
        raise ValueError("nothing to train: the model has no parameter with requires_grad=True")
    return named


def _listed(names: list[str]) -> str:
    return f"{names[:5]}{'...' if len(names) > 5 else ''}"


@torch.no_grad()
def load_trainable_weights(
    params: Mapping[str, nn.Parameter], weights: Mapping[str, torch.Tensor], source: str = "weights"
) -> None:
    """Copy ``weights`` into ``params`` (``{name: parameter}``); names and shapes must match exactly.

    Raises :class:`CheckpointError` naming ``source`` on any mismatch.
    """
    missing = sorted(set(params) - set(weights))
    unexpected = sorted(set(weights) - set(params))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not match the trainable parameters: missing {_listed(missing)}, "
            f"unexpected {_listed(unexpected)}"
        )
    for name, p in params.items():
        if weights[name].shape != p.shape:
            raise CheckpointError(
                f"{source}: {name!r} has shape {tuple(weights[name].shape)}, the model expects {tuple(p.shape)}"
            )
        p.copy_(weights[name])


def load_model_weights(model: nn.Module, text_encoder: Any, weights: Mapping[str, torch.Tensor], source: str) -> None:
    """Load trained weights into a freshly built model: its trainable parameters, plus the text encoder's
    ``llm.*`` parameters when the LLM was trained."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if any(k.startswith(LLM_PREFIX) for k in weights):
        params.update({LLM_PREFIX + n: p for n, p in text_encoder.named_parameters() if LLM_PREFIX + n in weights})
    load_trainable_weights(params, weights, source=source)


@dataclass(frozen=True)
class RunWeights:
    """Where a training run's weights are.

    Attributes:
        folder: ``run_dir/final`` (a finished run) or the run's latest checkpoint.
        ema: whether the EMA weights are read (else the raw weights).
        sharded: whether ``folder`` is a sharded (distributed) checkpoint.
    """

    folder: Path
    ema: bool
    sharded: bool

    @property
    def source(self) -> str:
        """A name for messages: the weights file, or the sharded checkpoint and which weights."""
        if self.sharded:
            return f"{self.folder} ({'ema' if self.ema else 'model'} weights)"
        return str(self.folder / (EMA_FILE if self.ema else MODEL_FILE))

    def read(self) -> dict[str, torch.Tensor]:
        """The weights ``{name: float32 CPU tensor}``."""
        if self.sharded:
            return read_sharded_weights(self.folder, "ema" if self.ema else "model")
        return read_safetensors(self.folder / (EMA_FILE if self.ema else MODEL_FILE))


def find_run_weights(run_dir: Path, use_ema: bool) -> RunWeights:
    """The weights of a training run: ``final/`` if the run finished, else its latest checkpoint (single-process or
    sharded); the EMA weights when ``use_ema`` and the run has them."""
    final = run_dir / FINAL_DIR
    if final.is_dir():
        return RunWeights(final, ema=use_ema and (final / EMA_FILE).is_file(), sharded=False)
    latest = find_latest(run_dir)
    if latest is None:
        raise CheckpointError(
            f"{run_dir} has no final/ weights and no checkpoint under checkpoints/; train first "
            f"(fusedit train CONFIG) or give the path of an exported pipeline"
        )
    if is_sharded_checkpoint(latest):
        has_ema = bool((read_state(latest) or {}).get("has_ema"))
        return RunWeights(latest, ema=use_ema and has_ema, sharded=True)
    return RunWeights(latest, ema=use_ema and (latest / EMA_FILE).is_file(), sharded=False)
