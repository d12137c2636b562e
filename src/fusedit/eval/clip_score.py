"""CLIP score of images against their prompts, with a CLIP model from a local folder.

CLIP score (Hessel et al., 2021, as in torchmetrics): ``100 · max(cos(E_image, E_text), 0)`` per
image–prompt pair, averaged over pairs. The model folder is a Hugging Face CLIP checkpoint
(``config.json`` + weights, tokenizer files, ``preprocessor_config.json``), e.g. a local copy of
``openai/clip-vit-large-patch14``; it is loaded with ``local_files_only=True``. Prompts longer than the
text encoder's context (77 tokens for OpenAI CLIP) are truncated.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from fusedit.eval.images import load_rgb


def _load_clip(model_path: str | os.PathLike, device: str | torch.device):
    """Model, tokenizer and (PIL-backend) image processor from a local CLIP folder."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    root = Path(model_path)
    if not root.is_dir():
        raise FileNotFoundError(f"CLIP model folder {str(root)!r} does not exist")
    for required in ("config.json", "preprocessor_config.json"):
        if not (root / required).is_file():
            raise FileNotFoundError(
                f"CLIP model folder {str(root)!r} has no {required} (save the model, tokenizer and image "
                "processor there with save_pretrained)"
            )
    model = CLIPModel.from_pretrained(root, local_files_only=True).to(device).eval()  # type: ignore[arg-type]
    tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
    processor = CLIPImageProcessorPil.from_pretrained(root, local_files_only=True)
    return model, tokenizer, processor


def _as_image(item: Image.Image | str | os.PathLike) -> Image.Image:
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, (str, os.PathLike)):
        return load_rgb(item)
    raise TypeError(f"images must be PIL images or file paths, got {type(item).__name__}")


@torch.no_grad()
def clip_score(
    images: Sequence[Image.Image | str | os.PathLike],
    prompts: Sequence[str],
    model_path: str | os.PathLike,
    device: str | torch.device = "cpu",
    *,
    batch_size: int = 32,
) -> float:
    """Mean CLIP score of ``images[i]`` against ``prompts[i]``.

    Args:
        images: PIL images or image file paths.
        prompts: one prompt per image.
        model_path: local Hugging Face CLIP folder (see module docstring).
        device: where the CLIP model runs.
        batch_size: pairs per forward pass.

    Returns:
        The mean of ``100 · max(cos, 0)`` over all pairs, a Python float in [0, 100].
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, one per image, not a single string")
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; need one prompt per image")
    if not images:
        raise ValueError("clip_score needs at least one image")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model, tokenizer, processor = _load_clip(model_path, device)
    max_length = model.config.text_config.max_position_embeddings
    total, count = 0.0, 0
    for start in range(0, len(images), batch_size):
        batch_images = [_as_image(item) for item in images[start : start + batch_size]]
        batch_prompts = list(prompts[start : start + batch_size])
        pixels = processor(images=batch_images, return_tensors="pt")["pixel_values"].to(device)
        text = tokenizer(batch_prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(
            device
        )
        image_embeds = _as_embeddings(model.get_image_features(pixel_values=pixels))
        text_embeds = _as_embeddings(model.get_text_features(**text))
        cosine = torch.nn.functional.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
        total += (100.0 * cosine.clamp(min=0)).sum().item()
        count += cosine.shape[0]
    return total / count


def _as_embeddings(output) -> torch.Tensor:
    """``get_*_features`` returns a tensor (older transformers) or an output with ``pooler_output``."""
    if torch.is_tensor(output):
        return output
    return output.pooler_output
