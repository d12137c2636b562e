"""The text conditioning of each denoising step, two ways (both are :class:`~fusedit.sampling.denoise.VelocityFn`).

* :class:`CachedText` (the default): the LLM ran once per call; every step reads the same text context (the
  unconditional one may even come from a cache kept across calls).
* :class:`JointText` (``use_text_cache=False``): nothing is kept; at every step the LLM runs inside the DiT's layer
  loop over ``[text ; image]`` (:func:`fusedit.reference.joint.joint_velocity`, the reference's formulation). The two
  agree to float precision (tested), which is what shows that the text context may be cached.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from fusedit.reference.joint import joint_velocity, llm_hidden_states
from fusedit.text.context import TextContext
from fusedit.text.encoder import TextEncoder, TokenizedPrompts


class CachedText:
    """Velocities from precomputed text contexts.

    Args:
        model: ``forward(x, timestep, context) -> velocity``.
        conditional: the prompts' context ``(B, ...)``.
        guided: the CFG context ``[unconditional ; conditional]`` ``(2B, ...)`` (None without guidance).
    """

    def __init__(self, model: Any, conditional: TextContext, guided: TextContext | None = None) -> None:
        self.model, self.conditional, self.guided = model, conditional, guided
        self.dtype = next(model.parameters()).dtype

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, guided: bool) -> torch.Tensor:
        context = self.guided if guided else self.conditional
        if context is None:
            raise ValueError("a guided step needs the unconditional context; build CachedText with guided=...")
        return self.model(x.to(self.dtype), timestep, context)


class JointText:
    """Velocities of the reference's formulation: the LLM runs inside every step (see the module docstring).

    Args:
        model: the DiT.
        llm: the Hugging Face decoder whose layers run inside the DiT's loop.
        conditional: the prompts' tokens ``(B, L)`` (padding included, as the tokenizer made them).
        guided: the CFG rows' tokens ``[unconditional ; conditional]`` ``(2B, L')``, or None without guidance.
        pooled: ``pooled(guided) -> (N, P)``, the pooled text embedding of text modulation for those rows, recomputed
            at every step (None when the model has no text modulation).
    """

    def __init__(
        self,
        model: Any,
        llm: Any,
        conditional: TokenizedPrompts,
        guided: TokenizedPrompts | None = None,
        pooled: Callable[[bool], torch.Tensor | None] | None = None,
    ) -> None:
        self.model, self.llm = model, llm
        self.conditional, self.guided, self.pooled = conditional, guided, pooled
        self.dtype = next(model.parameters()).dtype

    @classmethod
    def for_prompts(
        cls,
        model: Any,
        text_encoder: TextEncoder,
        prompts: Sequence[str],
        negatives: Sequence[str] | None = None,
        max_length: int | None = None,
    ) -> JointText:
        """Tokenize ``prompts`` (and the CFG rows ``negatives + prompts``, one negative per image) with the text
        encoder's formatting; the pooled embedding (CLIP, or the mean of the LLM's last state) is recomputed at
        every step."""
        rows = {False: list(prompts), True: None if negatives is None else list(negatives) + list(prompts)}
        tokens = {k: None if v is None else text_encoder.tokenize(v, max_length) for k, v in rows.items()}

        def pooled(guided: bool) -> torch.Tensor | None:
            if not model.text_requirements().pooled:
                return None
            if text_encoder.pooled_encoder is not None:
                assert text_encoder.formatter is not None
                texts = [text_encoder.formatter.format(p) for p in rows[guided] or []]
                return text_encoder.pooled_encoder(texts).to(text_encoder.dtype)
            t = tokens[guided]
            assert t is not None
            last = llm_hidden_states(text_encoder.decoder, t.input_ids, t.attention_mask)[-1]
            weights = t.attention_mask[..., None].to(last.dtype)
            return (last * weights).sum(1) / weights.sum(1).clamp_min(1)

        conditional = tokens[False]
        assert conditional is not None
        return cls(model, text_encoder.decoder, conditional, tokens[True], pooled)

    @property
    def num_truncated(self) -> int:
        """Prompts cut at the maximum length (the conditional ones, and the negatives when guided)."""
        guided = self.guided.num_truncated if self.guided is not None else 0
        return max(self.conditional.num_truncated, guided)

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, guided: bool) -> torch.Tensor:
        tokens = self.guided if guided else self.conditional
        if tokens is None:
            raise ValueError("a guided step needs the unconditional rows; build JointText with guided=...")
        pooled = self.pooled(guided) if self.pooled is not None else None
        return joint_velocity(
            self.model, self.llm, x.to(self.dtype), timestep, tokens.input_ids, tokens.attention_mask, pooled=pooled
        )
