"""Shared fixtures of the test suite.

* ``tiny_llm_dir``: a saved tiny Gemma 2 LLM + tokenizer over the shapes-world caption language (random weights).
* ``demo_overrides``: ``demo_overrides(llm_dir) -> [key=value, ...]``, the demo config shrunk to a seconds-long CPU
  run on 16 px images with that LLM.

Tests marked ``slow`` (end to end, distributed, the demo, the evaluation commands) are left out by
``make test-fast``; ``make test`` runs everything.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fusedit.data.config import ShapesWorldConfig
from fusedit.data.shapes import ShapesWorld
from fusedit.text.tiny_llm import TinyLLMConfig, pretrain_tiny_llm

#: The tests' tiny LLM: 2 layers, 32 wide, 2 query heads and 1 key/value head of 16, random weights (no training).
TINY_LLM = TinyLLMConfig(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    intermediate_size=48,
    steps=0,
    batch_size=8,
)


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved ``Gemma2ForCausalLM`` + tokenizer over the shapes-world caption language (random weights)."""
    corpus = ShapesWorld(ShapesWorldConfig(), 16).caption_corpus()
    return pretrain_tiny_llm(corpus, tmp_path_factory.mktemp("tiny-llm"), TINY_LLM)


def overrides_for(llm_dir: Path | str) -> list[str]:
    """Overrides of the demo config for a seconds-long CPU run on 16 px images with the LLM in ``llm_dir``."""
    return [
        f"text.llm={llm_dir}",
        "data.resolution=16",
        "model.sample_size=16",
        "model.patch_size=4",
        "model.dit_hidden_size=32",
        "model.dit_intermediate_size=48",
        "train.batch_size=4",
        "train.max_steps=4",
        "train.checkpoint_every=2",
        "train.sample_every=0",
        "train.log_every=1",
        "train.ema_every=1",
        "train.warmup_steps=1",
        "sample.num_inference_steps=3",
        "text.max_length=12",
        # the prompt alone: the tests' tiny LLM has random weights (the demo's expansion: tests/text/test_expansion.py)
        "text.expansion=none",
    ]


def text_dependent_components(config):
    """:func:`fusedit.builders.build_components` of ``config`` (seed 0) with every model weight moved by 0.1 x noise
    (seed 1): the initialisation zeroes the output and AdaLN layers, so the model would ignore the text."""
    from fusedit.builders import build_components

    torch.manual_seed(0)
    parts = build_components(config, device="cpu")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in parts.model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return parts


@pytest.fixture(scope="session")
def demo_overrides() -> Callable[[Path | str], list[str]]:
    """:func:`overrides_for`, as a fixture."""
    return overrides_for


def pytest_configure(config: pytest.Config) -> None:
    """One intra-op thread: every test uses tiny tensors, where a second thread only adds synchronisation (and on
    a busy machine two spinning threads per process slow tiny ops down many-fold)."""
    torch.set_num_threads(1)
