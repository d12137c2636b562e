"""Configuration of the diffusion transformer: deep fusion (FuseDiT) or a shallow-fusion baseline.

Names follow the reference's configs (tang-bd/fuse-dit). Geometry that must match the LLM (attention heads, KV
heads, head_dim, depth of the layer map) is resolved against the LLM's config by :func:`resolve_model_config`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from fusedit.config import ConfigError, require

Fusion = Literal["deep", "shallow"]
Attention = Literal["self", "cross"]
PosEmbed = Literal["ape", "1d-rope", "2d-rope", "m-rope"]
TimestepConditioning = Literal["adaln-zero", "adaln-single", "addition", "none"]


@dataclass
class ModelConfig:
    """The trainable DiT.

    Attributes:
        fusion: ``deep`` (FuseDiT: every mapped DiT layer attends to its LLM layer's keys/values) or ``shallow``
            (one hidden-state layer of the LLM, through an RMSNorm+Linear context embedder). Older configs name
            this key ``kind`` (``fusedit`` / ``dit``); it is still read, with a message.
        attention: ``self`` (text keys/values joined to the image self-attention) or ``cross`` (image
            self-attention followed by cross-attention to the text).
        pos_embed: image positions: ``ape`` (2D sin-cos added to patches), ``1d-rope`` (1D RoPE continuing after
            the real text tokens), ``2d-rope`` (rows on one half of head_dim, columns on the other, offset by
            the number of real text tokens), ``m-rope`` (Qwen2-VL-style multimodal RoPE).
        absolute_pos_embed: also add the 2D sin-cos table to the patches (as ``ape`` does) on top of a RoPE
            ``pos_embed``. RoPE alone encodes only relative positions among image tokens, so from pure noise a
            model can place things only through its attention to the text; the table gives each patch where it is
            (measured on the demo in ``docs/results/demo.md``). ``ape`` has the table already.
        timestep_conditioning: ``adaln-zero``, ``adaln-single`` (PixArt), ``addition`` (timestep embedding added
            to patch tokens) or ``none`` (no timestep input at all).
        text_modulation: add a pooled text embedding (RMSNorm → MLP) to the timestep embedding (the paper's
            "CLIP-mod"); the pooled source is chosen in the ``text`` section. Needs timestep conditioning.
        text_modulation_dim: width of the pooled embedding (``null``: the LLM's hidden size, for ``llm-mean``;
            set it to the CLIP projection width for ``clip``).
        qk_norm: per-head RMSNorm on the DiT's queries and keys.
        sandwich_norm: Gemma-2-style norms after attention and after the MLP.
        dit_hidden_size: DiT width (``null``: the LLM's hidden size).
        dit_num_hidden_layers: DiT depth (``null``: the number of fused LLM layers, or the LLM depth for
            ``shallow``).
        dit_intermediate_size: GeGLU MLP width (``null``: the LLM's intermediate size).
        num_attention_heads, num_key_value_heads, head_dim: the DiT's head geometry (``null``: the LLM's). Deep
            fusion requires it to equal the LLM's.
        initial_layers: LLM layers that run text-only before the first fused layer.
        shared_attention_layers: ``all`` (every LLM layer from ``initial_layers`` on) or the list of LLM layer
            indices fused, in order, with DiT layers 0, 1, ...; DiT layers past the map run without text.
        patch_size, in_channels, out_channels: patchification; channels are 3 for pixels or the VAE's latent
            channels (``out_channels`` ``null``: same as ``in_channels``).
        sample_size: default latent (or pixel) side length used by the pipeline when no size is given.
        pos_embed_max_size: side of the sin-cos table for ``ape`` and ``absolute_pos_embed`` (centre-cropped to
            the image grid).
        head_hidden: width of a GELU hidden layer in the output head before the projection to patches (``null``:
            the reference's linear head); see :class:`~fusedit.models.dit.OutputHead`.
        prediction: what the network outputs: ``velocity`` (the reference's) or the clean ``sample``, from which
            the velocity follows (:mod:`fusedit.models.prediction`); ``forward`` returns the velocity either way.
        text_adapter: (``deep`` only) what stands between the frozen LLM's keys/values and the DiT's attention:
            ``none`` (the reference: used as the LLM computed them), ``key-norm`` (each text key head vector
            RMS-normalised, as the DiT's own keys are; RoPE keeps norms, so this equals normalising before RoPE) or
            ``linear`` (a trainable ``head_dim × head_dim`` map per KV head on the keys and on the values of each
            fused layer, starting at the identity).
        text_key_rope: (``deep``, ``attention: self`` only) whether the image queries meet the text keys as the LLM
            rotated them, with the image placed after the prompt (true: the reference), or the keys before RoPE
            with image positions from 0 (false: the shallow baselines' convention, where a text key carries no
            position).
        text_hidden_states_index: which ``hidden_states`` entry of the LLM conditions the shallow baselines (and
            the unfused layers of deep fusion with ``unfused_text: hidden``).
        unfused_text: (``deep`` only) what the DiT layers past the layer map read of the text: ``none`` (image
            tokens only, the reference) or ``hidden``: the LLM hidden state ``text_hidden_states_index`` (by
            default its output), embedded once and projected by each such layer's own keys/values, as the shallow
            baselines read it. Deep fusion's layer ``i`` reads what LLM layer ``i`` computes from its *input*, so
            without this no DiT layer sees what the LLM's last layer adds. Needs ``dit_num_hidden_layers`` above
            the number of fused layers.
        rms_norm_eps, rope_theta: ``null``: the LLM's.
    """

    fusion: Fusion = "deep"
    attention: Attention = "self"
    pos_embed: PosEmbed = "2d-rope"
    absolute_pos_embed: bool = False
    timestep_conditioning: TimestepConditioning = "none"
    text_modulation: bool = False
    text_modulation_dim: int | None = None
    qk_norm: bool = True
    sandwich_norm: bool = True
    dit_hidden_size: int | None = None
    dit_num_hidden_layers: int | None = None
    dit_intermediate_size: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    initial_layers: int = 0
    shared_attention_layers: Literal["all"] | list[int] = "all"
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int | None = None
    sample_size: int = 64
    pos_embed_max_size: int = 64
    prediction: Literal["velocity", "sample"] = "velocity"
    head_hidden: int | None = None
    text_adapter: Literal["none", "key-norm", "linear"] = "none"
    text_key_rope: bool = True
    text_hidden_states_index: int = -1
    unfused_text: Literal["none", "hidden"] = "none"
    rms_norm_eps: float | None = None
    rope_theta: float | None = None

    @classmethod
    def upgrade_keys(cls, data: dict[str, Any], prefix: str) -> dict[str, Any]:
        """Read the old key ``kind: fusedit | dit`` as ``fusion: deep | shallow`` (with a message)."""
        if "kind" not in data:
            return data
        old = data.pop("kind")
        renamed = {"fusedit": "deep", "dit": "shallow"}
        if not isinstance(old, str) or old not in renamed:
            raise ConfigError(
                f"{prefix}.kind: got {old!r}, expected fusedit or dit (the key is now {prefix}.fusion: deep or shallow)"
            )
        if "fusion" in data and data["fusion"] != renamed[old]:
            raise ConfigError(
                f"{prefix}: kind={old!r} and fusion={data['fusion']!r} disagree; keep only {prefix}.fusion"
            )
        warnings.warn(
            f"{prefix}.kind is renamed {prefix}.fusion: read kind: {old} as fusion: {renamed[old]}; update the config",
            FutureWarning,
            stacklevel=3,
        )
        data["fusion"] = renamed[old]
        return data

    @property
    def uses_sincos_table(self) -> bool:
        """Whether the patches get the 2D sin-cos table (``ape``, or ``absolute_pos_embed`` on top of a RoPE)."""
        return self.pos_embed == "ape" or self.absolute_pos_embed

    def sincos_table_covers(self, patches_per_side: int) -> bool:
        """Whether a grid of ``patches_per_side`` patches fits the sin-cos table (always, without a table)."""
        return not self.uses_sincos_table or patches_per_side <= self.pos_embed_max_size

    def validate(self) -> None:
        for name in (
            "head_hidden",
            "text_modulation_dim",
            "dit_hidden_size",
            "dit_num_hidden_layers",
            "dit_intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "out_channels",
        ):
            value = getattr(self, name)
            require(value is None or value > 0, f"model.{name}: got {value}, expected a positive integer or null")
        for name in ("patch_size", "in_channels", "sample_size", "pos_embed_max_size"):
            value = getattr(self, name)
            require(value > 0, f"model.{name}: got {value}, expected a positive integer")
        require(self.initial_layers >= 0, f"model.initial_layers: got {self.initial_layers}, expected >= 0")
        if isinstance(self.shared_attention_layers, list):
            layers = self.shared_attention_layers
            require(
                len(layers) > 0, "model.shared_attention_layers: got an empty list, expected 'all' or LLM layer indices"
            )
            require(
                all(b > a for a, b in zip(layers, layers[1:], strict=False)),
                f"model.shared_attention_layers: got {layers}, expected strictly increasing LLM layer indices",
            )
            require(
                layers[0] >= self.initial_layers,
                f"model.shared_attention_layers: got {layers}, but layers below model.initial_layers="
                f"{self.initial_layers} run text-only; expected indices >= {self.initial_layers}",
            )
        if self.text_modulation:
            require(
                self.timestep_conditioning != "none",
                "model.text_modulation: true needs a timestep embedding to add to; set "
                "model.timestep_conditioning to adaln-zero, adaln-single or addition",
            )
        require(
            not (self.absolute_pos_embed and self.pos_embed == "ape"),
            "model.absolute_pos_embed: true adds the sin-cos table on top of a RoPE pos_embed, but pos_embed "
            "'ape' has it already; use it with 1d-rope, 2d-rope or m-rope, or set it to false",
        )
        patches = self.sample_size // self.patch_size
        require(
            self.sincos_table_covers(patches),
            f"model.pos_embed_max_size: got {self.pos_embed_max_size}, but model.sample_size="
            f"{self.sample_size} is {patches} patches per side; the sin-cos table needs at least that many",
        )
        if self.head_dim is not None and self.pos_embed in ("2d-rope", "m-rope"):
            require(
                self.head_dim % 4 == 0,
                f"model.head_dim: {self.pos_embed} needs head_dim divisible by 4, got {self.head_dim}",
            )
        self._validate_text_options()
        self._validate_prediction()

    def _validate_text_options(self) -> None:
        """``text_adapter`` and ``text_key_rope``: what stands between the LLM's keys and the image queries."""
        require(
            self.text_adapter in ("none", "key-norm", "linear"),
            f"model.text_adapter: got {self.text_adapter!r}, expected 'none', 'key-norm' or 'linear'",
        )
        require(
            self.text_adapter == "none" or self.fusion == "deep",
            f"model.text_adapter: {self.text_adapter!r} adapts the LLM's own keys/values, which only deep fusion "
            "reads (the shallow baselines project the text with their own weights); set it to 'none'",
        )
        require(
            self.unfused_text in ("none", "hidden"),
            f"model.unfused_text: got {self.unfused_text!r}, expected 'none' or 'hidden'",
        )
        require(
            self.unfused_text == "none" or self.fusion == "deep",
            f"model.unfused_text: {self.unfused_text!r} gives deep fusion's DiT layers past the layer map the LLM's "
            "hidden state; the shallow baselines read it in every layer already; set it to 'none'",
        )
        require(
            self.text_key_rope or (self.fusion == "deep" and self.attention == "self"),
            "model.text_key_rope: false un-rotates the LLM keys that deep fusion's self-attention reads; the "
            "cross-attention variant and the shallow baselines use un-rotated text keys already; set it to true",
        )

    def _validate_prediction(self) -> None:
        require(
            self.prediction in ("velocity", "sample"),
            f"model.prediction: got {self.prediction!r}, expected 'velocity' or 'sample'",
        )
        require(
            self.prediction == "velocity" or self.out_channels in (None, self.in_channels),
            f"model.prediction: 'sample' predicts the input itself, so model.out_channels ({self.out_channels}) "
            f"must equal model.in_channels ({self.in_channels}) or be null",
        )


@dataclass(frozen=True)
class LLMGeometry:
    """What the DiT needs to know about the LLM (read from its Hugging Face config)."""

    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float

    @classmethod
    def from_hf_config(cls, config) -> LLMGeometry:
        """Read the geometry from a transformers ``PretrainedConfig`` (text config of multimodal models)."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        rope_theta = getattr(text, "rope_theta", None)
        if rope_theta is None:
            params = getattr(text, "rope_parameters", None) or {}
            if isinstance(params, dict) and "full_attention" in params:
                params = params["full_attention"]
            rope_theta = (params or {}).get("rope_theta", 10000.0)
        return cls(
            model_type=text.model_type,
            hidden_size=text.hidden_size,
            num_hidden_layers=text.num_hidden_layers,
            num_attention_heads=heads,
            num_key_value_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            intermediate_size=text.intermediate_size,
            rms_norm_eps=float(getattr(text, "rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
        )


@dataclass(frozen=True)
class ResolvedModelConfig:
    """A :class:`ModelConfig` with every ``null`` filled from the LLM and the layer map made explicit.

    ``layer_map[i]`` is the LLM layer DiT layer ``i`` attends to (deep fusion) or ``None`` (no text).
    """

    config: ModelConfig
    llm: LLMGeometry
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    out_channels: int
    rms_norm_eps: float
    rope_theta: float
    layer_map: tuple[int | None, ...] = field(default=())

    @property
    def fused_llm_layers(self) -> tuple[int, ...]:
        return tuple(i for i in self.layer_map if i is not None)


def resolve_model_config(config: ModelConfig, llm: LLMGeometry) -> ResolvedModelConfig:
    """Fill defaults from the LLM and check every combination that depends on it (raises :class:`ConfigError`)."""
    heads = config.num_attention_heads or llm.num_attention_heads
    kv_heads = config.num_key_value_heads or llm.num_key_value_heads
    head_dim = config.head_dim or llm.head_dim
    if config.fusion == "deep":
        for name, ours, theirs in (
            ("num_attention_heads", heads, llm.num_attention_heads),
            ("num_key_value_heads", kv_heads, llm.num_key_value_heads),
            ("head_dim", head_dim, llm.head_dim),
        ):
            require(
                ours == theirs,
                f"model.{name}: deep fusion shares attention with the LLM, so the DiT's {name} must equal the "
                f"LLM's ({theirs}); got {ours}. Remove the key or set it to {theirs}.",
            )
    require(
        heads % kv_heads == 0,
        f"model.num_attention_heads ({heads}) must be a multiple of model.num_key_value_heads ({kv_heads})",
    )
    if config.pos_embed in ("2d-rope", "m-rope"):
        require(head_dim % 4 == 0, f"model.pos_embed={config.pos_embed} needs head_dim divisible by 4, got {head_dim}")
    if config.pos_embed == "1d-rope" or config.pos_embed == "ape":
        require(head_dim % 2 == 0, f"model.pos_embed={config.pos_embed} needs an even head_dim, got {head_dim}")

    layer_map = _deep_layer_map(config, llm) if config.fusion == "deep" else _shallow_layer_map(config, llm)
    depth = len(layer_map)

    return ResolvedModelConfig(
        config=config,
        llm=llm,
        hidden_size=config.dit_hidden_size or llm.hidden_size,
        num_layers=depth,
        intermediate_size=config.dit_intermediate_size or llm.intermediate_size,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        out_channels=config.out_channels or config.in_channels,
        rms_norm_eps=config.rms_norm_eps if config.rms_norm_eps is not None else llm.rms_norm_eps,
        rope_theta=config.rope_theta if config.rope_theta is not None else llm.rope_theta,
        layer_map=layer_map,
    )


__all__ = ["ConfigError", "LLMGeometry", "ModelConfig", "ResolvedModelConfig", "replace", "resolve_model_config"]


def _deep_layer_map(config: ModelConfig, llm: LLMGeometry) -> tuple[int | None, ...]:
    """Deep fusion: the LLM layer of every DiT layer (``None`` past the map), checked against the LLM's depth."""
    require(
        config.initial_layers < llm.num_hidden_layers,
        f"model.initial_layers: got {config.initial_layers}, but the LLM has only {llm.num_hidden_layers} "
        f"layers; expected 0..{llm.num_hidden_layers - 1}",
    )
    if config.shared_attention_layers == "all":
        fused = list(range(config.initial_layers, llm.num_hidden_layers))
    else:
        fused = list(config.shared_attention_layers)
        require(
            fused[-1] < llm.num_hidden_layers,
            f"model.shared_attention_layers: layer {fused[-1]} is past the LLM's depth "
            f"({llm.num_hidden_layers} layers, indices 0..{llm.num_hidden_layers - 1})",
        )
    depth = config.dit_num_hidden_layers or len(fused)
    require(
        depth >= len(fused),
        f"model.dit_num_hidden_layers: got {depth}, but the layer map fuses {len(fused)} LLM layers "
        f"({fused[0]}..{fused[-1]}); expected at least {len(fused)}",
    )
    if config.unfused_text == "hidden":
        _check_hidden_states_index(config, llm)
        require(
            depth > len(fused),
            f"model.unfused_text: 'hidden' feeds the LLM's hidden state to the DiT layers past the layer map, but "
            f"all {depth} DiT layers are fused; set model.dit_num_hidden_layers above {len(fused)}",
        )
    return tuple(fused) + (None,) * (depth - len(fused))


def _shallow_layer_map(config: ModelConfig, llm: LLMGeometry) -> tuple[int | None, ...]:
    """Shallow fusion: no DiT layer reads an LLM layer (``None`` each); the hidden-state index is checked."""
    _check_hidden_states_index(config, llm)
    return (None,) * (config.dit_num_hidden_layers or llm.num_hidden_layers)


def _check_hidden_states_index(config: ModelConfig, llm: LLMGeometry) -> None:
    """``model.text_hidden_states_index`` names one of the LLM's ``num_hidden_layers + 1`` hidden states."""
    index = config.text_hidden_states_index
    require(
        -(llm.num_hidden_layers + 1) <= index <= llm.num_hidden_layers,
        f"model.text_hidden_states_index: got {index}, but the LLM has {llm.num_hidden_layers + 1} hidden "
        f"states; expected {-(llm.num_hidden_layers + 1)}..{llm.num_hidden_layers}",
    )
