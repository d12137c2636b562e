"""The diffusion transformer: one block type and one model type for deep fusion and the shallow baselines.

Every variant of DESIGN.md §3 is resolved by :func:`build_model` into submodules (position encoder, timestep
conditioner, per-layer text source, optional cross-attention, optional sandwich norms); ``forward`` has no config
branches.
"""
from __future__ import annotations

from typing import Optional

import torch
from diffusers.models.embeddings import PatchEmbed
from torch import nn
from torch.utils.checkpoint import checkpoint

from fusedit.models.attention import CrossAttention, LLMLayerKV, ProjectedKV, SelfAttention, TextInputs
from fusedit.models.config import ResolvedModelConfig
from fusedit.models.layers import GeGLU, RMSNorm, Rope
from fusedit.models.positions import build_positions
from fusedit.models.prediction import build_prediction
from fusedit.models.timestep import Conditioning, build_timestep_variant, modulate
from fusedit.text.context import TextContext
from fusedit.text.encoder import TextRequirements


class DiTBlock(nn.Module):
    """Pre-norm block: (modulated) RMSNorm -> self-attention [-> sandwich norm] -> gated residual
    [-> cross-attention -> sandwich norm -> residual] -> (modulated) RMSNorm -> GeGLU [-> sandwich norm] -> gated
    residual. ``x``: ``(B, N, H)``."""

    def __init__(self, r: ResolvedModelConfig, self_text: Optional[nn.Module], cross_attn: Optional[CrossAttention],
                 layer_modulation: Optional[type]):
        super().__init__()
        c, eps, hidden = r.config, r.rms_norm_eps, r.hidden_size
        self.input_layernorm = RMSNorm(hidden, eps)
        self.modulation = layer_modulation(hidden) if layer_modulation is not None else None
        self.self_attn = SelfAttention(hidden, r.num_attention_heads, r.num_key_value_heads, r.head_dim, c.qk_norm,
                                       eps, self_text)
        self.attn_out_norm = RMSNorm(hidden, eps) if c.sandwich_norm else nn.Identity()
        self.cross_attn = cross_attn
        self.cross_out_norm = RMSNorm(hidden, eps) if (c.sandwich_norm and cross_attn is not None) else nn.Identity()
        self.ffn_norm = RMSNorm(hidden, eps)
        self.mlp = GeGLU(hidden, r.intermediate_size)
        self.ffn_out_norm = RMSNorm(hidden, eps) if c.sandwich_norm else nn.Identity()

    def forward(self, x: torch.Tensor, emb: Optional[torch.Tensor], rope: Rope, text: TextInputs) -> torch.Tensor:
        mod = self.modulation(emb) if self.modulation is not None else None
        h = self.input_layernorm(x)
        if mod is not None:
            h = modulate(h, mod.shift_msa, mod.scale_msa)
        attn = self.attn_out_norm(self.self_attn(h, rope, text))
        x = x + (attn if mod is None else mod.gate_msa[:, None] * attn)
        if self.cross_attn is not None:
            x = x + self.cross_out_norm(self.cross_attn(x, text))
        h = self.ffn_norm(x)
        if mod is not None:
            h = modulate(h, mod.shift_mlp, mod.scale_mlp)
        mlp = self.ffn_out_norm(self.mlp(h))
        return x + (mlp if mod is None else mod.gate_mlp[:, None] * mlp)


