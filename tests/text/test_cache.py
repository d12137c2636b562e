"""The caption cache gives the model what a batched encode gives it, independently of history, and only when frozen."""

from __future__ import annotations

import pytest
import torch

from fusedit.experiment import load_experiment
from fusedit.text.cache import CachedTextEncoder
from fusedit.text.context import TextContext
from fusedit.train.text_phases import TextEncoderPhases
from tests.conftest import text_dependent_components

# different lengths, an empty caption (dropped captions) and a repeated one
PROMPTS = [
    "a red circle to the left of a blue square",
    "",
    "two green triangles",
    "a red circle to the left of a blue square",
]
TOLERANCE = 1e-5  # batched vs one-by-one matrix products (measured: about 1e-7)


@pytest.fixture(scope="module")
def parts(tiny_llm_dir, demo_overrides):
    """The demo's model on the tiny LLM, with weights perturbed so that its output depends on the text."""
    config = load_experiment("demo", demo_overrides(tiny_llm_dir))
    parts = text_dependent_components(config)
    return parts


@torch.no_grad()
def velocity(parts, context) -> torch.Tensor:
    x = torch.randn(len(PROMPTS), 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return parts.model(x, torch.full((len(PROMPTS),), 700.0), context)


def test_cached_contexts_give_the_model_what_a_batched_encode_gives_it(parts):
    cached = CachedTextEncoder(parts.text_encoder)
    expected = velocity(parts, parts.text_encoder.encode(PROMPTS))
    first = velocity(parts, cached.encode(PROMPTS))
    torch.testing.assert_close(first, expected, atol=TOLERANCE, rtol=0)
    assert (cached.misses, cached.hits, len(cached)) == (3, 1, 3)
    again = velocity(parts, cached.encode(PROMPTS))  # every row from the cache now
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    assert cached.hits == 5
    # the model reads the text, so a cache that mixed up its rows would be caught above
    moved = (velocity(parts, parts.text_encoder.encode(list(reversed(PROMPTS)))) - expected).abs().max().item()
    assert moved > 1000 * TOLERANCE, moved


def test_a_row_does_not_depend_on_the_batch_that_first_asked_for_it(parts):
    warm = CachedTextEncoder(parts.text_encoder)
    warm.encode(["two green triangles", "a purple circle above a white square"])
    fresh = CachedTextEncoder(parts.text_encoder, max_entries=1)  # keeps almost nothing: encodes again, alone
    a, b = warm.encode(PROMPTS), fresh.encode(PROMPTS)
    assert len(fresh) == 1
    for layer in a.keys:
        assert torch.equal(a.keys[layer], b.keys[layer]) and torch.equal(a.values[layer], b.values[layer])
    assert torch.equal(a.mask, b.mask) and torch.equal(a.pooled, b.pooled)


def test_a_trainable_encoder_is_not_cached(parts):
    class Trainable:
        trainable = True

        def encode(self, prompts):
            raise AssertionError("not called")

    with pytest.raises(ValueError, match="trainable text encoder cannot be cached"):
        CachedTextEncoder(Trainable())
    with pytest.raises(ValueError, match="train.cache_text_context=true with a trainable text encoder"):
        TextEncoderPhases(Trainable(), trains_until=None, cache=True)
    with pytest.raises(ValueError, match="non-empty list"):
        CachedTextEncoder(parts.text_encoder).encode("a red circle")


def test_a_cached_batch_knows_its_padding_so_a_compiled_model_traces_in_one_graph(parts):
    """The batch's ``has_padding`` comes from its rows, not from a read of its mask (which would break a compiled
    forward's graph), and it is what the mask says."""
    cached = CachedTextEncoder(parts.text_encoder)
    for prompts in (PROMPTS, ["two green triangles"] * 2, ["a circle", "two green triangles"]):
        batch = cached.encode(prompts)
        assert batch.__dict__["_has_padding"] == (not bool(batch.mask.all())), prompts
    full = [TextContext(mask=torch.ones(1, 3, dtype=torch.bool)) for _ in range(2)]
    assert TextContext.cat(full).__dict__["_has_padding"] is False
    shorter = TextContext.cat([*full, TextContext(mask=torch.ones(1, 2, dtype=torch.bool))])
    assert shorter.__dict__["_has_padding"] is True and not bool(shorter.mask.all())
    x = torch.randn(len(PROMPTS), 3, 16, 16)
    explained = torch._dynamo.explain(parts.model)(x, torch.full((len(PROMPTS),), 700.0), cached.encode(PROMPTS))
    assert explained.graph_break_count == 0, explained.break_reasons


def test_an_encoded_batch_knows_its_padding_so_a_compiled_model_traces_in_one_graph(parts):
    """A trainable LLM's contexts are encoded afresh every step: theirs too is set where the mask was made."""
    for prompts in (PROMPTS, ["two green triangles"] * 2):
        context = parts.text_encoder.encode(prompts)
        assert context.__dict__["_has_padding"] == (not bool(context.mask.all())), prompts
    x = torch.randn(len(PROMPTS), 3, 16, 16)
    context = parts.text_encoder.encode(PROMPTS)
    explained = torch._dynamo.explain(parts.model)(x, torch.full((len(PROMPTS),), 700.0), context)
    assert explained.graph_break_count == 0, explained.break_reasons


def test_a_batch_from_padded_rows_is_the_concatenation_of_its_rows(parts):
    """Batches are assembled from rows kept padded to the longest caption seen: the same tensors as concatenating
    the rows themselves, also after a longer caption arrives (every row padded anew) and for prompts not kept."""
    cached = CachedTextEncoder(parts.text_encoder, max_entries=4)
    batches = [
        ["two green triangles", "a circle"],
        PROMPTS,  # a longer caption: the width grows
        ["a circle", "", "two green triangles"],
        ["a purple circle above a white square", "a circle"],  # past max_entries: encoded, not kept
    ]
    for prompts in batches:
        batch = cached.encode(prompts)
        rows = TextContext.cat([parts.text_encoder.encode([p]) for p in prompts])
        assert batch.length == rows.length and torch.equal(batch.mask, rows.mask), prompts
        assert batch.keys.keys() == rows.keys.keys() and torch.equal(batch.pooled, rows.pooled)
        for layer in rows.keys:
            assert torch.equal(batch.keys[layer], rows.keys[layer]), (prompts, layer)
            assert torch.equal(batch.values[layer], rows.values[layer]), (prompts, layer)
        assert batch.has_padding == (not bool(rows.mask.all()))
