"""Configuration of the text side: which LLM, how prompts become tokens, and what the text context holds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fusedit.config import require


@dataclass
class TextConfig:
    """The (frozen) decoder-only LLM used as a key/value provider.

    Attributes:
        llm: local path or Hugging Face hub id of a decoder-only causal LM (Gemma, Gemma 2/3, Llama, Qwen2/3, ...),
            or of a multimodal model whose language model is used (PaliGemma).
        tokenizer: path or hub id of the tokenizer (``null``: same as ``llm``).
        dtype: LLM weights/compute dtype; ``auto`` = bfloat16 on CUDA, float32 on CPU.
        trainable: train the LLM too (the ``train_llm`` ablation); the text context then carries gradients.
        max_length: maximum prompt length in tokens (excluding the instruction prefix); longer prompts are
            truncated and the truncation is reported.
        padding_side: ``left`` (the Gemma tokenizer default, the reference's choice) or ``right``.
        padding: ``max_length`` pads every prompt to ``max_length`` like the reference (needed to reproduce its
            numbers, since text positions count pad slots); ``longest`` pads to the batch's longest prompt.
        instruction: text prepended to every non-empty prompt (e.g. "Generate an image of: ").
        chat_template: wrap prompts in the tokenizer's chat template (user turn, generation prompt).
        attention: ``hf``: the text stream is the Hugging Face model's own forward; ``reference``: fused layers
            compute attention like tang-bd/fuse-dit (plain softmax, scale head_dim^-0.5, no logit soft-capping, no
            sliding window), needed to reproduce reference checkpoints trained on Gemma 2.
        pooled: pooled text embedding for ``model.text_modulation``: ``none``, ``llm-mean`` (masked mean of the
            last hidden state), ``llm-last`` (the last hidden state at the prompt's last real token, the one state of
            a causal LLM that has read the whole prompt) or ``clip`` (a CLIP text model's projected embedding, from
            ``clip_model``).
        clip_model: path or hub id of a CLIP text model (for ``pooled: clip``).
        trim: drop key/value columns that are padding in every prompt of the batch (exact; faster attention).
        quantization: ``none`` or ``int8``: the frozen LLM's linear layers in 8 bits (bitsandbytes' LLM.int8 through
            transformers' ``BitsAndBytesConfig``; ``pip install "fusedit[lowmem]"``), about a quarter of fp32's
            weight memory; embeddings and norms stay in ``dtype``. Frozen LLMs only.
        offload: keep the frozen LLM's weights on the CPU and move them to the training device only to encode a
            batch (back right after), so the DiT step has the device memory the LLM would hold. Costs one
            host-device copy of the LLM per step; a no-op on a CPU-only run.
        expansion: ``none``, or ``greedy``: every non-empty prompt is followed by the LLM's own greedy continuation
            of ``prompt + expansion_separator`` before it is encoded (:mod:`fusedit.text.expansion`; e.g. the shapes
            world's tiny LLM restates the prompt's content). ``max_length`` must then hold prompt and continuation.
        expansion_separator: text put between the prompt and what the LLM is asked to continue (the shapes world's
            tiny LLM was pretrained on ``caption . restatement``).
        expansion_max_new_tokens: the longest continuation, in tokens.
    """

    llm: str = ""
    tokenizer: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trainable: bool = False
    max_length: int = 256
    padding_side: Literal["left", "right"] = "left"
    padding: Literal["max_length", "longest"] = "max_length"
    instruction: str = ""
    chat_template: bool = False
    attention: Literal["hf", "reference"] = "hf"
    pooled: Literal["none", "llm-mean", "llm-last", "clip"] = "none"
    clip_model: str | None = None
    trim: bool = True
    quantization: Literal["none", "int8"] = "none"
    offload: bool = False
    expansion: Literal["none", "greedy"] = "none"
    expansion_separator: str = " ."
    expansion_max_new_tokens: int = 32

    def validate(self) -> None:
        require(self.max_length > 0, f"text.max_length: got {self.max_length}, expected a positive integer")
        require(
            self.expansion_max_new_tokens > 0,
            f"text.expansion_max_new_tokens: got {self.expansion_max_new_tokens}, expected a positive integer",
        )
        if self.pooled == "clip":
            require(bool(self.clip_model), "text.pooled: clip needs text.clip_model (a path or hub id of a CLIP model)")
        if self.trainable:
            require(self.quantization == "none", "text.quantization=int8 is for a frozen LLM; set text.trainable=false")
            require(not self.offload, "text.offload is for a frozen LLM; set text.trainable=false")
        require(
            not (self.offload and self.quantization == "int8"),
            "text.offload and text.quantization=int8 do not combine (an 8-bit LLM stays where it was loaded, at a "
            "quarter of its fp32 size); choose one",
        )
