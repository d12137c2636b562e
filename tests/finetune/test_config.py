"""The ``finetune:`` section is validated at load: unknown target modules, bad ranks, LoRA without a base model,
LLM adapters together with a whole trainable LLM."""

from __future__ import annotations

import pytest

from fusedit.config import ConfigError
from fusedit.experiment import load_experiment
from fusedit.finetune.config import FinetuneConfig, LoRAConfig


def test_defaults_train_from_scratch_without_adapters():
    config = load_experiment("demo")
    assert config.finetune == FinetuneConfig(init_from=None, lora=None)


def test_a_lora_section_loads_typed():
    config = load_experiment(
        "demo", ["finetune.init_from=runs/x", "finetune.lora.rank=4", "finetune.lora.target_modules=[q_proj, mlp]"]
    )
    assert config.finetune.lora == LoRAConfig(rank=4, alpha=8.0, target_modules=["q_proj", "mlp"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["finetune.lora.target_modules=[qkv]"], r"target_modules: unknown target module\(s\) \['qkv'\]; allowed: "),
        (
            ["finetune.lora.llm_target_modules=[lm_head]"],
            r"llm_target_modules: unknown target module\(s\) \['lm_head'\]",
        ),
        (["finetune.lora.target_modules=[]"], "target_modules: empty"),
        (["finetune.lora.target_modules=[mlp, mlp]"], "names a module twice"),
        (["finetune.lora.rank=0"], "finetune.lora.rank: got 0, expected a positive integer"),
        (["finetune.lora.alpha=-1"], "finetune.lora.alpha: got -1.0"),
        (["finetune.lora.dropout=1.0"], r"finetune.lora.dropout: got 1.0, expected in \[0, 1\)"),
        (["finetune.lora.rnk=4"], "unknown key 'finetune.lora.rnk'"),
        (["text.trainable=true", "finetune.lora.llm_target_modules=[attention]"], "either whole or through adapters"),
    ],
)
def test_bad_sections_are_refused_with_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment("demo", ["finetune.init_from=runs/x", *overrides])


def test_lora_needs_a_model_to_adapt():
    with pytest.raises(ConfigError, match="finetune.lora needs finetune.init_from"):
        load_experiment("demo", ["finetune.lora.rank=4"])
