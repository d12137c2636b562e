"""Shared fixtures: a tiny real Hugging Face LLM (Gemma 2 architecture) trained on nothing, saved to disk."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory):
    """A saved ``Gemma2ForCausalLM`` + tokenizer over the shapes-world caption language (random weights)."""
    from fusedit.data.config import ShapesWorldConfig
    from fusedit.data.shapes import ShapesWorld
    from fusedit.text.tiny_llm import TinyLLMConfig, pretrain_tiny_llm

    corpus = ShapesWorld(ShapesWorldConfig(), 16).caption_corpus()
    config = TinyLLMConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                           head_dim=16, intermediate_size=48, steps=0, batch_size=8)
    return pretrain_tiny_llm(corpus, tmp_path_factory.mktemp("tiny-llm"), config)


def pytest_configure(config):
    """One intra-op thread: every test uses tiny tensors, where a second thread only adds synchronisation (and on
    a busy machine two spinning threads per process slow tiny ops down many-fold)."""
    import torch

    torch.set_num_threads(1)
