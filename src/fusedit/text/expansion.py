"""Prompt expansion by the frozen LLM itself: every prompt is followed by the LLM's own greedy continuation.

``text.expansion: greedy`` turns ``"a red circle and a blue square"`` into ``"a red circle and a blue square . the
circle is red. the square is blue."`` before the prompt is encoded, when the LLM's continuation of ``prompt +
text.expansion_separator`` is that restatement (as the shapes world's tiny LLM, pretrained on captions each followed
by a restatement of its content, continues it). The DiT then reads the prompt's keys and values and those of what
the LLM made of it: in the restatement each color word comes right after its shape word, so the states of the color
words carry which shape they belong to. A decoder-only LLM can do this where an encoder cannot; it is the same kind
of use as an LLM rewriting prompts for a T2I model, done by the text model the DiT is fused with.

Conventions:

* The LLM sees ``prompt + separator`` exactly (with its tokenizer's special tokens, no instruction prefix or chat
  template: those are applied to the expanded prompt afterwards, by :class:`~fusedit.text.encoder.PromptFormatter`).
* Greedy decoding (deterministic), at most ``max_new_tokens`` tokens, stopping at the tokenizer's end-of-sequence
  token; special tokens are dropped from the text; the expanded prompt is ``prompt + separator + " " + continuation``.
* The empty prompt (CFG's unconditional prompt, dropped captions) stays empty.
* Continuations are remembered per prompt for the life of the expander (training sees the same captions again and
  again, sampling the same prompts at every step and image). :meth:`PromptExpander.expand_all` generates the new
  prompts of a batch together, grouped by token length so that no row is padded: a prompt's continuation does not
  depend on the batch it first came in (tested against generating it alone).

Cost: a second copy of the LLM with its output head (the encoder keeps only the layers the DiT reads), and one
generation per distinct prompt; longer text contexts (set ``text.max_length`` for prompt plus continuation). The
copy stays frozen: with ``text.trainable`` the continuations are the pretrained LLM's, computed once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fusedit.text.llm import load_causal_lm


class PromptExpander:
    """Appends a causal LM's greedy continuation to every non-empty prompt (see the module docstring)."""

    def __init__(self, model: nn.Module, tokenizer, separator: str, max_new_tokens: int):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.separator = separator
        self.max_new_tokens = max_new_tokens
        self._continuations: dict[str, str] = {}

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, tokenizer, separator: str, max_new_tokens: int, device="cpu"
    ) -> PromptExpander:
        """The expander of the causal LM at ``name_or_path`` (a local folder or hub id), in float32 on ``device``."""
        return cls(load_causal_lm(name_or_path).to(device), tokenizer, separator, max_new_tokens)

    def continuation(self, prompt: str) -> str:
        """The LLM's greedy continuation of ``prompt + separator`` (remembered)."""
        if prompt not in self._continuations:
            self._remember([prompt])
        return self._continuations[prompt]

    def expand(self, prompt: str) -> str:
        """``prompt + separator + " " + continuation``; the empty prompt stays empty."""
        if prompt == "":
            return ""
        return f"{prompt}{self.separator} {self.continuation(prompt)}".rstrip()

    def expand_all(self, prompts: Sequence[str]) -> list[str]:
        """:meth:`expand` of every prompt, the new ones generated in batches."""
        self._remember([p for p in prompts if p != "" and p not in self._continuations])
        return [self.expand(p) for p in prompts]

    def _remember(self, prompts: Sequence[str], batch_size: int = 64) -> None:
        """Generate and remember the continuations of ``prompts``, in batches of prompts of one token length."""
        by_length: dict[int, list[str]] = {}
        for prompt in dict.fromkeys(prompts):
            by_length.setdefault(len(self.tokenizer(prompt + self.separator)["input_ids"]), []).append(prompt)
        for group in by_length.values():
            for start in range(0, len(group), batch_size):
                chunk = group[start : start + batch_size]
                self._continuations.update(zip(chunk, self._generate(chunk), strict=True))

    def _generate(self, prompts: Sequence[str]) -> list[str]:
        """Greedy continuations of prompts of one token length (so that no row is padded)."""
        device = next(self.model.parameters()).device
        inputs = self.tokenizer([p + self.separator for p in prompts], return_tensors="pt").to(device)
        with torch.no_grad():
            out = self.model.generate(  # type: ignore[operator]
                **inputs,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        return [text.strip() for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def expand_ahead(text_encoder, dataset) -> int:
    """Generate the continuations of every caption ``dataset`` knows up front (``dataset.known_captions()``, e.g. the
    shapes world's training prompts) in one batched pass, when ``text_encoder`` expands prompts; returns how many.

    Without it the caption cache asks for a training batch's new captions at a time: the same continuations, in
    small groups (measured on the demo: about 50 s instead of 7 s for the 1,336 captions).
    """
    expander = getattr(getattr(text_encoder, "formatter", None), "expander", None)
    known = getattr(dataset, "known_captions", None)
    if expander is None or known is None:
        return 0
    captions = known()
    expander.expand_all(captions)
    return len(captions)
