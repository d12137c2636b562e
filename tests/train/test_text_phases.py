"""Which text encoder a step uses (:mod:`fusedit.train.text_phases`): a frozen one (cached or not), a trainable one
for the whole run, or one trained for the first ``train.llm_train_steps`` and then frozen and cached."""

from __future__ import annotations

import pytest

from fusedit.config import ConfigError
from fusedit.text.cache import CachedTextEncoder
from fusedit.train.config import TrainConfig
from fusedit.train.text_phases import TextEncoderPhases
from tests.train.fakes import FrozenTextEncoder, TrainableTextEncoder


def test_a_frozen_encoder_is_cached_from_the_first_step_when_asked():
    encoder = FrozenTextEncoder()
    cached = TextEncoderPhases(encoder, trains_until=None, cache=True)
    first = cached.at(0)
    assert isinstance(first, CachedTextEncoder) and first.encoder is encoder and cached.at(500) is first
    assert not cached.llm_trains(0)
    assert TextEncoderPhases(encoder, trains_until=None, cache=False).at(0) is encoder


def test_a_trainable_llm_without_a_limit_trains_at_every_step():
    encoder = TrainableTextEncoder()
    phases = TextEncoderPhases(encoder, trains_until=None, cache=False)
    assert all(phases.at(step) is encoder for step in (0, 1, 10**6)) and phases.llm_trains(10**6)
    assert encoder.trainable and all(p.requires_grad for p in encoder.proj.parameters())


@pytest.mark.parametrize("cache", [True, False])
def test_the_llm_trains_for_the_first_steps_then_freezes_for_good(cache):
    encoder = TrainableTextEncoder()
    phases = TextEncoderPhases(encoder, trains_until=3, cache=cache)
    assert [phases.llm_trains(step) for step in range(5)] == [True, True, True, False, False]
    assert all(phases.at(step) is encoder for step in range(3)) and encoder.trainable
    frozen = phases.at(3)
    assert not encoder.trainable and not any(p.requires_grad for p in encoder.proj.parameters())
    if cache:
        assert isinstance(frozen, CachedTextEncoder) and frozen.encoder is encoder
    else:
        assert frozen is encoder
    assert phases.at(4) is frozen and phases.at(1) is frozen and not phases.llm_trains(1)  # frozen stays frozen


def test_a_run_resumed_past_the_limit_starts_frozen():
    encoder = TrainableTextEncoder()
    phases = TextEncoderPhases(encoder, trains_until=3, cache=True)
    assert isinstance(phases.at(7), CachedTextEncoder) and not encoder.trainable


def test_contradictory_settings_are_refused_with_what_to_change():
    with pytest.raises(ValueError, match=r"train.llm_train_steps=5 .* the LLM is frozen: set text.trainable=true"):
        TextEncoderPhases(FrozenTextEncoder(), trains_until=5, cache=True)
    with pytest.raises(ValueError, match="train.cache_text_context=true with a trainable text encoder"):
        TextEncoderPhases(TrainableTextEncoder(), trains_until=None, cache=True)

    class NoFreeze(FrozenTextEncoder):
        trainable = True

    with pytest.raises(TypeError, match="freeze\\(\\) method; NoFreeze has none"):
        TextEncoderPhases(NoFreeze(), trains_until=5, cache=False)
    with pytest.raises(ConfigError, match="train.llm_train_steps: got 0, expected a positive step count"):
        TrainConfig(llm_train_steps=0).validate()


def test_the_log_says_when_the_llm_stops_training_or_stayed_frozen_over_a_resume():
    phases = TextEncoderPhases(TrainableTextEncoder(), trains_until=3, cache=False)
    notes = {step: phases.note(step, started_at=0) for step in range(6)}
    assert [step for step, note in notes.items() if note] == [3] and "stops training" in notes[3]
    assert "resumed at step 5, past train.llm_train_steps=3" in phases.note(5, started_at=5)
    assert phases.note(6, started_at=5) is None and phases.note(2, started_at=2) is None
    assert TextEncoderPhases(TrainableTextEncoder(), trains_until=None, cache=False).note(0, started_at=0) is None
