"""The text context: everything a DiT needs from the LLM for one prompt batch.

Because text rows of FuseDiT's joint attention never see image tokens, the text stream does not depend on the image,
the timestep or the noise (``docs/design.md``, "The LLM as a key/value provider"). The LLM therefore runs once per
prompt batch and leaves, for every fused layer, the keys and values its attention used. Deep fusion reads those; the
shallow baselines read one hidden-state layer. :class:`TextRequirements` says which of them a model needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


def _present(tensor: torch.Tensor | None) -> torch.Tensor:
    """``tensor``, which the contexts being concatenated all have (the first one has it)."""
    if tensor is None:
        raise ValueError("TextContext.cat: the contexts differ in which fields they hold")
    return tensor


@dataclass
class TextContext:
    """Per-prompt-batch output of :class:`fusedit.text.TextEncoder`.

    Shapes: ``B`` prompts, ``L`` text tokens (padding included), ``H_kv`` key/value heads, ``D`` head_dim.

    Attributes:
        mask: ``(B, L)`` bool, True for real tokens (False for padding).
        keys: LLM layer index -> ``(B, H_kv, L, D)`` keys as that layer's attention used them (after RoPE and any
            key norm). Present for the layers the model fuses.
        values: LLM layer index -> ``(B, H_kv, L, D)`` values.
        raw_keys: LLM layer index -> ``(B, H_kv, L, D)`` keys *before* RoPE (cross-attention deep fusion).
        hidden_states: ``(B, L, H_llm)`` the hidden-state layer the shallow baselines use, or None.
        pooled: ``(B, P)`` pooled text embedding for text modulation, or None.
        num_truncated: how many prompts of the batch were cut at ``max_length`` (reported, not an error).
    """

    mask: torch.Tensor
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    raw_keys: dict[int, torch.Tensor] = field(default_factory=dict)
    hidden_states: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    num_truncated: int = 0

    @property
    def has_padding(self) -> bool:
        """Whether any token is padding. Cached after the first call: the mask never changes in place, and this
        avoids one host-device synchronisation per model forward (e.g. per sampling step)."""
        cached = self.__dict__.get("_has_padding")
        if cached is None:
            cached = self.__dict__["_has_padding"] = not bool(self.mask.all())
        return cached

    def remember_padding(self, has_padding: bool) -> None:
        """Set :attr:`has_padding` from what the caller already knows (e.g. read from the mask on the host before
        it moved to the device), so that reading it never synchronises, nor breaks a compiled graph."""
        self.__dict__["_has_padding"] = bool(has_padding)

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    @property
    def num_real(self) -> torch.Tensor:
        """``(B,)`` number of real (non-padding) tokens per prompt."""
        return self.mask.sum(dim=1)

    def _map(self, fn) -> TextContext:
        def on(d):
            return {k: fn(v, 2) for k, v in d.items()}

        return replace(
            self,
            mask=fn(self.mask, 1),
            keys=on(self.keys),
            values=on(self.values),
            raw_keys=on(self.raw_keys),
            hidden_states=None if self.hidden_states is None else fn(self.hidden_states, 1),
        )

    def trimmed(self) -> TextContext:
        """Drop token columns that are padding in every prompt (exact: those keys are masked anyway).

        Positions are already baked into the keys and image positions depend only on :attr:`num_real`, so trimming
        changes no output. Returns ``self`` when nothing can be dropped.
        """
        used = self.mask.any(dim=0)
        if bool(used.all()):
            return self
        index = used.nonzero().squeeze(1)
        return self._map(lambda t, dim: t.index_select(dim, index))

    def select(self, rows: slice) -> TextContext:
        """The prompts ``rows`` of the batch (e.g. the conditional half of a ``[uncond ; cond]`` context), with
        columns that are padding in all of them dropped (:meth:`trimmed`)."""

        def take(t, _dim):
            return t[rows]

        out = self._map(take)
        if self.pooled is not None:
            out = replace(out, pooled=take(self.pooled, 0))
        return out.trimmed()

    def repeat(self, times: int) -> TextContext:
        """Repeat every prompt ``times`` times along the batch (prompt-major: p0, p0, ..., p1, ...)."""

        def rep(t, _dim):
            return t.repeat_interleave(times, dim=0)

        out = self._map(rep)
        if self.pooled is not None:
            out = replace(out, pooled=rep(self.pooled, 0))
        return out

    def to(self, device=None, dtype=None) -> TextContext:
        """Move tensors; ``dtype`` applies to floating tensors only."""

        def move(t, _dim):
            if t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        out = self._map(move)
        if self.pooled is not None:
            out = replace(out, pooled=move(self.pooled, 0))
        return out

    def padded_on_the_right(self, length: int) -> TextContext:
        """The context with masked zero columns appended up to ``length`` tokens (``self`` when it has them)."""
        if length < self.length:
            raise ValueError(f"cannot pad a context of {self.length} tokens to {length}")
        if length == self.length:
            return self

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            shape = list(t.shape)
            shape[dim] = length - t.shape[dim]
            return torch.cat([t, torch.zeros(shape, dtype=t.dtype, device=t.device)], dim=dim)

        return self._map(pad)

    def first_columns(self, length: int) -> TextContext:
        """The first ``length`` token columns (views; exact when the others are padding in every prompt)."""
        return self if length == self.length else self._map(lambda t, dim: t.narrow(dim, 0, length))

    @staticmethod
    def cat(contexts: list[TextContext]) -> TextContext:
        """Concatenate contexts along the batch; lengths are padded to the longest (pad columns masked).

        Padding is added on the side where the first context has its padding (left when ``mask[:, 0]`` has
        padding, else right), so the keys of real tokens keep their positions.
        """
        if len(contexts) == 1:
            return contexts[0]
        length = max(c.length for c in contexts)
        left = any(bool((~c.mask[:, 0]).any()) for c in contexts)

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            missing = length - t.shape[dim]
            if missing == 0:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            filler = torch.zeros(shape, dtype=t.dtype, device=t.device)
            return torch.cat([filler, t] if left else [t, filler], dim=dim)

        padded = [c._map(pad) for c in contexts]
        first = padded[0]

        def cat_dict(name):
            return {k: torch.cat([getattr(c, name)[k] for c in padded], dim=0) for k in getattr(first, name)}

        out = TextContext(
            mask=torch.cat([c.mask for c in padded], dim=0),
            keys=cat_dict("keys"),
            values=cat_dict("values"),
            raw_keys=cat_dict("raw_keys"),
            hidden_states=None
            if first.hidden_states is None
            else torch.cat([_present(c.hidden_states) for c in padded]),
            pooled=None if first.pooled is None else torch.cat([_present(c.pooled) for c in contexts]),
            num_truncated=sum(c.num_truncated for c in contexts),
        )
        out.remember_padding(padding_among(contexts, length))
        return out


def padding_among(contexts: list[TextContext], length: int) -> bool:
    """Whether a batch of ``contexts`` at ``length`` tokens has padding: a row shorter than ``length`` or with padding
    of its own. Known from the rows (each row's answer is cached), so that a compiled forward reading the batch's
    :attr:`TextContext.has_padding` does not synchronise."""
    return any(c.length < length or c.has_padding for c in contexts)


@dataclass(frozen=True)
class TextRequirements:
    """What a model reads from the text context (see ``model.text_requirements()``).

    Attributes:
        kv_layers: LLM layers whose keys/values are needed (deep fusion, self-attention).
        raw_key_layers: LLM layers whose pre-RoPE keys and values are needed (deep fusion, cross-attention).
        hidden_states_index: ``hidden_states`` entry for the shallow baselines (None: not needed).
        pooled: whether a pooled embedding is needed (text modulation).
    """

    kv_layers: tuple[int, ...] = ()
    raw_key_layers: tuple[int, ...] = ()
    hidden_states_index: int | None = None
    pooled: bool = False

    @property
    def last_layer(self) -> int:
        """Index of the deepest LLM layer that must run (-1: none)."""
        return max(self.kv_layers + self.raw_key_layers, default=-1)
