"""The two text paths of a DiT, one class per ``model.fusion`` kind, resolved at build time.

Each path says three things, so that no other code decides them:

* :meth:`TextPath.requirements`: what the text encoder must capture (per-layer keys/values, or one hidden-state
  layer, and whether a pooled embedding is needed);
* :meth:`TextPath.block_modules`: the text modules of DiT block ``i`` (the source of the extra keys/values of its
  self-attention, and an optional cross-attention);
* :meth:`TextPath.prepare`: the text inputs of every block for one :class:`~fusedit.text.context.TextContext`.

Deep fusion (:class:`DeepFusion`, FuseDiT) hands DiT block ``i`` the keys/values that LLM layer ``layer_map[i]``'s
attention used; the image tokens follow the prompt's real tokens in RoPE positions (``docs/design.md``, "Deep
fusion"). Shallow fusion (:class:`ShallowFusion`) embeds one hidden-state layer of the LLM (RMSNorm + Linear) and
lets every block project it with its own weights; its text keys carry no RoPE, so image positions start at 0.
"""

from __future__ import annotations

from torch import nn

from fusedit.models.attention import (
    CrossAttention,
    LLMLayerKV,
    ProjectedKV,
    TextInputs,
    TextKeyNorm,
    TextLinearAdapter,
)
from fusedit.models.config import ResolvedModelConfig
from fusedit.models.layers import RMSNorm, SelfInitializing
from fusedit.text.context import TextContext, TextRequirements


class ContextEmbedder(SelfInitializing, nn.Sequential):
    """Shallow fusion's text embedding: RMSNorm -> Linear, ``(B, L, H_llm) -> (B, L, H_dit)``."""

    def __init__(self, llm_hidden_size: int, hidden_size: int, eps: float) -> None:
        super().__init__(RMSNorm(llm_hidden_size, eps), nn.Linear(llm_hidden_size, hidden_size))

    @property
    def linear(self) -> nn.Linear:
        linear = self[1]
        assert isinstance(linear, nn.Linear)
        return linear

    def reset_parameters(self) -> None:
        """The reference's initialisation: the projection ~ N(0, 0.02)."""
        nn.init.normal_(self.linear.weight, std=0.02)


class TextPath:
    """Interface of a fusion kind (see the module docstring). Not a module: the parameters it creates belong to the
    model (block modules, and :attr:`context_embedder` for shallow fusion)."""

    #: Whether image RoPE positions start after the prompt's real tokens (deep fusion) or at 0.
    image_follows_text: bool = True
    #: The text embedding of a path that reads the LLM's hidden state (shallow fusion; deep fusion with
    #: ``model.unfused_text: hidden``), registered on the model under this name; else None.
    context_embedder: ContextEmbedder | None = None

    def __init__(self, resolved: ResolvedModelConfig) -> None:
        self.resolved = resolved

    def requirements(self) -> TextRequirements:  # pragma: no cover - interface
        raise NotImplementedError

    def block_modules(self, index: int) -> tuple[nn.Module | None, CrossAttention | None]:  # pragma: no cover
        raise NotImplementedError

    def prepare(self, context: TextContext) -> list[TextInputs]:  # pragma: no cover - interface
        raise NotImplementedError

    def _cross_attention(self, source: nn.Module, key_norm: bool) -> CrossAttention:
        resolved = self.resolved
        return CrossAttention(
            resolved.hidden_size,
            resolved.num_attention_heads,
            resolved.head_dim,
            resolved.config.qk_norm,
            resolved.rms_norm_eps,
            source,
            key_norm=key_norm,
        )


