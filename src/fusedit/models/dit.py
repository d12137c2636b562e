"""The diffusion transformer: one block type and one model type for deep fusion and the shallow baselines.

Every variant of the design space (``docs/design.md``, "The design space") is resolved at build time into
submodules: a position encoder (:mod:`~fusedit.models.positions`), a timestep conditioner
(:mod:`~fusedit.models.timestep`), a text path (:mod:`~fusedit.models.fusion`: each block's text source and optional
cross-attention) and optional sandwich norms; ``forward`` has no config branches.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import PatchEmbed
from torch import nn
from torch.utils.checkpoint import checkpoint

from fusedit.models.attention import CrossAttention, SelfAttention, TextInputs
from fusedit.models.config import LLMGeometry, ModelConfig, ResolvedModelConfig, resolve_model_config
from fusedit.models.fusion import build_text_path
from fusedit.models.layers import GeGLU, RMSNorm, Rope, SelfInitializing, xavier_linears
from fusedit.models.positions import build_positions
from fusedit.models.prediction import build_prediction
from fusedit.models.timestep import Conditioning, build_timestep_variant, modulate
from fusedit.text.context import TextContext, TextRequirements


class DiTBlock(nn.Module):
    """Pre-norm block: (modulated) RMSNorm -> self-attention [-> sandwich norm] -> gated residual
    [-> cross-attention -> sandwich norm -> residual] -> (modulated) RMSNorm -> GeGLU [-> sandwich norm] -> gated
    residual. ``x``: ``(B, N, H)``."""

    def __init__(
        self,
        resolved: ResolvedModelConfig,
        self_text: nn.Module | None,
        cross_attn: CrossAttention | None,
        layer_modulation: type | None,
    ):
        super().__init__()
        config, eps, hidden = resolved.config, resolved.rms_norm_eps, resolved.hidden_size
        self.input_layernorm = RMSNorm(hidden, eps)
        self.modulation = layer_modulation(hidden) if layer_modulation is not None else None
        self.self_attn = SelfAttention(
            hidden,
            resolved.num_attention_heads,
            resolved.num_key_value_heads,
            resolved.head_dim,
            config.qk_norm,
            eps,
            self_text,
        )
        self.attn_out_norm = RMSNorm(hidden, eps) if config.sandwich_norm else nn.Identity()
        self.cross_attn = cross_attn
        self.cross_out_norm = (
            RMSNorm(hidden, eps) if (config.sandwich_norm and cross_attn is not None) else nn.Identity()
        )
        self.ffn_norm = RMSNorm(hidden, eps)
        self.mlp = GeGLU(hidden, resolved.intermediate_size)
        self.ffn_out_norm = RMSNorm(hidden, eps) if config.sandwich_norm else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None, rope: Rope, text: TextInputs) -> torch.Tensor:
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


class OutputHead(SelfInitializing, nn.Module):
    """RMSNorm [-> AdaLN output modulation] [-> Linear to ``head_hidden`` -> GELU] -> Linear to ``p·p·C`` per token.

    The hidden layer (``model.head_hidden``; none in the reference) lets a token decode its patch non-linearly: a
    linear projection can only mix ``hidden`` basis patches, too few for crisp edges at every sub-patch position of
    large patches.
    """

    def __init__(
        self,
        hidden: int,
        patch: int,
        channels: int,
        eps: float,
        output_modulation: type | None,
        head_hidden: int | None = None,
    ):
        super().__init__()
        self.norm_out = RMSNorm(hidden, eps)
        self.modulation = output_modulation(hidden) if output_modulation is not None else None
        self.expand = (
            nn.Sequential(nn.Linear(hidden, head_hidden), nn.GELU(approximate="tanh")) if head_hidden else None
        )
        self.proj_out = nn.Linear(head_hidden or hidden, patch * patch * channels)

    def reset_parameters(self) -> None:
        """Zero output projection: the untrained model predicts zero velocity."""
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        x = self.norm_out(x)
        if self.modulation is not None:
            x = self.modulation(x, cond.final)
        if self.expand is not None:
            x = self.expand(x)
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
        self.resolved = resolved
        config = resolved.config
        self.patch_size = config.patch_size
        self.patch_embed = PatchEmbed(
            height=config.sample_size,
            width=config.sample_size,
            patch_size=config.patch_size,
            in_channels=config.in_channels,
            embed_dim=resolved.hidden_size,
            pos_embed_type="sincos" if config.uses_sincos_table else None,
            pos_embed_max_size=config.pos_embed_max_size,
        )
        pooled_dim = (config.text_modulation_dim or resolved.llm.hidden_size) if config.text_modulation else None
        variant = build_timestep_variant(
            config.timestep_conditioning, resolved.hidden_size, pooled_dim, resolved.rms_norm_eps
        )
        self.timestep = variant.embedder
        self.adds_timestep_to_tokens = getattr(variant.embedder, "adds_to_tokens", False)
        self.positions = build_positions(config.pos_embed, resolved.head_dim, resolved.rope_theta)
        self.prediction = build_prediction(config.prediction)
        #: deep or shallow fusion: what the model reads from the text and how each block gets it
        self.text_path = build_text_path(resolved)
        self.context_embedder = self.text_path.context_embedder  # the hidden-state embedder, or None
        self.layers = nn.ModuleList(
            [
                DiTBlock(resolved, *self.text_path.block_modules(i), variant.layer_modulation)
                for i in range(resolved.num_layers)
            ]
        )
        self.head = OutputHead(
            resolved.hidden_size,
            config.patch_size,
            resolved.out_channels,
            resolved.rms_norm_eps,
            variant.output_modulation,
            config.head_hidden,
        )
        self.activation_checkpointing = False
        self.reset_parameters()

    @property
    def image_follows_text(self) -> bool:
        """Whether image RoPE positions start after the prompt's real tokens (deep fusion) or at 0 (shallow)."""
        return self.text_path.image_follows_text

    def enable_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them (less memory)."""
        self.activation_checkpointing = enabled

    def text_requirements(self) -> TextRequirements:
        """What this model reads from the text context (tells the :class:`TextEncoder` what to capture)."""
        return self.text_path.requirements()

    def reset_parameters(self) -> None:
        """The reference's initialisation: Xavier-uniform linear and patch-embedding weights with zero biases, then
        each self-initialising module's own (:class:`~fusedit.models.layers.SelfInitializing`: N(0, 0.02) timestep,
        condition and context embedders, zero AdaLN-Zero modulation and output projection)."""
        xavier_linears(self)
        weight = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        for module in self.modules():
            if isinstance(module, SelfInitializing):
                module.reset_parameters()

    def prepare_text(self, context: TextContext) -> list[TextInputs]:
        """Per block: what it reads of the text (see :meth:`fusedit.models.fusion.TextPath.prepare`)."""
        return self.text_path.prepare(context)

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
        for block, text in zip(self.layers, self.prepare_text(context), strict=True):
            if self.activation_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, cond.layer, rope, text, use_reentrant=False)
            else:
                tokens = block(tokens, cond.layer, rope, text)
        return self.prediction(unpatchify(self.head(tokens, cond), h, w, p), x, timestep)


def build_model(config: ModelConfig, llm: LLMGeometry) -> DiffusionTransformer:
    """Resolve ``config`` against the LLM's geometry (raising ``ConfigError`` on invalid combinations) and build."""
    return DiffusionTransformer(resolve_model_config(config, llm))
