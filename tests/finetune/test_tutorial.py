"""docs/finetune.md's tutorial (tools/finetune_tutorial.sh) runs end to end at a tiny size: the teal data with its
prior-preservation mix, LoRA training from a trained run, before/after/ground-truth grids and scores, and ``fusedit
sample --lora``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fusedit.experiment import load_experiment
from fusedit.finetune.adapters import read_adapter
from fusedit.train.launch import train_run
from tests.conftest import overrides_for

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "finetune_tutorial.sh"

pytestmark = pytest.mark.slow


def test_the_tutorial_runs_at_a_tiny_size(tiny_llm_dir, tmp_path):
    base = tmp_path / "runs" / "demo"
    train_run(load_experiment("demo", overrides_for(tiny_llm_dir) + ["train.max_steps=2"]), base, progress=False)
    sizes = {"COUNT": "8", "PRIOR": "3", "RESOLUTION": "16", "STEPS": "2", "BATCH": "4", "RANK": "2", "PER_PROMPT": "1"}
    env = {
        **os.environ,
        **sizes,
        "PYTHON": sys.executable,
        "BASE": str(base),
        "DATA": str(tmp_path / "data" / "teal"),
        "RUN": str(tmp_path / "runs" / "teal"),
        "SAMPLE_STEPS": "2",
    }
    done = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    captions = (tmp_path / "data" / "teal" / "captions.jsonl").read_text().splitlines()
    assert len(captions) == 8 + 3
    assert [("teal" in json.loads(line)["caption"]) for line in captions] == [True] * 8 + [False] * 3
    first = np.asarray(Image.open(tmp_path / "data" / "teal" / json.loads(captions[0])["file"]))
    assert first.shape == (16, 16, 3) and (np.abs(first.astype(int) - (0, 128, 128)).sum(-1) == 0).any()
    dit, _ = read_adapter(tmp_path / "runs" / "teal" / "final" / "adapter")
    assert dit.config["r"] == 2 and {k.split(".")[4] for k in dit.weights} >= {"self_attn", "mlp"}
    out = tmp_path / "runs" / "teal" / "scores"
    scores = json.loads((out / "scores.json").read_text())
    for label in ("before", "after", "ground_truth"):
        assert 0 <= scores[label]["teal_prompts_teal_fraction"] <= 1 and scores[label]["teal_samples"] == 5
        low, high = scores[label]["teal_prompts_teal_fraction_ci95"]
        assert low <= scores[label]["teal_prompts_teal_fraction"] <= high
    assert scores["ground_truth"]["teal_prompts_teal_fraction"] > 0.02
    for name in ("before", "after", "real"):
        assert (out / f"teal-{name}.png").is_file() and (out / f"control-{name}.png").is_file()
    assert "| ground_truth |" in (out / "scores.md").read_text()
    assert (out / "teal-circle.png").is_file() and (out / "teal-circle-half.png").is_file()
