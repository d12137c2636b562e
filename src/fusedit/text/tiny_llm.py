"""A tiny, real Hugging Face decoder-only LLM (Gemma 2, Llama or Qwen 3 architecture) pretrained on shapes-world
captions.

The demo needs a frozen LLM whose hidden states carry the captions' meaning, without downloading weights. This
module builds one in about a minute on a CPU:

* :func:`train_caption_tokenizer`: a word-level ``tokenizers`` tokenizer (lower-cased words and punctuation) wrapped
  as a ``transformers`` fast tokenizer; special ids ``<pad>``=0, ``<eos>``=1, ``<bos>``=2, ``<unk>``=3; ``<bos>`` is
  prepended by the post-processor (like Gemma's); left padding.
* :func:`pretrain_tiny_llm`: next-token training of a small ``PreTrainedModel`` on ``<bos> caption <eos>``
  sequences, optionally with a :class:`SceneObjective` (linear heads on the values of the caption's last token must
  predict the scene it describes; the heads are dropped afterwards), then ``save_pretrained`` of model and tokenizer
  plus a marker JSON (:data:`MARKER_NAME`).
* :func:`ensure_tiny_llm`: reuse a folder whose marker matches the config and corpus, else (re)train;
  :func:`ensure_shapes_world_llm` does it on the shapes world's text (captions followed by restatements of their
  content by default, so that the hidden states must carry which colors, shapes and places a caption names), with the
  scene objective on by default.

Why the scene objective: deep fusion gives the DiT the LLM's keys/values only (the DiT never runs attention over the
text itself), so "which color goes on the left" must already be in them. Next-token training alone does not put it
there: a causal LM may leave the binding to later tokens, and a 4-layer LLM does. Measured in
``docs/results/demo.md``: without the objective the values of the tokens after the relation word of "... to the left
of ..." and "... to the right of ..." captions differed by only 1-14 %, and the DiT learned no layout at all, even
from position scenes alone or with the LLM trained along. A real LLM's states carry such meaning from its
pretraining; the scene objective is the tiny LLM's stand-in for it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from fusedit.data.shapes import FULL_SCENE_FIELDS, SCENE_FIELDS
from fusedit.text.scene_objective import SceneObjective, SceneReadout, scene_positions
from fusedit.text.tiny_llm_config import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    TINY_LLM_FAMILIES,
    UNK_ID,
    TinyLLMConfig,
    build_tiny_llm,
)

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "MARKER_NAME",
    "PAD_ID",
    "SPECIAL_TOKENS",
    "TINY_LLM_FAMILIES",
    "UNK_ID",
    "TinyLLMConfig",
    "build_tiny_llm",
    "corpus_hash",
    "corpus_loss",
    "ensure_shapes_world_llm",
    "ensure_tiny_llm",
    "marker_matches",
    "pretrain_tiny_llm",
    "read_marker",
    "train_caption_tokenizer",
]

#: Name of the marker file written next to the saved model.
MARKER_NAME = "fusedit_tiny_llm.json"


def _check_corpus(corpus: Sequence[str]) -> list[str]:
    if isinstance(corpus, str) or not all(isinstance(c, str) for c in corpus):
        raise TypeError("corpus must be a list of caption strings")
    corpus = list(corpus)
    if not any(c.strip() for c in corpus):
        raise ValueError("corpus is empty: expected a non-empty list of captions (e.g. ShapesWorld.caption_corpus())")
    return corpus


def train_caption_tokenizer(corpus: Sequence[str], max_length: int = 32) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of ``corpus`` (lower-cased words and punctuation marks; unseen words → ``<unk>``).

    The vocabulary is the specials (ids 0–3, see :data:`SPECIAL_TOKENS`) followed by the corpus words, most frequent
    first. Encoding prepends ``<bos>``; padding is on the left; ``model_max_length`` = ``max_length``.
    """
    corpus = _check_corpus(corpus)
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS)))
    for expected, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == expected, f"special token {token} must have id {expected}"
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B:1", special_tokens=[("<bos>", BOS_ID)]
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies punctuation
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=max_length,
    )


def corpus_hash(corpus: Sequence[str]) -> str:
    """SHA-256 of the caption list (order-sensitive)."""
    return hashlib.sha256(json.dumps(list(corpus), ensure_ascii=False).encode("utf-8")).hexdigest()


