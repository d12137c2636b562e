"""Which text encoder a training step uses: the LLM trained along for the first steps, then frozen and cached.

``train.llm_train_steps: N`` (with a trainable LLM: ``text.trainable`` or LLM adapters) trains the LLM on the DiT's
loss for the optimiser steps ``0 … N−1`` only. From step ``N`` on it is frozen — no gradients, evaluation mode,
its weights kept as they were at step ``N`` — and, with ``train.cache_text_context``, its contexts are cached
(:class:`fusedit.text.cache.CachedTextEncoder`) so that the rest of the run costs what a frozen-LLM run costs.

Its weights stay among the trained parameters: checkpoints, the EMA and ``final/`` keep saving them under ``llm.``
(they no longer change, and frozen parameters get no gradient, so neither AdamW's nor Muon's update — weight
decay included — touches them). The phase depends on the step alone, so a run resumed past ``N`` freezes at its
first step and continues exactly as the uninterrupted one (the cache encodes each caption alone).
"""

from __future__ import annotations

from typing import Any

from fusedit.text.cache import CachedTextEncoder


class TextEncoderPhases:
    """The text encoder of each step (see the module doc).

    Args:
        encoder: the run's text encoder (``encode``, ``trainable``; with ``trains_until`` also ``freeze()``).
        trains_until: ``train.llm_train_steps`` (``None``: a trainable LLM trains for the whole run).
        cache: ``train.cache_text_context``: cache the contexts of a frozen encoder (from the start when the LLM is
            frozen, from step ``trains_until`` when it trains first).
    """

    def __init__(self, encoder: Any, *, trains_until: int | None, cache: bool) -> None:
        trainable = bool(getattr(encoder, "trainable", False))
        if trains_until is not None:
            if not trainable:
                raise ValueError(
                    f"train.llm_train_steps={trains_until} trains the LLM for the first steps, but the LLM is "
                    f"frozen: set text.trainable=true (or train LLM adapters), or drop train.llm_train_steps"
                )
            if not callable(getattr(encoder, "freeze", None)):
                raise TypeError(
                    f"train.llm_train_steps needs a text encoder with a freeze() method; "
                    f"{type(encoder).__name__} has none"
                )
        elif trainable and cache:
            raise ValueError(
                "train.cache_text_context=true with a trainable text encoder: its contexts change every step; "
                "set train.cache_text_context=false, freeze the LLM, or train it for the first steps only "
                "(train.llm_train_steps)"
            )
        self.trains_until, self.cache = trains_until, cache
        self._trained = encoder if trainable else None
        self._frozen: Any = None if trainable else self._wrap(encoder)

    def _wrap(self, encoder: Any) -> Any:
        return CachedTextEncoder(encoder) if self.cache else encoder

    def llm_trains(self, step: int) -> bool:
        """Whether the LLM trains at optimiser step ``step`` (0-based: the step about to run)."""
        if self._trained is None or (self._frozen is not None):  # frozen from the start, or frozen already
            return False
        return self.trains_until is None or step < self.trains_until

    def at(self, step: int) -> Any:
        """The encoder for optimiser step ``step``; the first call at or past ``trains_until`` freezes the LLM."""
        if self.llm_trains(step):
            return self._trained
        if self._frozen is None:  # only a trainable encoder starts without its frozen form
            assert self._trained is not None
            self._trained.freeze()
            self._frozen = self._wrap(self._trained)
        return self._frozen

    def note(self, step: int, started_at: int) -> str | None:
        """The log line before optimiser step ``step`` of a run (re)started at ``started_at``, if any: the LLM stops
        training at this step, or the run resumed past the step where it stopped."""
        if self.trains_until is None or self._trained is None:
            return None
        if step == self.trains_until:
            return f"step {step}: the LLM stops training (train.llm_train_steps); frozen from here on"
        if step == started_at > self.trains_until:
            return f"resumed at step {step}, past train.llm_train_steps={self.trains_until}: the LLM stays frozen"
        return None
