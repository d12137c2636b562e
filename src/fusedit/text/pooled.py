"""Pooled text embeddings from a CLIP text model (the paper's "CLIP-mod" text modulation)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from fusedit.text.llm import LLMLoadError


class CLIPPooler(nn.Module):
    """``prompts -> (B, P)``: a frozen ``CLIPTextModelWithProjection``'s ``text_embeds``.

    Like the reference, prompts are padded to 77 tokens and the model gets no attention mask.
    """

    def __init__(self, model: nn.Module, tokenizer, max_length: int = 77):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        ids = self.tokenizer(
            list(prompts), return_tensors="pt", padding="max_length", truncation=True, max_length=self.max_length
        ).input_ids.to(device)
        return self.model(ids).text_embeds


def load_clip_pooler(name_or_path: str, device="cpu") -> CLIPPooler:
    """Load a CLIP text model (local folder or hub id); a sibling ``clip_tokenizer/`` folder is used when present
    (the reference's pipeline layout), else the tokenizer is read from the same place."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    tokenizer_source = name_or_path
    sibling = Path(name_or_path).parent / "clip_tokenizer"
    if sibling.is_dir():
        tokenizer_source = str(sibling)
    try:
        model = CLIPTextModelWithProjection.from_pretrained(name_or_path).to(device)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    except Exception as error:
        raise LLMLoadError(f"could not load the CLIP text model from {name_or_path!r}: {error}") from None
    return CLIPPooler(model, tokenizer)
