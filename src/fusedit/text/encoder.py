"""The text encoder: prompts -> tokens -> one LLM forward -> :class:`TextContext`.

Keys and values are captured from the LLM's own forward through a recording ``Cache``: every attention layer hands
its (post-RoPE, post-norm) keys and values to ``cache.update``, so what we keep is exactly what the Hugging Face
model's attention used, for any model family, with no re-implementation of its layers. Pre-RoPE keys (needed by
cross-attention deep fusion) come from forward hooks on the key projection (or key norm, where the family has one).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fusedit.text.config import TextConfig
from fusedit.text.context import TextContext, TextRequirements
from fusedit.text.expansion import PromptExpander
from fusedit.text.llm import decoder_forward_kwargs, load_llm, load_tokenizer, resolve_dtype
from fusedit.text.pooled import load_clip_pooler

logger = logging.getLogger(__name__)


@dataclass
class TokenizedPrompts:
    """``input_ids`` / ``attention_mask``: ``(B, L)``; ``num_truncated``: prompts cut at the max length."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    num_truncated: int = 0
    truncated_indices: list[int] = field(default_factory=list)


def _make_recording_cache(wanted: set[int]):
    from transformers import DynamicCache

    class RecordingCache(DynamicCache):
        def __init__(self) -> None:
            super().__init__()
            self.recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            if layer_idx in wanted:
                self.recorded[layer_idx] = (key_states, value_states)
            # Nothing is stored: the prompt is processed in one call, so attention needs only this call's states.
            return key_states, value_states

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return 0

    return RecordingCache()


def trim_padding_columns(input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Drop the leading and trailing columns that are padding in every row of ``(B, L)`` token ids.

    Returns ``(ids, mask, offset)`` where ``offset`` is the number of leading columns dropped (the position of the
    first kept column). Exact for causal LMs: no real token attends to a dropped column.
    """
    used = mask.bool().any(dim=0).nonzero().squeeze(1)
    if used.numel() == 0:
        return input_ids, mask, 0
    start, end = int(used[0]), int(used[-1]) + 1
    return input_ids[:, start:end], mask[:, start:end], start


def _capture_heads(slot: dict, name: str, head_dim: int, heads_last: bool):
    """A forward hook storing its module's output as ``(B, H, L, D)`` in ``slot[name]``."""

    def hook(_module, _inputs, output):
        if heads_last:  # (B, L, H, D) from a per-head norm
            slot[name] = output.transpose(1, 2)
        else:  # (B, L, H·D) from a projection
            b, n, _ = output.shape
            slot[name] = output.view(b, n, -1, head_dim).transpose(1, 2)

    return hook


class PromptFormatter:
    """Instruction prefix, chat template and tokenization, as in the reference's data pipeline.

    Non-empty prompts get ``instruction + prompt`` (and the chat template, when enabled); the empty prompt (CFG's
    unconditional prompt, dropped captions) stays empty. With ``padding: max_length`` every prompt is padded to
    ``max_length + len(instruction tokens)`` like the reference.
    """

    def __init__(self, tokenizer, config: TextConfig, expander: PromptExpander | None = None):
        self.tokenizer = tokenizer
        self.config = config
        #: ``text.expansion``: what appends the LLM's continuation to every non-empty prompt (None: nothing)
        self.expander = expander
        self.instruction_length = self._instruction_length()
        self._unknown_told: set[str] = set()  # unknown words already named in a warning

    def _instruction_length(self) -> int:
        instruction = self.config.instruction.rstrip()
        if self.config.chat_template:
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return len(ids)
        # Minus one for the BOS token the tokenizer adds to every prompt (the reference's convention).
        return max(len(self.tokenizer(instruction).input_ids) - 1, 0)

    def max_tokens(self, max_length: int | None = None) -> int:
        """Token budget of one prompt: ``max_length`` (default ``text.max_length``) plus the instruction."""
        if max_length is not None and max_length <= 0:
            raise ValueError(f"max_sequence_length must be positive, got {max_length}")
        return (max_length or self.config.max_length) + self.instruction_length

    def format(self, prompt: str) -> str:
        if not isinstance(prompt, str):
            raise TypeError(f"prompts must be strings, got {type(prompt).__name__}: {prompt!r}")
        if prompt == "":
            return ""
        if self.expander is not None:
            prompt = self.expander.expand(prompt)
        text = self.config.instruction + prompt
        if self.config.chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        return text

    def __call__(self, prompts: Sequence[str], device=None, max_length: int | None = None) -> TokenizedPrompts:
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) == 0:
            raise ValueError("no prompts given: expected a non-empty list of strings")
        if self.expander is not None:  # the new prompts' continuations generated together
            self.expander.expand_all([p for p in prompts if isinstance(p, str)])
        texts = [self.format(p) for p in prompts]
        unknown = [w for w in unknown_words(self.tokenizer, texts) if w not in self._unknown_told]
        if unknown:  # once per word (a fine-tuning run encodes the same unknown word at every step)
            self._unknown_told.update(unknown)
            logger.warning(
                "the tokenizer does not know %s: read as its unknown token %s, so the model sees no meaning in %s "
                "(a word-level tokenizer, like the shapes world's tiny LLM's, knows only the words it was built from)",
                ", ".join(repr(w) for w in unknown),
                self.tokenizer.unk_token,
                "it" if len(unknown) == 1 else "them",
            )
        add_special = not self.config.chat_template
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=add_special).input_ids]
        budget = self.max_tokens(max_length)
        truncated = [i for i, n in enumerate(lengths) if n > budget]
        encoded = self.tokenizer(
            texts,
            return_tensors="pt",
            padding="max_length" if self.config.padding == "max_length" else "longest",
            truncation=True,
            max_length=budget,
            add_special_tokens=add_special,
        )
        mask = encoded.attention_mask.bool()
        if not bool(mask.any(dim=1).all()):
            raise ValueError(
                "a prompt produced no tokens (the tokenizer adds no BOS and the prompt is empty); "
                "use a tokenizer that adds a BOS token or give non-empty prompts"
            )
        return TokenizedPrompts(
            input_ids=encoded.input_ids.to(device),
            attention_mask=mask.to(device),
            num_truncated=len(truncated),
            truncated_indices=truncated,
        )


