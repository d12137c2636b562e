"""``tools/text_state_similarity.py``: per-layer similarity of two prompts' last-token states."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..tool_loader import load_tool


@pytest.fixture(scope="module")
def tool():
    return load_tool("text_state_similarity")


def test_the_same_last_word_matches_at_the_embeddings_only(tool, tiny_llm_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llm_dir).eval()
    layers = model.config.num_hidden_layers + 1
    same = tool.similarities(model, tokenizer, "a square and a triangle", "a square and a triangle")
    assert len(same) == layers and all(v == pytest.approx(1.0, abs=1e-5) for v in same)
    shared_word = tool.similarities(model, tokenizer, "a square and a triangle", "a circle and a triangle")
    assert shared_word[0] == pytest.approx(1.0, abs=1e-5) and max(shared_word[1:]) < 0.999
    other_word = tool.similarities(model, tokenizer, "a square and a triangle", "a triangle and a square")
    assert other_word[0] < 0.999
