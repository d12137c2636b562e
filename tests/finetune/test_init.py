"""The starting weights of ``finetune.init_from``: from an exported folder, a training run, a LoRA run (merged) and
a reference folder, and a clear error when they do not fit the config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fusedit.builders import build_components
from fusedit.commands import main
from fusedit.config import ConfigError
from fusedit.experiment import load_experiment
from fusedit.finetune.init import check_init_weights, load_init_weights, merge_lora, read_init_weights
from fusedit.reference.importer import load_reference_folder
from fusedit.sampling.loading import load_pipeline
from tests.conftest import overrides_for

REFERENCE = Path(__file__).resolve().parents[1] / "fixtures" / "reference-tiny" / "pipeline"


def test_an_exported_folder_gives_its_dit(tiny_llm_dir, base_folder):
    parts = build_components(load_experiment("demo", overrides_for(tiny_llm_dir)))
    load_init_weights(parts.model, base_folder)
    expected = load_pipeline(base_folder, device="cpu").transformer.state_dict()
    got = parts.model.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_a_config_that_does_not_fit_is_a_clear_error(tiny_llm_dir, base_folder):
    parts = build_components(load_experiment("demo", overrides_for(tiny_llm_dir) + ["model.dit_hidden_size=64"]))
    message = (
        r"does not fit this config's model\.\*: shapes differ \(\S+: \(\d+, 32\) in the source, \(\d+, 64\) in this"
    )
    with pytest.raises(ConfigError, match=message):
        load_init_weights(parts.model, base_folder)
    with pytest.raises(ConfigError, match="does not exist"):
        read_init_weights(base_folder.parent / "nowhere")
    with pytest.raises(ConfigError, match="is neither a training run"):
        read_init_weights(base_folder / "scheduler")


def test_the_train_command_reports_a_mismatch_in_one_line(tiny_llm_dir, base_folder, tmp_path, capsys):
    args = ["train", "demo", *overrides_for(tiny_llm_dir), "model.dit_hidden_size=64", "--init-from", str(base_folder)]
    assert main([*args, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # (before it: the LLM's loading bar)
    assert last.startswith("error: finetune.init_from:") and "shapes differ" in last and "Traceback" not in err


def test_a_reference_folder_gives_its_converted_dit():
    weights = read_init_weights(REFERENCE)
    model = load_reference_folder(REFERENCE).model
    check_init_weights(model, weights, str(REFERENCE))
    assert all(torch.equal(weights[k], v.float()) for k, v in model.state_dict().items())


def test_merging_adds_scaled_low_rank_products():
    base = {"layers.0.q.weight": torch.ones(3, 2)}
    a, b = torch.arange(4.0).view(2, 2), torch.arange(6.0).view(3, 2)
    adapter = {"layers.0.q.lora_A.default.weight": a, "layers.0.q.lora_B.default.weight": b}
    merged = merge_lora(base, adapter, scale=0.5)
    torch.testing.assert_close(merged["layers.0.q.weight"], torch.ones(3, 2) + 0.5 * b @ a)
