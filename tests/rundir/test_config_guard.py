"""Items 1 and 2 of issue 17: a run's config is written once; a resume that changes the model, the text side or the
data stream is refused listing the differences; allowed changes need --allow-change and are recorded."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from fusedit.config import ConfigError
from fusedit.experiment import load_experiment
from fusedit.rundir.config_guard import (
    CHANGES_FILE,
    CONFIG_FILE,
    RunConfigChangeError,
    effective_config,
    key_kind,
    record_changes,
    resume_changes,
    write_config_once,
)


def experiment(*overrides):
    return load_experiment("demo", ["text.llm=/models/llm", *overrides])


def test_config_is_written_once(tmp_path):
    assert write_config_once(tmp_path, experiment())
    before = (tmp_path / CONFIG_FILE).read_bytes()
    assert not write_config_once(tmp_path, experiment("model.dit_hidden_size=64"))
    assert (tmp_path / CONFIG_FILE).read_bytes() == before
    assert yaml.safe_load(before)["model"] == dataclasses.asdict(experiment().model)


@pytest.mark.parametrize(
    "override,shown",
    [
        ("model.dit_hidden_size=64", "model.dit_hidden_size:"),
        ("model.pos_embed=1d-rope", "model.pos_embed: '2d-rope' -> '1d-rope'"),
        ("text.max_length=8", "text.max_length:"),
        ("data.shapes.seed=5", "data.shapes.seed:"),
        ("train.seed=7", "train.seed:"),
        ("train.batch_size=8", "train.batch_size:"),
        ("train.optimizer=adamw", "train.optimizer: 'muon' -> 'adamw'"),  # the saved optimizer state is Muon's
    ],
)
def test_changes_of_model_text_or_data_are_refused_even_with_the_flag(tmp_path, override, shown):
    write_config_once(tmp_path, experiment())
    key = override.split("=")[0]
    with pytest.raises(RunConfigChangeError) as error:
        resume_changes(tmp_path, experiment(override))
    assert shown in str(error.value) and "nothing was changed" in str(error.value) and "--no-resume" in str(error.value)
    with pytest.raises(ConfigError, match="cannot change on a resume"):
        resume_changes(tmp_path, experiment(override), allow=[key])


def test_every_difference_is_listed(tmp_path):
    write_config_once(tmp_path, experiment())
    with pytest.raises(RunConfigChangeError) as error:
        resume_changes(tmp_path, experiment("model.dit_hidden_size=64", "text.max_length=8", "train.max_steps=9"))
    message = str(error.value)
    assert "model.dit_hidden_size" in message and "text.max_length" in message  # train.max_steps needs only the flag


def test_allowed_changes_need_the_flag_and_are_recorded(tmp_path):
    write_config_once(tmp_path, experiment("train.max_steps=10"))
    with pytest.raises(RunConfigChangeError, match="--allow-change train.max_steps"):
        resume_changes(tmp_path, experiment("train.max_steps=20"))
    changes = resume_changes(tmp_path, experiment("train.max_steps=20"), allow=["train.max_steps"])
    assert changes == {"train.max_steps": (10, 20)}
    record_changes(tmp_path, changes, step=10, allowed=["train.max_steps"])
    record = json.loads((tmp_path / CHANGES_FILE).read_text())
    assert record["step"] == 10 and record["changes"] == {"train.max_steps": [10, 20]}
    # the recorded change is part of the run's config now: resuming with 20 again needs no flag
    assert effective_config(tmp_path)["train.max_steps"] == 20
    assert resume_changes(tmp_path, experiment("train.max_steps=20")) == {}
    with pytest.raises(ConfigError, match="not a config key"):
        resume_changes(tmp_path, experiment(), allow=["train.max_stepz"])


def _created_before(run_dir, key: str) -> None:
    """Write the demo's config.yaml to ``run_dir`` as a fusedit without ``train.<key>`` would have written it."""
    write_config_once(run_dir, experiment())
    stored = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
    del stored["train"][key]
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(stored))


def test_a_key_added_after_the_run_was_created_reads_as_its_default(tmp_path):
    """A run created by an older fusedit has no entry for a newer key: it trained with the key's default, so a
    resume with the default is no change, and a resume with another value is one (flagged or refused as usual)."""
    _created_before(tmp_path / "ns", "muon_ns_steps")
    assert resume_changes(tmp_path / "ns", experiment()) == {}
    with pytest.raises(RunConfigChangeError, match=r"train.muon_ns_steps: 5 -> 3; .*--allow-change train.muon_ns_s"):
        resume_changes(tmp_path / "ns", experiment("train.muon_ns_steps=3"))
    _created_before(tmp_path / "optimizer", "optimizer")  # before train.optimizer: every run trained with AdamW
    assert resume_changes(tmp_path / "optimizer", experiment("train.optimizer=adamw")) == {}
    with pytest.raises(RunConfigChangeError, match="train.optimizer: 'adamw' -> 'muon'"):
        resume_changes(tmp_path / "optimizer", experiment())


def test_execution_keys_change_freely(tmp_path):
    write_config_once(tmp_path, experiment("data.num_workers=0"))
    assert resume_changes(tmp_path, experiment("data.num_workers=2")) == {"data.num_workers": (0, 2)}
    assert key_kind("train.distributed") == "execution"
    assert key_kind("sample.guidance_scale") == "allowed" and key_kind("model.fusion") == "fixed"
