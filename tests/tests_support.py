"""Helpers imported by tests (not a test module)."""
from __future__ import annotations


def overrides_for(llm_dir) -> list[str]:
    """Overrides of the demo config for a seconds-long CPU run on 16 px images with the tiny test LLM."""
    return [f"text.llm={llm_dir}", "data.resolution=16", "model.sample_size=16", "model.patch_size=4",
            "model.dit_hidden_size=32", "model.dit_intermediate_size=48", "train.batch_size=4",
            "train.max_steps=4", "train.checkpoint_every=2", "train.sample_every=0", "train.log_every=1",
            "train.ema_every=1", "train.warmup_steps=1", "sample.num_inference_steps=3", "text.max_length=12"]
