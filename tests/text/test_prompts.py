"""Prompt formatting: instruction prefix, chat template, padding side, truncation reporting, loading by path."""

from __future__ import annotations

import pytest
import torch

from fusedit.text.config import TextConfig
from fusedit.text.context import TextRequirements
from fusedit.text.encoder import PromptFormatter, TextEncoder, trim_padding_columns, unknown_words
from fusedit.text.llm import LLMLoadError, load_llm, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_llm_dir):
    return load_tokenizer(str(tiny_llm_dir), padding_side="left")


def test_instruction_prefix_only_on_non_empty_prompts(tokenizer):
    formatter = PromptFormatter(tokenizer, TextConfig(llm="x", instruction="imagine: ", max_length=6))
    assert formatter.format("a red circle") == "imagine: a red circle"
    assert formatter.format("") == ""
    assert formatter.instruction_length == 2  # "imagine" ":" (the BOS is not counted)
    tokens = formatter(["a red circle", ""])
    assert tokens.input_ids.shape == (2, 8)  # max_length + instruction tokens, padded to the max (reference)


def test_chat_template(tokenizer):
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = "{% for m in messages %}<bos>{{ m['content'] }}{% endfor %}"
    formatter = PromptFormatter(tokenizer, TextConfig(llm="x", chat_template=True))
    assert formatter.format("a red circle") == "<bos>a red circle"
    ids = formatter(["a red circle"]).input_ids[0]
    assert (ids == tokenizer.bos_token_id).sum() == 1, "the template's BOS only, no second one from the tokenizer"


def test_words_the_tokenizer_does_not_know_are_named(tokenizer, caplog):
    """The shapes world's word-level tokenizer reads unseen words as <unk>: the user is told which words."""
    assert unknown_words(tokenizer, ["a red circle", "two blue squares"]) == []
    assert unknown_words(tokenizer, ["a shiny hexagon", "a hexagon"]) == ["shiny", "hexagon"]
    formatter = PromptFormatter(tokenizer, TextConfig(llm="x", max_length=8))
    with caplog.at_level("WARNING", logger="fusedit.text.encoder"):
        formatter(["a red circle"])
        assert caplog.records == []
        formatter(["a shiny circle", ""])
    assert len(caplog.records) == 1
    assert "does not know 'shiny'" in caplog.text and "<unk>" in caplog.text
    with caplog.at_level("WARNING", logger="fusedit.text.encoder"):  # each word once, not at every call
        formatter(["a shiny square"])
        formatter(["a shiny hexagon"])
    assert len(caplog.records) == 2 and "does not know 'hexagon'" in caplog.records[1].getMessage()
    assert "shiny" not in caplog.records[1].getMessage()


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_side_and_truncation_report(tiny_llm_dir, side):
    tokenizer = load_tokenizer(str(tiny_llm_dir), padding_side=side)
    formatter = PromptFormatter(tokenizer, TextConfig(llm="x", max_length=5, padding="longest", padding_side=side))
    tokens = formatter(["a red circle", "a red circle to the left of a blue square"])
    assert tokens.num_truncated == 1 and tokens.truncated_indices == [1]
    assert tokens.input_ids.shape == (2, 5)
    mask = tokens.attention_mask
    assert bool(mask[0, 0]) == (side == "right") and bool(mask[0, -1]) == (side == "left")


def test_bad_prompts(tokenizer):
    formatter = PromptFormatter(tokenizer, TextConfig(llm="x"))
    with pytest.raises(ValueError, match="no prompts given"):
        formatter([])
    with pytest.raises(TypeError, match="prompts must be strings"):
        formatter(["ok", 3])


def test_trim_padding_columns_is_exact(tiny_llm_dir):
    decoder = load_llm(str(tiny_llm_dir))
    tokenizer = load_tokenizer(str(tiny_llm_dir))
    config = TextConfig(llm=str(tiny_llm_dir), max_length=20, trim=True)
    encoder = TextEncoder(decoder, tokenizer, config, TextRequirements(kv_layers=(0, 1)))
    trimmed = encoder.encode(["a red circle", "two blue squares"])
    full = encoder.encode_tokens(
        *[
            t
            for t in (lambda p: (p.input_ids, p.attention_mask))(encoder.tokenize(["a red circle", "two blue squares"]))
        ]
    ).trimmed()
    assert trimmed.length == full.length < 21
    for layer in (0, 1):
        torch.testing.assert_close(trimmed.keys[layer], full.keys[layer], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(trimmed.values[layer], full.values[layer], atol=1e-5, rtol=1e-5)
    ids, mask, offset = trim_padding_columns(
        torch.tensor([[0, 0, 5, 6], [0, 7, 8, 9]]), torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    )
    assert offset == 1 and ids.tolist() == [[0, 5, 6], [7, 8, 9]]


def test_missing_llm_path_is_a_clear_error(tmp_path):
    with pytest.raises(LLMLoadError, match="does not exist"):
        load_llm(str(tmp_path / "no-such-model"))
