"""The tiny LLM's scene objective: auxiliary supervision that makes the values at a caption's last token say which
object goes where (deep fusion hands the DiT nothing but the LLM's keys and values; without this objective the
tiny LLM does not write the layout into them). Used by :func:`fusedit.text.tiny_llm.pretrain_tiny_llm`."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast


@dataclass(frozen=True)
class SceneObjective:
    """Auxiliary supervision of the tiny LLM's pretraining: what each corpus line's caption describes.

    For corpus line ``i``, ``captions[i]`` is its beginning (the caption) and ``labels[i]`` one class index per
    entry of ``classes`` (e.g. :data:`fusedit.data.shapes.SCENE_FIELDS`; ``-100``: no target). During pretraining,
    for every layer but the first (whose values see one token only), a linear head reads that layer's values
    (``v_proj`` output, all key/value heads concatenated) at the caption's last token and predicts each field; the
    cross-entropies, summed over fields and layers, are added to the next-token loss with
    ``TinyLLMConfig.scene_loss_weight``. The heads are not saved: the result is a plain causal LM of its family.
    """

    captions: tuple[str, ...]
    labels: tuple[tuple[int, ...], ...]
    classes: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "captions", tuple(self.captions))
        object.__setattr__(self, "labels", tuple(tuple(int(v) for v in row) for row in self.labels))
        object.__setattr__(self, "classes", tuple(int(c) for c in self.classes))
        if len(self.captions) != len(self.labels):
            raise ValueError(f"SceneObjective: {len(self.captions)} captions but {len(self.labels)} label rows")
        if not self.classes or any(c < 2 for c in self.classes):
            raise ValueError(f"SceneObjective: classes {self.classes} must list at least one field of >= 2 classes")
        for row, labels in enumerate(self.labels):
            if len(labels) != len(self.classes) or any(
                not (v == -100 or 0 <= v < c) for v, c in zip(labels, self.classes, strict=False)
            ):
                raise ValueError(
                    f"SceneObjective: labels {labels} of caption {self.captions[row]!r} do not fit the "
                    f"classes {self.classes} (one index per field, 0 <= index < classes, or -100)"
                )

    def fingerprint(self) -> str:
        """SHA-256 of captions, labels and classes (what the marker compares)."""
        payload = json.dumps([self.captions, self.labels, self.classes])
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def scene_positions(
    tokenizer: PreTrainedTokenizerFast, data: dict[str, torch.Tensor], scene: SceneObjective
) -> torch.Tensor:
    """``(N,)`` column of each encoded corpus line's last caption token (lines are left-padded ``<bos> ... <eos>``)."""
    input_ids, mask = data["input_ids"], data["attention_mask"]
    if len(scene.captions) != input_ids.shape[0]:
        raise ValueError(
            f"SceneObjective has {len(scene.captions)} captions for a corpus of {input_ids.shape[0]} "
            f"lines; expected one per line, in corpus order"
        )
    positions = []
    encoded = tokenizer(list(scene.captions))["input_ids"]
    for row, (caption, ids) in enumerate(zip(scene.captions, encoded, strict=True)):
        start = input_ids.shape[1] - int(mask[row].sum())
        if input_ids[row, start : start + len(ids)].tolist() != ids:
            raise ValueError(f"SceneObjective: caption {caption!r} is not the beginning of corpus line {row}")
        positions.append(start + len(ids) - 1)
    return torch.tensor(positions)


class SceneReadout(torch.nn.Module):
    """The :class:`SceneObjective` heads: one linear map per layer (but the first) from that layer's values at the
    caption's last token to the concatenated class logits. Captures the values with forward hooks on ``v_proj``."""

    def __init__(self, model: PreTrainedModel, classes: Sequence[int], seed: int):
        super().__init__()
        layers = model.model.layers
        if len(layers) < 2:
            raise ValueError(
                "the scene objective reads the values of layers 1, 2, ... (layer 0 sees one token only); "
                "a 1-layer tiny LLM has none: use num_hidden_layers >= 2 or scene_loss_weight=0"
            )
        width = model.config.num_key_value_heads * model.config.head_dim
        self.classes = list(classes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.heads = torch.nn.ModuleList(torch.nn.Linear(width, sum(self.classes)) for _ in layers[1:])
        self._values: dict[int, torch.Tensor] = {}
        self._hooks = [
            layer.self_attn.v_proj.register_forward_hook(self._capture(index))
            for index, layer in enumerate(layers)
            if index >= 1
        ]

    def _capture(self, index: int):
        def hook(module, inputs, output):
            self._values[index] = output

        return hook

    def loss(self, positions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of every field at every read layer. ``positions``: ``(B,)`` columns of the batch
        just run; ``labels``: ``(B, F)`` (``-100``: no target)."""
        rows = torch.arange(positions.shape[0])
        total = positions.new_zeros((), dtype=torch.float32)
        for index, head in enumerate(self.heads, start=1):
            logits = head(self._values[index][rows, positions].float())
            for field, chunk in enumerate(logits.split(self.classes, dim=-1)):
                target = labels[:, field]
                if bool((target != -100).any()):
                    total = total + torch.nn.functional.cross_entropy(chunk, target, ignore_index=-100)
        return total

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._values.clear()
