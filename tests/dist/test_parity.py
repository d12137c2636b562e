"""A 2-process gloo run (micro-batch b per process) of the real DiT computes the losses of a 1-process run with
micro-batch 2b, under DDP and FSDP2."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from fusedit.checkpoint.layout import find_latest
from fusedit.checkpoint.sharded import is_sharded_checkpoint, rank_file
from fusedit.checkpoint.weights import RunWeights, find_run_weights
from fusedit.train.logging import read_metrics

from .common import BASE, losses_of, single_process
from .workers import fit_losses, spawn

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_process_at_the_same_global_batch(tmp_path, tiny_llm_dir, mode):
    _, summary = single_process(tmp_path / "single", tiny_llm_dir)
    run = tmp_path / mode
    results = spawn(2, fit_losses, {**BASE, "max_steps": 6, "distributed": mode}, str(run), str(tiny_llm_dir), tmp=tmp_path)
    assert losses_of(results[0]) == losses_of(results[1])  # the logged loss is all-reduced
    got = losses_of(results[0])
    assert sorted(got) == list(range(1, 7))
    for step, loss in summary.losses.items():
        assert got[step] == pytest.approx(loss, abs=1e-5), step
    # only rank 0 logs and exports; the exported weights (gathered from the shards) equal the 1-process run's
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 7))
    for name in ("model.safetensors", "ema.safetensors"):
        ours, theirs = load_file(run / "final" / name), load_file(tmp_path / "single" / "final" / name)
        assert ours.keys() == theirs.keys() and "layers.0.self_attn.q_proj.weight" in ours
        assert not any(key.startswith("llm.") for key in ours)  # the frozen LLM is never saved
        for key in ours:  # AdamW divides by sqrt(v): where a gradient is ~0, reduction-order noise moves the update
            torch.testing.assert_close(ours[key], theirs[key], atol=1e-4, rtol=0)
    latest = find_latest(run)
    assert latest.name == "step-000006" and is_sharded_checkpoint(latest)
    assert (latest / rank_file(0)).is_file() and (latest / rank_file(1)).is_file()
    assert json.loads((latest / "trainer_state.json").read_text())["world_size"] == 2
    assert not list((run / "checkpoints").glob(".*"))  # no temporaries left
    # sampling and export read the weights of a sharded checkpoint in one process, without a model
    for name, ema in (("model.safetensors", False), ("ema.safetensors", True)):
        sharded = RunWeights(latest, ema=ema, sharded=True).read()
        final = load_file(run / "final" / name)
        assert sharded.keys() == final.keys()
        assert all(torch.equal(sharded[k], final[k]) for k in final)
    shutil.rmtree(run / "final")
    assert find_run_weights(run, use_ema=True) == RunWeights(latest, ema=True, sharded=True)
