"""A per-prompt cache of a frozen text encoder's contexts, for training on a finite caption set.

A frozen LLM maps the same caption to the same :class:`~fusedit.text.context.TextContext` at every step, so a data
set that repeats its captions (the shapes world has about 1,300 training captions) pays for the LLM again and again:
16 % of a demo training step on one CPU thread. :class:`CachedTextEncoder` encodes each caption *alone*, the first
time it is asked for, keeps its context row, and assembles a batch from rows with :meth:`TextContext.cat`. It also
keeps each row padded on the right to the longest caption seen, so that a batch is one concatenation per tensor
(1.3-1.7 ms instead of 2.5-2.9 ms for 32 shapes-world captions on one CPU thread, ``tools/bench_text_cache.py``),
giving the same tensors as concatenating the rows themselves.

Exactness: each row is encoded alone, so a row never depends on which batch first asked for it — a resumed run
rebuilds exactly the cache an uninterrupted one had. Rows differ from rows of a batched :meth:`encode` only by the
floating-point rounding of batched matrix products (same token positions: with ``padding: max_length`` a caption's
positions do not depend on its batch; padding columns are masked). Only a frozen encoder can be cached.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fusedit.text.context import TextContext, padding_among

#: default bound on cached captions (a shapes-world caption costs about 40 KB with the demo's tiny LLM)
DEFAULT_MAX_ENTRIES = 100_000


class CachedTextEncoder:
    """Wraps a frozen text encoder (``encode(prompts) -> TextContext``, ``trainable`` False) with a caption cache.

    Args:
        encoder: the frozen encoder.
        max_entries: captions kept; past it, new captions are encoded (alone, so results stay the same) but not kept.
    """

    trainable = False

    def __init__(self, encoder, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if getattr(encoder, "trainable", False):
            raise ValueError("a trainable text encoder cannot be cached: its contexts change with every step")
        if max_entries <= 0:
            raise ValueError(f"max_entries: got {max_entries}, expected a positive integer")
        self.encoder, self.max_entries = encoder, max_entries
        self._rows: dict[str, TextContext] = {}
        # the rows again, padded on the right to ``_width`` tokens (the longest row seen), so that a batch is one
        # concatenation per tensor instead of a pad and a concatenation per row
        self._padded: dict[str, TextContext] = {}
        self._width = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._rows)

    def _row(self, prompt: str) -> TextContext:
        row = self._rows.get(prompt)
        if row is not None:
            self.hits += 1
            return row
        self.misses += 1
        with torch.no_grad():
            row = self.encoder.encode([prompt])
        if len(self._rows) < self.max_entries:
            self._rows[prompt] = row
        return row

    def encode(self, prompts: Sequence[str]) -> TextContext:
        """``B`` prompts -> their :class:`TextContext` (``(B, H_kv, L, D)`` keys/values, ``L`` the longest row;
        shorter rows padded on the right and masked)."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError("CachedTextEncoder.encode expects a non-empty list of prompts")
        rows = [self._row(p) for p in prompts]
        if len(rows) == 1:
            return rows[0]
        length = max(row.length for row in rows)
        if length > self._width:  # a longer caption than any before: pad every row anew
            self._width = length
            self._padded.clear()
        batch = TextContext.cat([self._padded_row(p, row) for p, row in zip(prompts, rows, strict=True)])
        batch = batch.first_columns(length)  # the columns past every row's end: padding in all rows
        batch.remember_padding(padding_among(rows, length))  # of the rows, not of the padded copies
        return batch

    def _padded_row(self, prompt: str, row: TextContext) -> TextContext:
        """``row`` padded on the right to :attr:`_width` tokens (kept for the prompts the cache keeps)."""
        padded = self._padded.get(prompt)
        if padded is None:
            padded = row.padded_on_the_right(self._width)
            if prompt in self._rows:
                self._padded[prompt] = padded
        return padded
