"""A trainable LLM (``text.trainable: true``, the frozen-vs-trainable study) end to end with a real tiny LLM: its
weights join the optimiser and change, ``final/`` and checkpoints hold them under ``llm.``, a sample from the run
uses them, and a resume from a checkpoint reproduces the straight run bit for bit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from fusedit.experiment import load_experiment
from fusedit.text.llm import load_llm
from fusedit.train.launch import build_trainer, train_run
from tests.conftest import overrides_for

pytestmark = pytest.mark.slow

TRAINABLE = ["text.trainable=true", "train.cache_text_context=false", "train.caption_dropout=0.0"]


@pytest.mark.parametrize("llm_lr_scale", [1.0, 0.1])  # one AdamW group, or the LLM's own group at a tenth
def test_trainable_llm_trains_end_to_end_and_resumes_exactly(tiny_llm_dir, tmp_path, llm_lr_scale):
    config = load_experiment("demo", overrides_for(tiny_llm_dir) + TRAINABLE + [f"train.llm_lr_scale={llm_lr_scale}"])
    straight = tmp_path / "straight"
    summary = train_run(config, straight, device="cpu", progress=False)
    assert summary.step == 4
    final = load_file(straight / "final" / "model.safetensors")
    before = {f"llm.decoder.{k}": v for k, v in load_llm(str(tiny_llm_dir)).state_dict().items()}
    trained = {k: v for k, v in final.items() if k.startswith("llm.")}
    assert trained and set(trained) <= set(before)
    moved = [k for k, v in trained.items() if not torch.equal(v, before[k])]
    assert len(moved) == len(trained), f"LLM weights that did not train: {sorted(set(trained) - set(moved))[:5]}"
    assert "llm.decoder.layers.0.self_attn.q_proj.weight" in trained  # the attention the DiT shares trains too

    trainer = build_trainer(config, tmp_path / "resumed", device=torch.device("cpu"), resume=True, progress=False)
    trainer.resume_from = straight / "checkpoints" / "step-000002"
    with torch.no_grad():  # other LLM weights than the checkpoint's: they must be loaded from it
        for param in trainer.text_encoder.decoder.parameters():
            param.normal_()
    resumed = trainer.fit()
    assert resumed.start_step == 2 and resumed.step == 4
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(straight / "final" / name), load_file(tmp_path / "resumed" / "final" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name}: bit for bit"
