"""End to end: ``train_run`` from a config with aspect-ratio buckets on a folder (the demo's model: 2D RoPE plus
the sin-cos table), stopped and resumed, equals the uninterrupted run; a bucket the table cannot hold fails at load."""

import json

import pytest
from safetensors.torch import load_file

from fusedit.config import ConfigError
from fusedit.experiment import load_experiment
from fusedit.train.launch import train_run

from .bucket_data import write_folder

pytestmark = pytest.mark.slow

BUCKETS = "data.buckets.sizes=[[8, 16], [16, 8], [12, 12]]"


def overrides(demo_overrides, llm, folder, steps):
    return [
        *demo_overrides(llm),
        "data.source=folder",
        f"data.path={folder}",
        "data.buckets.enabled=true",
        BUCKETS,
        f"train.max_steps={steps}",
        "train.checkpoint_every=2",
        "train.lr_schedule=constant",  # stopping by max_steps: the schedule must not depend on it
    ]


def test_bucketed_folder_run_resumes_exactly(tmp_path, tiny_llm_dir, demo_overrides):
    folder = write_folder(tmp_path / "images", n=14)
    full = train_run(
        load_experiment("demo", overrides(demo_overrides, tiny_llm_dir, folder, 4)),
        tmp_path / "full",
        device="cpu",
        progress=False,
    )
    train_run(
        load_experiment("demo", overrides(demo_overrides, tiny_llm_dir, folder, 2)),
        tmp_path / "run",
        device="cpu",
        progress=False,
    )
    resumed = train_run(  # a longer run of the same directory: the schedule is constant, so the change is safe
        load_experiment("demo", overrides(demo_overrides, tiny_llm_dir, folder, 4)),
        tmp_path / "run",
        device="cpu",
        progress=False,
        allow_change=["train.max_steps"],
    )
    state = json.loads((full.last_checkpoint / "trainer_state.json").read_text())
    assert state["data"]["bucket_batch"] == 4  # the folder was read in buckets
    assert resumed.start_step == 2 and sorted(resumed.losses) == [3, 4]
    for step in (3, 4):
        assert resumed.losses[step] == full.losses[step]
    a, b = load_file(str(full.final_dir / "model.safetensors")), load_file(str(resumed.final_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_a_bucket_longer_than_the_sincos_table_fails_at_load(tiny_llm_dir, demo_overrides, tmp_path):
    # the demo's table holds 16 patches of 4 px: 64 px
    with pytest.raises(ConfigError, match="largest bucket side is 20 patches"):
        load_experiment(
            "demo",
            [
                *demo_overrides(tiny_llm_dir),
                "data.source=folder",
                f"data.path={tmp_path}",
                "data.buckets.enabled=true",
                "data.buckets.sizes=[[16, 80], [32, 32]]",
            ],
        )