class DeepFusion(TextPath):
    """FuseDiT: DiT block ``i`` attends to the keys/values of LLM layer ``resolved.layer_map[i]``.

    ``attention: self`` joins them to the image keys/values (post-RoPE keys); ``attention: cross`` reads them through
    a cross-attention (pre-RoPE keys, no key norm). ``model.text_key_rope: false`` gives the self-attention pre-RoPE
    keys and image positions from 0. A DiT layer past the map (``None``) attends to image tokens only, or, with
    ``model.unfused_text: hidden``, to the LLM's hidden state as the shallow baselines read it
    (:class:`ContextEmbedder`, then each layer's :class:`~fusedit.models.attention.ProjectedKV`; a cross-attention
    with key norm for ``attention: cross``)."""

    def __init__(self, resolved: ResolvedModelConfig) -> None:
        super().__init__(resolved)
        config = resolved.config
        #: the self-attention variant reads post-RoPE keys unless model.text_key_rope is false
        self.rotated_keys = config.attention == "self" and config.text_key_rope
        self.image_follows_text = config.text_key_rope
        if config.unfused_text == "hidden":
            self.context_embedder = ContextEmbedder(
                resolved.llm.hidden_size, resolved.hidden_size, resolved.rms_norm_eps
            )

    def requirements(self) -> TextRequirements:
        config, fused = self.resolved.config, self.resolved.fused_llm_layers
        hidden = config.text_hidden_states_index if self.context_embedder is not None else None
        if self.rotated_keys:
            return TextRequirements(kv_layers=fused, hidden_states_index=hidden, pooled=config.text_modulation)
        return TextRequirements(raw_key_layers=fused, hidden_states_index=hidden, pooled=config.text_modulation)

    def block_modules(self, index: int) -> tuple[nn.Module | None, CrossAttention | None]:
        llm_layer = self.resolved.layer_map[index]
        if llm_layer is None:
            return _projected_text(self) if self.context_embedder is not None else (None, None)
        if self.resolved.config.attention == "self":
            return LLMLayerKV(llm_layer, raw=not self.rotated_keys, adapter=self._adapter()), None
        return None, self._cross_attention(LLMLayerKV(llm_layer, raw=True, adapter=self._adapter()), key_norm=False)

    def _adapter(self) -> nn.Module | None:
        """One block's ``model.text_adapter`` (None for ``none``, the reference)."""
        resolved = self.resolved
        kind = resolved.config.text_adapter
        if kind == "key-norm":
            return TextKeyNorm(resolved.rms_norm_eps)
        if kind == "linear":
            return TextLinearAdapter(resolved.num_key_value_heads, resolved.head_dim)
        return None

    def prepare(self, context: TextContext) -> list[TextInputs]:
        """Per block: its LLM layer's keys/values ``(B, H_kv, L, D)`` and the key mask ``(B, L)`` (None without
        padding)."""
        key_mask = context.mask if context.has_padding else None
        keys = context.keys if self.rotated_keys else context.raw_keys
        hidden = _embedded(self, context) if self.context_embedder is not None else None
        return [
            TextInputs(hidden=None, key_mask=key_mask, keys=keys[layer], values=context.values[layer])
            if layer is not None
            else TextInputs(hidden=hidden, key_mask=key_mask)
            for layer in self.resolved.layer_map
        ]


class ShallowFusion(TextPath):
    """The baselines: one hidden-state layer of the LLM, embedded once (:class:`ContextEmbedder`), projected by each
    block's own ``text_k_proj``/``text_v_proj`` (:class:`~fusedit.models.attention.ProjectedKV`), joined to the image
    self-attention (``attention: self``) or read by a cross-attention (``attention: cross``)."""

    image_follows_text = False

    def __init__(self, resolved: ResolvedModelConfig) -> None:
        super().__init__(resolved)
        self.context_embedder = ContextEmbedder(resolved.llm.hidden_size, resolved.hidden_size, resolved.rms_norm_eps)

    def requirements(self) -> TextRequirements:
        config = self.resolved.config
        return TextRequirements(hidden_states_index=config.text_hidden_states_index, pooled=config.text_modulation)

    def block_modules(self, index: int) -> tuple[nn.Module | None, CrossAttention | None]:
        return _projected_text(self)

    def prepare(self, context: TextContext) -> list[TextInputs]:
        """Every block: the embedded hidden states ``(B, L, H_dit)`` and the key mask (None without padding)."""
        hidden = _embedded(self, context)
        key_mask = context.mask if context.has_padding else None
        return [TextInputs(hidden=hidden, key_mask=key_mask) for _ in range(self.resolved.num_layers)]


def _projected_text(path: TextPath) -> tuple[nn.Module | None, CrossAttention | None]:
    """A block that reads the embedded hidden state through its own keys/values: joined to its self-attention, or
    through a cross-attention with key norm (``attention: cross``)."""
    resolved = path.resolved
    source = ProjectedKV(resolved.hidden_size, resolved.num_key_value_heads, resolved.head_dim)
    if resolved.config.attention == "self":
        return source, None
    return None, path._cross_attention(source, key_norm=True)


def _embedded(path: TextPath, context: TextContext):
    """``(B, L, H_dit)``: the context's hidden-state layer through the path's :class:`ContextEmbedder`."""
    if context.hidden_states is None:
        raise ValueError(
            "this model reads the LLM's hidden states (context.hidden_states), which the context lacks; encode the "
            "prompts with a TextEncoder built from model.text_requirements()"
        )
    embedder = path.context_embedder
    assert embedder is not None
    return embedder(context.hidden_states.to(embedder.linear.weight.dtype))


def build_text_path(resolved: ResolvedModelConfig) -> TextPath:
    """The text path of ``model.fusion``."""
    return DeepFusion(resolved) if resolved.config.fusion == "deep" else ShallowFusion(resolved)