def _encode_corpus(tokenizer: PreTrainedTokenizerFast, corpus: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """``<bos> caption <eos>`` sequences, left-padded to the longest: input_ids, attention_mask, labels (-100 = no
    target)."""
    encoded = tokenizer(corpus)["input_ids"]
    sequences = [ids[: max_length - 1] + [EOS_ID] for ids in encoded]
    truncated = sum(len(ids) > max_length - 1 for ids in encoded)
    if truncated:
        print(f"tiny-llm: {truncated} captions longer than max_length={max_length} tokens were truncated")
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, length - len(seq) :] = torch.tensor(seq)
        mask[row, length - len(seq) :] = 1
    # pads and <bos> are never targets (predicting <bos> from a pad slot is trivial and would dilute the loss)
    labels = input_ids.masked_fill((mask == 0) | (input_ids == BOS_ID), -100)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _lr_factor(step: int, steps: int) -> float:
    warmup = max(1, steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def corpus_loss(model: PreTrainedModel, data: dict[str, torch.Tensor], batch_size: int = 512) -> float:
    """Mean next-token loss over every real token of an encoded corpus."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, data["input_ids"].shape[0], batch_size):
        batch = {k: v[start : start + batch_size] for k, v in data.items()}
        n = int((batch["labels"] != -100).sum())
        total += float(model(**batch).loss) * n
        count += n
    return total / max(count, 1)


def _scene_in_use(scene: SceneObjective | None, config: TinyLLMConfig) -> SceneObjective | None:
    """``scene`` when the pretraining uses it (given, and ``config.scene_loss_weight`` > 0), else None."""
    return scene if scene is not None and config.scene_loss_weight > 0 else None


@dataclass
class _TrainingLog:
    """First and last losses of a tiny-LLM pretraining (the marker records them)."""

    first_loss: float | None = None
    first_scene: float | None = None
    last_scene: float | None = None


def _train_tiny_llm(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    data: dict[str, torch.Tensor],
    config: TinyLLMConfig,
    scene: SceneObjective | None,
    started: float,
) -> _TrainingLog:
    """``config.steps`` AdamW steps of next-token prediction (plus the scene objective, when given) on random
    batches of ``data``."""
    params = list(model.parameters())
    readout = positions = labels = None
    if scene is not None:
        positions = scene_positions(tokenizer, data, scene)
        labels = torch.tensor(scene.labels, dtype=torch.long)
        readout = SceneReadout(model, scene.classes, seed=config.seed + 1)
        params += list(readout.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.01, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config.steps))
    generator = torch.Generator().manual_seed(config.seed)
    n = data["input_ids"].shape[0]
    report_every = max(1, config.steps // 4)
    model.train()
    log = _TrainingLog()
    for step in range(config.steps):
        index = torch.randint(n, (config.batch_size,), generator=generator)
        batch = {k: v[index] for k, v in data.items()}
        keep = batch["attention_mask"].any(0)  # drop columns that are padding in the whole batch (a left prefix)
        batch = {k: v[:, keep] for k, v in batch.items()}
        loss = model(**batch).loss
        lm_value = loss.item()
        log.first_loss = lm_value if log.first_loss is None else log.first_loss
        if readout is not None and positions is not None and labels is not None:
            scene_loss = readout.loss(positions[index] - int((~keep).sum()), labels[index])
            log.last_scene = scene_loss.item()
            log.first_scene = log.last_scene if log.first_scene is None else log.first_scene
            loss = loss + config.scene_loss_weight * scene_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        if (step + 1) % report_every == 0 or step + 1 == config.steps:
            scene_note = "" if log.last_scene is None else f" scene {log.last_scene:.3f}"
            print(
                f"tiny-llm step {step + 1}/{config.steps} loss {lm_value:.3f}{scene_note} "
                f"({time.perf_counter() - started:.1f} s)",
                flush=True,
            )
    if readout is not None:
        readout.remove()
    return log


def pretrain_tiny_llm(
    corpus: Sequence[str],
    out_dir: str | os.PathLike,
    config: TinyLLMConfig | None = None,
    scene: SceneObjective | None = None,
) -> Path:
    """Train the tokenizer and the tiny LLM on ``corpus`` and save both (plus the marker) into ``out_dir``.

    ``config``: the LLM's size and training (default :class:`TinyLLMConfig`). ``scene``: the optional auxiliary
    objective (one entry per corpus line), weighted by ``config.scene_loss_weight`` (0: not used).

    Returns:
        ``out_dir`` as a :class:`Path`.
    """
    config = config if config is not None else TinyLLMConfig()
    corpus = _check_corpus(corpus)
    config.validate()
    scene = _scene_in_use(scene, config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER_NAME).unlink(missing_ok=True)  # an interrupted run must not look complete
    started = time.perf_counter()

    tokenizer = train_caption_tokenizer(corpus, config.max_length)
    data = _encode_corpus(tokenizer, corpus, config.max_length)
    model = build_tiny_llm(config, vocab_size=len(tokenizer))
    log = _train_tiny_llm(model, tokenizer, data, config, scene, started)
    final_loss = corpus_loss(model, data)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    marker = {
        "config": dataclasses.asdict(config),
        "corpus_sha256": corpus_hash(corpus),
        "scene_sha256": scene.fingerprint() if scene is not None else None,
        "num_captions": len(corpus),
        "vocab_size": len(tokenizer),
        "first_loss": log.first_loss,
        "final_loss": final_loss,
        "first_scene_loss": log.first_scene,
        "final_scene_loss": log.last_scene,
        "train_seconds": round(time.perf_counter() - started, 2),
    }
    tmp = out / (MARKER_NAME + ".tmp")
    tmp.write_text(json.dumps(marker, indent=2))
    tmp.replace(out / MARKER_NAME)
    print(f"tiny-llm: saved to {out} (corpus loss {final_loss:.3f}, {marker['train_seconds']} s)", flush=True)
    return out


def read_marker(out_dir: str | os.PathLike) -> dict | None:
    """The marker of a tiny-LLM folder, or ``None`` when absent or unreadable."""
    path = Path(out_dir) / MARKER_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def marker_matches(marker: dict, config: TinyLLMConfig) -> bool:
    """Whether a marker's ``config`` is ``config``. Fields the marker lacks (it was written before they existed)
    count as their defaults, which reproduce what those older pretrainings did."""
    saved = marker.get("config")
    if not isinstance(saved, dict):
        return False
    return {**dataclasses.asdict(TinyLLMConfig()), **saved} == dataclasses.asdict(config)


def ensure_tiny_llm(
    out_dir: str | os.PathLike,
    corpus: Sequence[str],
    config: TinyLLMConfig | None = None,
    scene: SceneObjective | None = None,
) -> Path:
    """Return ``out_dir`` if it holds a tiny LLM trained with ``config`` (default :class:`TinyLLMConfig`) on
    ``corpus`` (and ``scene``), else train one there."""
    config = config if config is not None else TinyLLMConfig()
    corpus = _check_corpus(corpus)
    out = Path(out_dir)
    marker = read_marker(out)
    complete = all((out / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))
    scene = _scene_in_use(scene, config)
    scene_sha = scene.fingerprint() if scene is not None else None
    if (
        complete
        and marker is not None
        and marker_matches(marker, config)
        and marker.get("corpus_sha256") == corpus_hash(corpus)
        and marker.get("scene_sha256") == scene_sha
    ):
        return out
    return pretrain_tiny_llm(corpus, out, config, scene)


def ensure_shapes_world_llm(out_dir: str | os.PathLike, world, config: TinyLLMConfig | None = None) -> Path:
    """:func:`ensure_tiny_llm` on the shapes world's ``config.corpus`` text (a
    :class:`~fusedit.data.shapes.ShapesWorld`'s training prompts only), with the world's
    :class:`SceneObjective` (:func:`~fusedit.data.shapes.scene_labels` of every caption). A
    ``config.instruction`` starts every line."""
    config = config if config is not None else TinyLLMConfig()
    config.validate()
    captions, labels = world.llm_scene_labels(config.scene_scope)
    fields = SCENE_FIELDS if config.scene_scope == "position" else FULL_SCENE_FIELDS
    corpus = world.llm_corpus(config.corpus)
    prefix = config.instruction.strip()
    if prefix:  # the instruction starts every line, so the captions the scene objective finds start with it too
        corpus, captions = [f"{prefix} {line}" for line in corpus], [f"{prefix} {c}" for c in captions]
    scene = SceneObjective(captions, labels, tuple(n for _, n in fields))
    return ensure_tiny_llm(out_dir, corpus, config, scene)
