"""A trainable LLM (``text.trainable: true``, the frozen-vs-trainable study) end to end with a real tiny LLM: its
weights join the optimiser and change, ``final/`` and checkpoints hold them under ``llm.``, a sample from the run
uses them, and a resume from a checkpoint reproduces the straight run bit for bit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from fusedit.experiment import load_experiment
from fusedit.text.cache import CachedTextEncoder
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


def test_an_llm_trained_for_the_first_steps_freezes_is_cached_and_resumes_exactly(tiny_llm_dir, tmp_path):
    """``train.llm_train_steps=4`` of 6: the LLM trains in steps 0-3 (its gradient is zero in the first two, while
    the DiT's zero-initialised gates are closed), then keeps its step-4 weights while the DiT goes on, its contexts
    come from the cache, and a resume at the switch reproduces the straight run."""
    overrides = ["text.trainable=true", "train.cache_text_context=true", "train.caption_dropout=0.0"]
    overrides += ["train.max_steps=6", "train.llm_train_steps=4"]
    config = load_experiment("demo", overrides_for(tiny_llm_dir) + overrides)
    straight = build_trainer(config, tmp_path / "straight", device=torch.device("cpu"), resume=True, progress=False)
    straight.fit()
    cache = straight.text_encoder
    assert isinstance(cache, CachedTextEncoder) and cache.hits + cache.misses == 2 * 4  # the 2 frozen steps' captions

    def weights(step: str) -> dict[str, torch.Tensor]:
        where = tmp_path / "straight" / ("final" if step == "final" else f"checkpoints/step-00000{step}")
        return load_file(where / "model.safetensors")

    initial = {f"llm.decoder.{k}": v for k, v in load_llm(str(tiny_llm_dir)).state_dict().items()}
    at_switch, final = weights("4"), weights("final")
    llm = [k for k in final if k.startswith("llm.")]
    dit = [k for k in final if not k.startswith("llm.")]
    assert llm and dit
    assert [k for k in llm if torch.equal(at_switch[k], initial[k])] == [], "the LLM trains before the switch"
    assert all(torch.equal(final[k], at_switch[k]) for k in llm), "the LLM is frozen after it"
    assert any(not torch.equal(final[k], at_switch[k]) for k in dit), "the DiT trains on"

    resumed = build_trainer(config, tmp_path / "resumed", device=torch.device("cpu"), resume=True, progress=False)
    resumed.resume_from = tmp_path / "straight" / "checkpoints" / "step-000004"
    assert resumed.fit().start_step == 4
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(tmp_path / "straight" / "final" / name), load_file(tmp_path / "resumed" / "final" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name}: bit for bit"
