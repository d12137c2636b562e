"""The tiny LLM's configuration (:class:`TinyLLMConfig`) and architecture (:func:`build_tiny_llm`): a small Gemma 2,
Llama or Qwen 3 causal LM from transformers. Training and saving are in :mod:`fusedit.text.tiny_llm`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from fusedit.config import require
from fusedit.data.shapes import LLM_CORPORA, SCENE_SCOPES

#: ``TinyLLMConfig.family`` → the transformers causal-LM class it builds.
TINY_LLM_FAMILIES: dict[str, type[PreTrainedModel]] = {
    "gemma2": Gemma2ForCausalLM,
    "llama": LlamaForCausalLM,
    "qwen3": Qwen3ForCausalLM,
}

#: Special tokens in id order: ``<pad>``=0, ``<eos>``=1, ``<bos>``=2, ``<unk>``=3.
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<eos>", "<bos>", "<unk>")
PAD_ID, EOS_ID, BOS_ID, UNK_ID = range(4)


@dataclass
class TinyLLMConfig:
    """Architecture, size and training recipe of the tiny LLM.

    Attributes:
        family: the decoder architecture (:data:`TINY_LLM_FAMILIES`): ``gemma2`` (``Gemma2ForCausalLM``, the
            default), ``llama`` (``LlamaForCausalLM``) or ``qwen3`` (``Qwen3ForCausalLM``: per-head RMSNorm of queries
            and keys). Same width, depth, heads, corpus, tokenizer and training for each; see :func:`build_tiny_llm`.
        hidden_size: model width.
        num_hidden_layers: decoder layers.
        num_attention_heads, num_key_value_heads, head_dim: attention geometry (grouped-query attention; a FuseDiT
            built on this LLM copies it).
        intermediate_size: GeGLU MLP width.
        steps: optimizer steps of next-token training.
        batch_size: captions per step.
        lr: peak AdamW learning rate (short linear warm-up, cosine decay to 10%).
        seed: seed of the initial weights and of batch sampling.
        tie_word_embeddings: tie input and output embeddings. Off by default: in the caption language all color
            (and shape) words are interchangeable for next-token prediction, and tied embeddings collapse them
            (measured: keys of "a green square" and "a red square" differ by 4 % at layer 0 tied, 15 % untied),
            which leaves the DiT nothing to condition on.
        max_length: tokenizer ``model_max_length`` and the longest training sequence (``<bos>`` + text +
            ``<eos>``); the Gemma 2 sliding window is set to at least this, so every layer sees the whole prompt.
        corpus: which shapes-world text :func:`ensure_shapes_world_llm` pretrains on
            (:meth:`~fusedit.data.shapes.ShapesWorld.llm_corpus`): ``restated`` (each caption followed by a
            restatement of its content; the default) or ``captions`` (the captions alone, whose color words the
            LLM has no reason to tell apart; measured in ``docs/results/demo.md``).
        scene_loss_weight: weight of the :class:`SceneObjective` next to the next-token loss when a pretraining has
            one (:func:`ensure_shapes_world_llm` always gives it the shapes world's); 0 turns it off.
        scene_scope: which captions the shapes world's scene objective describes: ``position`` (where the two
            objects of a position caption go, :func:`~fusedit.data.shapes.scene_labels`) or ``all`` (every caption's
            objects, colors, counts and relation, :func:`~fusedit.data.shapes.full_scene_labels`; measured in
            ``docs/results/demo.md``).
        instruction: text put before every pretraining line (the scene objective still reads the caption's last
            token): the tiny LLM's "instruction-tuned" analogue, which learns the words of a ``text.instruction``
            prefix (the word-level tokenizer maps words it never saw to ``<unk>``). Empty (the default): none.
    """

    family: str = "gemma2"
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 256
    steps: int = 300
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    max_length: int = 40
    tie_word_embeddings: bool = False
    corpus: str = "restated"
    scene_loss_weight: float = 1.0
    scene_scope: str = "position"
    instruction: str = ""

    def validate(self) -> None:
        require(
            self.family in TINY_LLM_FAMILIES,
            f"TinyLLMConfig.family: got {self.family!r}, expected one of {', '.join(TINY_LLM_FAMILIES)}",
        )
        require(
            isinstance(self.instruction, str) and "\n" not in self.instruction,
            f"TinyLLMConfig.instruction: got {self.instruction!r}, expected one line of text",
        )
        for name in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "intermediate_size",
            "batch_size",
        ):
            value = getattr(self, name)
            require(
                isinstance(value, int) and value > 0,
                f"TinyLLMConfig.{name}: got {value!r}, expected a positive integer",
            )
        require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            f"TinyLLMConfig: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
            f"num_key_value_heads ({self.num_key_value_heads})",
        )
        require(self.head_dim % 2 == 0, f"TinyLLMConfig.head_dim: got {self.head_dim}, expected an even number (RoPE)")
        require(
            isinstance(self.steps, int) and self.steps >= 0, f"TinyLLMConfig.steps: got {self.steps!r}, expected >= 0"
        )
        require(self.lr > 0, f"TinyLLMConfig.lr: got {self.lr}, expected > 0")
        require(
            isinstance(self.max_length, int) and self.max_length >= 4,
            f"TinyLLMConfig.max_length: got {self.max_length!r}, expected an integer >= 4",
        )
        require(self.corpus in LLM_CORPORA, f"TinyLLMConfig.corpus: got {self.corpus!r}, expected one of {LLM_CORPORA}")
        require(
            self.scene_scope in SCENE_SCOPES,
            f"TinyLLMConfig.scene_scope: got {self.scene_scope!r}, expected one of {SCENE_SCOPES}",
        )
        require(
            isinstance(self.scene_loss_weight, (int, float))
            and math.isfinite(self.scene_loss_weight)
            and self.scene_loss_weight >= 0,
            f"TinyLLMConfig.scene_loss_weight: got {self.scene_loss_weight!r}, expected a number >= 0",
        )


def build_tiny_llm(config: TinyLLMConfig, vocab_size: int) -> PreTrainedModel:
    """A randomly initialised causal LM of ``config.family`` and ``config``'s size (seeded by ``config.seed``).

    Every family gets the same width, depth, head geometry, MLP width, vocabulary, special ids and embedding tying,
    and ``max_position_embeddings`` covering ``max_length``; each keeps its own defaults otherwise (RoPE base 10000
    and RMSNorm epsilon 1e-6 in all three, so a FuseDiT built on any of them gets the same image RoPE):

    * ``gemma2``: logit soft-capping, alternating sliding/global layers (``sliding_window`` covers ``max_length``,
      so every layer sees the whole prompt), GeGLU MLP, ``(1 + w)`` norms, sandwich norms, embeddings scaled by
      ``sqrt(hidden_size)``; ``query_pre_attn_scalar`` = ``head_dim`` (attention scale ``head_dim^-0.5``, as in
      Gemma-2-2B where head_dim is 256).
    * ``llama``: pre-norm blocks, SwiGLU MLP.
    * ``qwen3``: Llama's layout plus per-head RMSNorm of queries and keys; no sliding window.
    """
    config.validate()
    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        max_position_embeddings=max(512, config.max_length),
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    hf_config: PretrainedConfig
    if config.family == "gemma2":
        hf_config = Gemma2Config(
            **common, query_pre_attn_scalar=config.head_dim, sliding_window=max(512, config.max_length)
        )
    elif config.family == "llama":
        hf_config = LlamaConfig(**common)
    else:
        hf_config = Qwen3Config(**common, use_sliding_window=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = TINY_LLM_FAMILIES[config.family](hf_config)
    return model
