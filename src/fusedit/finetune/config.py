"""Configuration of fine-tuning: where the starting weights come from and the LoRA adapters (the ``finetune:``
section of a run's config).

::

    finetune:
      init_from: runs/demo/fusedit      # a run, an exported pipeline folder or a reference pipeline folder
      lora:                             # null: full fine-tuning of the DiT
        rank: 8
        alpha: 8
        dropout: 0.0
        target_modules: [attention, mlp]
        llm_target_modules: []          # e.g. [attention]: adapters on the LLM too
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fusedit.config import require

#: Group names accepted in ``target_modules`` / ``llm_target_modules`` and the projection names they stand for.
DIT_GROUPS: dict[str, tuple[str, ...]] = {
    # self-attention (q/k/v/o), cross-attention (q/o) and the shallow baselines' text key/value projections
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj", "text_k_proj", "text_v_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}
LLM_GROUPS: dict[str, tuple[str, ...]] = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}


def _allowed(groups: dict[str, tuple[str, ...]]) -> list[str]:
    return sorted(set(groups) | {name for names in groups.values() for name in names})


def _check_targets(key: str, names: list[str], groups: dict[str, tuple[str, ...]]) -> None:
    allowed = _allowed(groups)
    unknown = [n for n in names if n not in allowed]
    require(not unknown, f"{key}: unknown target module(s) {unknown}; allowed: {', '.join(allowed)}")
    require(len(set(names)) == len(names), f"{key}: {names} names a module twice")


@dataclass
class LoRAConfig:
    """Low-rank adapters (through ``peft``) on the DiT's linear projections, optionally on the LLM's.

    Attributes:
        rank: the adapters' rank ``r`` (each adapted ``W`` (out, in) gains ``B`` (out, r) · ``A`` (r, in)).
        alpha: scaling ``alpha / rank`` of the adapters' output (peft's ``lora_alpha``).
        dropout: dropout on the adapters' input (peft's ``lora_dropout``).
        target_modules: which projections of every DiT block get adapters: ``attention`` (q/k/v/o of self- and
            cross-attention, and the shallow baselines' text_k/text_v), ``mlp`` (gate/up/down) or single names.
        llm_target_modules: projections of the LLM's layers that get adapters (same names; empty: the LLM stays
            frozen). The text context then carries gradients into the adapters only.
    """

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["attention", "mlp"])
    llm_target_modules: list[str] = field(default_factory=list)

    def validate(self) -> None:
        require(self.rank > 0, f"finetune.lora.rank: got {self.rank}, expected a positive integer")
        require(self.alpha > 0, f"finetune.lora.alpha: got {self.alpha}, expected > 0")
        require(0.0 <= self.dropout < 1.0, f"finetune.lora.dropout: got {self.dropout}, expected in [0, 1)")
        require(bool(self.target_modules), "finetune.lora.target_modules: empty; name at least one, e.g. [attention]")
        _check_targets("finetune.lora.target_modules", self.target_modules, DIT_GROUPS)
        _check_targets("finetune.lora.llm_target_modules", self.llm_target_modules, LLM_GROUPS)


@dataclass
class FinetuneConfig:
    """Fine-tuning a trained model instead of training from scratch.

    Attributes:
        init_from: a training run, an exported pipeline folder (``fusedit export``) or a reference pipeline folder
            whose DiT weights the run starts from (their shapes must match ``model.*``); ``null``: from scratch.
        lora: train low-rank adapters only (:class:`LoRAConfig`); ``null``: every DiT weight trains (full
            fine-tuning when ``init_from`` is set).
    """

    init_from: str | None = None
    lora: LoRAConfig | None = None

    def validate(self) -> None:
        require(
            self.lora is None or bool(self.init_from),
            "finetune.lora needs finetune.init_from: the run, exported folder or reference folder whose model the "
            "adapters adapt (or fusedit train --init-from PATH)",
        )