def unknown_words(tokenizer, texts: Sequence[str]) -> list[str]:
    """The distinct pieces of ``texts`` that ``tokenizer`` maps to its unknown token, in order of appearance (none for
    a tokenizer without one, such as byte-level BPE, or without offsets, i.e. not a fast tokenizer)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not getattr(tokenizer, "is_fast", False):
        return []
    encoded = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    found: dict[str, None] = {}
    for text, ids, offsets in zip(texts, encoded["input_ids"], encoded["offset_mapping"], strict=True):
        found.update((text[start:end], None) for token, (start, end) in zip(ids, offsets, strict=True) if token == unk)
    return list(found)


class TextEncoder(nn.Module):
    """The (frozen) LLM as a key/value provider.

    ``encode(prompts)`` runs the LLM once and returns a :class:`TextContext` holding what ``requirements`` asks
    for. Frozen (the default): parameters have ``requires_grad=False`` and the forward runs under
    ``torch.inference_mode``-like ``no_grad``, so no autograd graph or activations are kept.
    """

    def __init__(
        self,
        decoder: Any,
        tokenizer,
        config: TextConfig,
        requirements: TextRequirements,
        pooled_encoder: nn.Module | None = None,
        execution_device: torch.device | str | None = None,
        expander: PromptExpander | None = None,
    ):
        super().__init__()
        #: ``text.offload``: the device the LLM runs on; its weights rest where they are (the CPU) between batches
        self.execution_device = torch.device(execution_device) if config.offload and execution_device else None
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.config = config
        self.requirements = requirements
        #: how the last hidden state is pooled for text modulation when no separate pooled encoder gives it
        self._pool = last_token_pool if config.pooled == "llm-last" else mean_pool
        # Without a tokenizer only encode_tokens() works (tests, benchmarks feeding token ids directly).
        self.formatter = PromptFormatter(tokenizer, config, expander) if tokenizer is not None else None
        self.pooled_encoder = pooled_encoder
        self._cache_arg = decoder_forward_kwargs(decoder)
        self.trainable = config.trainable
        if self.trainable:
            self.decoder.requires_grad_(True)
        else:
            self.freeze()
        self._truncate_unused_layers()

    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: TextConfig, requirements: TextRequirements, device="cpu") -> TextEncoder:
        """Load the LLM and tokenizer named by ``config`` (local path or hub id)."""
        dtype = resolve_dtype(config.dtype, device)
        decoder = load_llm(
            config.llm, dtype=dtype, attention=config.attention, quantization=config.quantization, device=device
        )
        if config.quantization == "none":  # an 8-bit model is loaded on its device
            decoder = decoder.to("cpu" if config.offload else device)
        tokenizer = load_tokenizer(config.tokenizer or config.llm, padding_side=config.padding_side)
        pooled = None
        if requirements.pooled and config.pooled == "clip":
            assert config.clip_model is not None  # TextConfig.validate requires it
            pooled = load_clip_pooler(config.clip_model, device=device)
        expander = None
        if config.expansion == "greedy":
            expander = PromptExpander.from_pretrained(
                config.llm, tokenizer, config.expansion_separator, config.expansion_max_new_tokens, device=device
            )
        return cls(
            decoder, tokenizer, config, requirements, pooled_encoder=pooled, execution_device=device, expander=expander
        )

    def _truncate_unused_layers(self) -> None:
        """Keep only the LLM layers the model reads (a deep-fusion model never needs the layers past its map)."""
        if self.requirements.hidden_states_index is not None or self.requirements.pooled:
            return
        keep = self.requirements.last_layer + 1
        if 0 < keep < len(self.decoder.layers):
            self.decoder.layers = self.decoder.layers[:keep]

    @property
    def device(self) -> torch.device:
        """Where the LLM runs and the context is returned (with ``text.offload``, not where its weights rest)."""
        return self.execution_device or next(self.decoder.parameters()).device

    @contextlib.contextmanager
    def _on_execution_device(self):
        """``text.offload``: the LLM's weights on the execution device for the duration of one encoding, then back
        on the device they rest on (also after an error)."""
        if self.execution_device is None:
            yield
            return
        resting = next(self.decoder.parameters()).device
        self.decoder.to(self.execution_device)
        try:
            yield
        finally:
            self.decoder.to(resting)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.decoder.parameters()).dtype

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        """Parameters to optimise (empty when frozen)."""
        return [p for p in self.decoder.parameters() if p.requires_grad] if self.trainable else []

    def freeze(self) -> None:
        """Stop training the LLM (``train.llm_train_steps``): no gradients, evaluation mode, :attr:`trainable` off.
        Its weights stay as they are; the trainer keeps saving them."""
        self.trainable = False
        self.decoder.requires_grad_(False)
        self.decoder.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.trainable:
            self.decoder.eval()
        return self

    # ------------------------------------------------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str], max_length: int | None = None) -> TokenizedPrompts:
        if self.formatter is None:
            raise RuntimeError("this TextEncoder has no tokenizer; use encode_tokens(input_ids, attention_mask)")
        return self.formatter(prompts, device=self.device, max_length=max_length)

    def encode(self, prompts: Sequence[str], max_length: int | None = None) -> TextContext:
        """Run the LLM on ``prompts`` and return their :class:`TextContext` (``max_length`` overrides
        ``text.max_length`` for this call).

        With ``text.trim`` the token columns that are padding in every prompt are dropped *before* the LLM runs
        (exact: the remaining tokens keep their positions), so a batch padded to 256 tokens of which 96 are real
        costs the LLM 96 tokens.
        """
        if self.formatter is None:
            raise RuntimeError("this TextEncoder has no tokenizer; use encode_tokens(input_ids, attention_mask)")
        tokens = self.formatter(prompts, device=None, max_length=max_length)
        context = self.encode_padded(tokens.input_ids, tokens.attention_mask)
        if self.pooled_encoder is not None:
            context.pooled = self.pooled_encoder([self.formatter.format(p) for p in prompts]).to(self.dtype)
        context.num_truncated = tokens.num_truncated
        return context

    def encode_padded(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextContext:
        """Token ids padded to a common length ``(B, L)`` -> :class:`TextContext`; with ``text.trim`` the columns that
        are padding in every row are dropped before the LLM runs (positions kept, exact)."""
        offset = 0
        if self.config.trim:
            input_ids, attention_mask, offset = trim_padding_columns(input_ids, attention_mask)
        padding = not bool(attention_mask.all())  # read where the mask was made: no device sync, no graph break
        context = self.encode_tokens(input_ids.to(self.device), attention_mask.to(self.device), position_offset=offset)
        context.remember_padding(padding)
        return context

    def encode_tokens(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_offset: int = 0
    ) -> TextContext:
        """``input_ids``/``attention_mask``: ``(B, L)`` -> :class:`TextContext` (keys/values ``(B, H_kv, L, D)``).

        ``position_offset``: position of column 0 (non-zero when leading padding columns were dropped).
        """
        grad = torch.enable_grad() if (self.trainable and torch.is_grad_enabled()) else torch.no_grad()
        with grad, self._on_execution_device():
            return self._encode(input_ids, attention_mask.bool(), position_offset)

    def _encode(self, input_ids: torch.Tensor, mask: torch.Tensor, position_offset: int) -> TextContext:
        req = self.requirements
        wanted = set(req.kv_layers)
        cache = _make_recording_cache(wanted)
        raw: dict[int, dict[str, torch.Tensor]] = {}
        need_hidden = req.hidden_states_index is not None or (req.pooled and self.pooled_encoder is None)
        positions = None
        if position_offset:
            positions = torch.arange(position_offset, position_offset + input_ids.shape[1], device=input_ids.device)
            positions = positions[None].expand(input_ids.shape[0], -1)
        with self._raw_key_hooks(req.raw_key_layers, raw):
            outputs = self.decoder(
                input_ids=input_ids,
                attention_mask=mask.long(),
                position_ids=positions,
                use_cache=True,
                output_hidden_states=need_hidden,
                **{self._cache_arg: cache},
            )
        keep = mask[:, None, :, None]

        def clean(t: torch.Tensor) -> torch.Tensor:
            # Padded slots are masked for every image query; zero them so no NaN/garbage can leak through 0·x.
            return torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device))

        missing = wanted - set(cache.recorded)
        if missing:
            raise RuntimeError(
                f"the LLM did not report keys/values for layers {sorted(missing)}; "
                f"it has {len(self.decoder.layers)} layers"
            )
        context = TextContext(
            mask=mask,
            keys={i: clean(cache.recorded[i][0]) for i in req.kv_layers},
            values={i: clean(cache.recorded[i][1]) for i in req.kv_layers},
            raw_keys={i: clean(raw[i]["k"]) for i in req.raw_key_layers},
        )
        for i in req.raw_key_layers:
            context.values[i] = clean(raw[i]["v"])
        if need_hidden:
            hidden = outputs.hidden_states[req.hidden_states_index if req.hidden_states_index is not None else -1]
            hidden = hidden * mask[..., None].to(hidden.dtype)
            if req.hidden_states_index is not None:
                context.hidden_states = hidden
            if req.pooled and self.pooled_encoder is None:
                context.pooled = self._pool(hidden, mask)
        return context

    @contextlib.contextmanager
    def _raw_key_hooks(self, layers: Sequence[int], out: dict):
        """Capture pre-RoPE keys (after the key norm, if any) and values of ``layers`` with forward hooks."""
        handles = []
        try:
            for index in layers:
                attn = self.decoder.layers[index].self_attn
                key_norm = getattr(attn, "k_norm", None)
                key_module = key_norm if isinstance(key_norm, nn.Module) else attn.k_proj
                slot = out.setdefault(index, {})
                handles.append(
                    key_module.register_forward_hook(
                        _capture_heads(slot, "k", attn.head_dim, heads_last=key_module is not attn.k_proj)
                    )
                )
                handles.append(attn.v_proj.register_forward_hook(_capture_heads(slot, "v", attn.head_dim, False)))
            yield
        finally:
            for handle in handles:
                handle.remove()


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``text.pooled: llm-mean``: the mean of the last hidden state ``hidden (B, L, D)`` over the real tokens
    ``mask (B, L)``. Returns ``(B, D)``."""
    weights = mask[..., None].to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)


def last_token_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``text.pooled: llm-last``: the last hidden state ``hidden (B, L, D)`` at each prompt's last real token (the
    rightmost ``True`` of ``mask (B, L)``, so left and right padding give the same vector), the one state of a causal
    LLM that has read the whole prompt. Returns ``(B, D)``."""
    slots = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask, slots, torch.zeros_like(slots)).amax(1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