class OutputHead(nn.Module):
    """RMSNorm [-> AdaLN output modulation] -> Linear to ``p·p·C`` per token."""

    def __init__(self, hidden: int, patch: int, channels: int, eps: float, output_modulation: Optional[type]):
        super().__init__()
        self.norm_out = RMSNorm(hidden, eps)
        self.modulation = output_modulation(hidden) if output_modulation is not None else None
        self.proj_out = nn.Linear(hidden, patch * patch * channels)

    def forward(self, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        x = self.norm_out(x)
        if self.modulation is not None:
            x = self.modulation(x, cond.final)
        return self.proj_out(x)


def unpatchify(tokens: torch.Tensor, h: int, w: int, patch: int) -> torch.Tensor:
    """``(B, h·w, p·p·C) -> (B, C, h·p, w·p)`` (token vectors laid out ``(p, p, C)``)."""
    b = tokens.shape[0]
    x = tokens.view(b, h, w, patch, patch, -1)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(b, -1, h * patch, w * patch)


class DiffusionTransformer(nn.Module):
    """A DiT conditioned on a frozen LLM: deep fusion (FuseDiT) or a shallow-fusion baseline.

    ``forward(x (B, C, H, W), timestep (B,) = σ·1000, context: TextContext) -> velocity (B, C_out, H, W)``.
    """

    def __init__(self, resolved: ResolvedModelConfig):
        super().__init__()
        self.resolved = r = resolved
        c = r.config
        self.patch_size = c.patch_size
        self.patch_embed = PatchEmbed(
            height=c.sample_size, width=c.sample_size, patch_size=c.patch_size, in_channels=c.in_channels,
            embed_dim=r.hidden_size, pos_embed_type="sincos" if c.uses_sincos_table else None,
            pos_embed_max_size=c.pos_embed_max_size,
        )
        pooled_dim = (c.text_modulation_dim or r.llm.hidden_size) if c.text_modulation else None
        variant = build_timestep_variant(c.timestep_conditioning, r.hidden_size, pooled_dim, r.rms_norm_eps)
        self.timestep = variant.embedder
        self.adds_timestep_to_tokens = getattr(variant.embedder, "adds_to_tokens", False)
        self.positions = build_positions(c.pos_embed, r.head_dim, r.rope_theta)
        self.prediction = build_prediction(c.prediction)
        shallow = c.kind == "dit"
        # Deep fusion places the image after the prompt's real tokens (their keys carry RoPE); the baselines' text
        # keys carry no RoPE, so their image positions start at 0 like the reference's DiT.
        self.image_follows_text = not shallow
        self.context_embedder = (
            nn.Sequential(RMSNorm(r.llm.hidden_size, r.rms_norm_eps), nn.Linear(r.llm.hidden_size, r.hidden_size))
            if shallow else None
        )
        self.layers = nn.ModuleList(
            [DiTBlock(r, *self._text_modules(r, llm_layer, shallow), variant.layer_modulation)
             for llm_layer in (r.layer_map if not shallow else [None] * r.num_layers)]
        )
        self.head = OutputHead(r.hidden_size, c.patch_size, r.out_channels, r.rms_norm_eps, variant.output_modulation)
        self.activation_checkpointing = False
        # Build-time list of each block's LLM key/value source (None: no LLM layer), for prepare_text.
        self._llm_sources = [self._llm_source(block) for block in self.layers]
        self.initialize_weights()

    @staticmethod
    def _llm_source(block: "DiTBlock") -> Optional[LLMLayerKV]:
        for attention in (block.self_attn, block.cross_attn):
            source = getattr(attention, "text_source", None)
            if isinstance(source, LLMLayerKV):
                return source
        return None

    def enable_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them (less memory)."""
        self.activation_checkpointing = enabled

    @staticmethod
    def _text_modules(r: ResolvedModelConfig, llm_layer: Optional[int], shallow: bool):
        """(text source of the self-attention, cross-attention module) of one block."""
        c = r.config
        if shallow:
            if c.attention == "self":
                return ProjectedKV(r.hidden_size, r.num_key_value_heads, r.head_dim), None
            source = ProjectedKV(r.hidden_size, r.num_key_value_heads, r.head_dim)
            return None, CrossAttention(r.hidden_size, r.num_attention_heads, r.head_dim, c.qk_norm, r.rms_norm_eps,
                                        source, key_norm=True)
        if llm_layer is None:  # DiT-only layer past the layer map
            return None, None
        if c.attention == "self":
            return LLMLayerKV(llm_layer), None
        return None, CrossAttention(r.hidden_size, r.num_attention_heads, r.head_dim, c.qk_norm, r.rms_norm_eps,
                                    LLMLayerKV(llm_layer, raw=True), key_norm=False)

    # ----------------------------------------------------------------------------------------------------------------
    def text_requirements(self) -> TextRequirements:
        """What this model reads from the text context (tells the :class:`TextEncoder` what to capture)."""
        c, r = self.resolved.config, self.resolved
        pooled = c.text_modulation
        if c.kind == "dit":
            return TextRequirements(hidden_states_index=c.text_hidden_states_index, pooled=pooled)
        fused = r.fused_llm_layers
        if c.attention == "self":
            return TextRequirements(kv_layers=fused, pooled=pooled)
        return TextRequirements(raw_key_layers=fused, pooled=pooled)

    def initialize_weights(self) -> None:
        """The reference's initialisation: Xavier-uniform linears with zero bias, zero AdaLN-Zero modulation and output
        projection, N(0, 0.02) timestep/condition/context embedders, Xavier patch embedding."""
        def basic(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic)
        weight = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        std = 0.02
        t = self.timestep
        if hasattr(t, "timestep_embedder"):
            nn.init.normal_(t.timestep_embedder[0].weight, std=std)
            nn.init.normal_(t.timestep_embedder[2].weight, std=std)
            if t.condition_embedder is not None:
                nn.init.normal_(t.condition_embedder[1].weight, std=std)
                nn.init.normal_(t.condition_embedder[3].weight, std=std)
            if t.t_block is not None:
                nn.init.normal_(t.t_block[1].weight, std=std)
        if self.context_embedder is not None:
            nn.init.normal_(self.context_embedder[1].weight, std=std)
        for module in self.modules():
            if type(module).__name__ in ("AdaLNZeroModulation", "AdaLNZeroOutput"):
                nn.init.zeros_(module.linear.weight)
                nn.init.zeros_(module.linear.bias)
        nn.init.zeros_(self.head.proj_out.weight)
        nn.init.zeros_(self.head.proj_out.bias)

    # ----------------------------------------------------------------------------------------------------------------
    def prepare_text(self, context: TextContext) -> list[TextInputs]:
        """Per block: its LLM layer's keys/values (deep fusion) or the embedded hidden states (baselines), and the
        key mask (None when no token is padding)."""
        hidden = None
        if self.context_embedder is not None:
            if context.hidden_states is None:
                raise ValueError("this shallow-fusion model needs context.hidden_states; encode the prompts with a "
                                 "TextEncoder built from model.text_requirements()")
            weight = self.context_embedder[1].weight
            hidden = self.context_embedder(context.hidden_states.to(weight.dtype))
        key_mask = context.mask if context.has_padding else None
        inputs = []
        for source in self._llm_sources:
            keys, values = source.select(context) if source is not None else (None, None)
            inputs.append(TextInputs(hidden=hidden, key_mask=key_mask, keys=keys, values=values))
        return inputs

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: TextContext) -> torch.Tensor:
        """``x``: ``(B, C, H, W)``; ``timestep``: ``(B,)`` = σ·1000; returns the velocity ``(B, C_out, H, W)``."""
        b, _, height, width = x.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"input of {height}x{width} is not divisible by the patch size {p}")
        if context.batch_size != b:
            raise ValueError(f"{b} images but {context.batch_size} prompts in the text context")
        h, w = height // p, width // p
        tokens = self.patch_embed(x)
        cond = self.timestep(timestep.to(tokens.device), context.pooled, tokens.dtype)
        if self.adds_timestep_to_tokens:
            tokens = tokens + cond.final[:, None]
        offsets = context.num_real.to(tokens.device)
        if not self.image_follows_text:
            offsets = torch.zeros_like(offsets)
        rope = self.positions(h, w, offsets)
        for block, text in zip(self.layers, self.prepare_text(context)):
            if self.activation_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, cond.layer, rope, text, use_reentrant=False)
            else:
                tokens = block(tokens, cond.layer, rope, text)
        return self.prediction(unpatchify(self.head(tokens, cond), h, w, p), x, timestep)
