"""`fusedit study` with per-variant tiny LLMs: ``tiny_llm.<field>=<value>`` in a variant's overrides pretrains one
tiny LLM per distinct config (its own folder), points the variant's ``text.llm`` at it, shows it in ``--dry-run``
and reuses finished ones on resume; unknown fields fail at grid load."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

from fusedit.cli import main as cli_main
from fusedit.config import ConfigError
from fusedit.study import grid as study_grid
from fusedit.text.tiny_llm import MARKER_NAME, TinyLLMConfig, read_marker
from tests.study import test_study
from tests.study.test_study import Fakes, run

#: a tiny LLM that pretrains in about a second (one step)
TINY = (
    "{hidden_size: 16, num_hidden_layers: 2, num_attention_heads: 2, num_key_value_heads: 1, head_dim: 8, "
    "intermediate_size: 32, steps: 1, batch_size: 8}"
)

GRID = f"""
name: toy-llms
base: demo
tiny_llm: {TINY}
budget: {{train.max_steps: 3, train.batch_size: 4}}
seeds: [0]
variants:
  base: [model.fusion=deep]
  same: [tiny_llm.seed=0]
  other-seed: [tiny_llm.seed=1]
  llama: [tiny_llm.family=llama, tiny_llm.seed=1]
eval: {{per_prompt: 1, seed: 7, steps: 2, cfg: 2.0}}
"""


def write(tmp_path: Path, text: str = GRID) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return path


def test_one_tiny_llm_per_distinct_config_each_variant_pointed_at_its_own(tmp_path, monkeypatch):
    monkeypatch.setattr(test_study, "OVERALL", defaultdict(lambda: 0.5))  # the fakes' score of every run
    grid = study_grid.load_grid(write(tmp_path))
    out = tmp_path / "study"
    llms = study_grid.plan_tiny_llms(grid, out)
    assert [llm.variants for llm in llms] == [["base", "same"], ["other-seed"], ["llama"]]
    assert llms[0].folder == (out / "tiny-llm").resolve() and llms[0].changes == {}
    assert llms[1].changes == {"seed": 1} and llms[2].changes == {"family": "llama", "seed": 1}
    assert len({llm.folder for llm in llms}) == 3 and all(llm.folder.parent == out.resolve() for llm in llms)
    assert llms[2].folder.name == f"tiny-llm-{study_grid.tiny_llm_hash(llms[2].config)}"
    assert study_grid.tiny_llm_hash(TinyLLMConfig(family="llama")) != study_grid.tiny_llm_hash(TinyLLMConfig())
    runs = {r.variant: r for r in study_grid.plan_study(grid, out)}
    for llm in llms:
        for variant in llm.variants:
            assert runs[variant].config.text.llm == str(llm.folder)
            assert not any(o.startswith("tiny_llm.") for o in runs[variant].overrides)

    logs: list[str] = []
    run(write(tmp_path), out, Fakes(), logs)
    assert sum("pretraining into" in line for line in logs) == 3
    for llm in llms:
        marker = read_marker(llm.folder)
        assert marker is not None and marker["config"]["seed"] == llm.config.seed
    assert read_marker(llms[2].folder)["config"]["family"] == "llama"

    # resumed after an interruption that left the second LLM unfinished: only that one is pretrained again
    stamps = [(llm.folder / "model.safetensors").stat().st_mtime_ns for llm in llms]
    (llms[1].folder / MARKER_NAME).unlink()
    logs.clear()
    fakes = Fakes()
    run(write(tmp_path), out, fakes, logs)
    assert fakes.trained == []
    assert [line.split(" — ")[1].split(" ")[0] for line in logs if line.startswith("tiny LLM")] == [
        "reusing",
        "pretraining",
        "reusing",
    ]
    after = [(llm.folder / "model.safetensors").stat().st_mtime_ns for llm in llms]
    assert after[0] == stamps[0] and after[2] == stamps[2] and after[1] != stamps[1]


def test_dry_run_lists_the_tiny_llms(tmp_path, capsys):
    out = tmp_path / "study"
    assert cli_main(["study", str(write(tmp_path)), "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert f"tiny LLM 1/3: {(out / 'tiny-llm').resolve()} [to pretrain] the grid's tiny_llm; for base, same" in text
    assert "[to pretrain] tiny_llm.family=llama tiny_llm.seed=1; for llama" in text
    assert "tiny_llm.seed" not in text.split("tiny LLM 1/3")[0]  # the runs' overrides hold text.llm only
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(
    "variant, message",
    [
        ("[tiny_llm.widht=3]", "variant 'same'.*unknown key 'tiny_llm.widht'.*allowed keys"),
        ("[tiny_llm.family=gpt2]", "variant 'same'.*TinyLLMConfig.family: got 'gpt2', expected one of"),
        ("[tiny_llm.hidden_size=0]", "variant 'same'.*TinyLLMConfig.hidden_size"),
        ("[tiny_llm.a.b=1]", "expected tiny_llm.<field>=<value>"),
        ("[tiny_llm.seed=2, text.llm=/x]", "both tiny_llm.\\* and text.llm"),
    ],
)
def test_bad_tiny_llm_overrides_fail_at_grid_load(tmp_path, variant, message):
    with pytest.raises(ConfigError, match=message):
        study_grid.load_grid(write(tmp_path, GRID.replace("[tiny_llm.seed=0]", variant)))


def test_grid_tiny_llm_fields_are_checked_at_load_and_needed_by_variants(tmp_path):
    with pytest.raises(ConfigError, match="tiny_llm: unknown key 'tiny_llm.layers'"):
        study_grid.load_grid(write(tmp_path, GRID.replace("steps: 1,", "steps: 1, layers: 2,")))
    with pytest.raises(ConfigError, match="tiny_llm: TinyLLMConfig.family: got 'mistral', expected one of gemma2, "):
        study_grid.load_grid(write(tmp_path, GRID.replace("steps: 1,", "steps: 1, family: mistral,")))
    without = GRID.replace(f"tiny_llm: {TINY}\n", "overrides: [text.llm=/nonexistent]\n")
    with pytest.raises(ConfigError, match="variant 'same' sets tiny_llm.* but the grid pretrains no tiny LLM"):
        study_grid.load_grid(write(tmp_path, without))
