"""Into the diffusers format: a loaded model's parts (a training run, an old export, a reference folder) become a
:class:`~fusedit.diffusers_native.pipeline.FuseDiTPipeline`, and a pipeline becomes a folder that
``DiffusionPipeline.from_pretrained`` reads.

The reference importer (:mod:`fusedit.reference.importer`) is a converter through here: ``fusedit.load_pipeline``
of a reference folder and ``fusedit export REFERENCE_FOLDER OUT`` give this class, the latter written to disk.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from fusedit.atomic import naming_full_disk
from fusedit.checkpoint.errors import CheckpointError
from fusedit.checkpoint.verify import verify_saved_weights
from fusedit.config import to_dict
from fusedit.diffusers_native.components import match_config_to_layers, run_config_of, text_config_for_folder
from fusedit.diffusers_native.pipeline import FuseDiTPipeline
from fusedit.diffusers_native.transformer import FuseDiTTransformer2DModel
from fusedit.experiment import ExperimentConfig, SampleConfig
from fusedit.models.dit import DiffusionTransformer
from fusedit.text.encoder import TextEncoder

PIPELINE_CLASS = "FuseDiTPipeline"
TRANSFORMER_CLASS = "FuseDiTTransformer2DModel"


def pipeline_from_parts(
    model: DiffusionTransformer,
    text_encoder: TextEncoder,
    scheduler: Any,
    codec: Any,
    defaults: SampleConfig,
    experiment: ExperimentConfig | None = None,
) -> FuseDiTPipeline:
    """The diffusers pipeline of fusedit's parts (shared, not copied): the model, its
    :class:`~fusedit.text.encoder.TextEncoder` (LLM, tokenizer, optional CLIP pooler), a flow-match scheduler, the
    codec (a VAE's or pixels) and the sampling defaults; ``experiment``: the run's config (None for a reference)."""
    transformer = FuseDiTTransformer2DModel.from_model(model)
    match_config_to_layers(text_encoder.decoder)
    pooled = text_encoder.pooled_encoder
    pipe = FuseDiTPipeline(
        transformer=transformer,
        scheduler=scheduler,
        text_encoder=text_encoder.decoder,
        tokenizer=text_encoder.tokenizer,
        vae=getattr(codec, "vae", None),
        text_encoder_2=getattr(pooled, "model", None),
        tokenizer_2=getattr(pooled, "tokenizer", None),
        text_config=to_dict(text_config_for_folder(text_encoder.config)),
        sample_defaults=to_dict(defaults),
        run_config=run_config_of(experiment),
    )
    pipe.source_experiment = experiment
    pipe.prompt_expander = text_encoder.formatter.expander if text_encoder.formatter is not None else None
    return pipe


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a saved :class:`FuseDiTPipeline` (its ``model_index.json`` names the class and a
    fusedit transformer)."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return False
    try:
        data = json.loads(index.read_text())
    except json.JSONDecodeError:
        return False
    transformer = data.get("transformer")
    return (
        data.get("_class_name") == PIPELINE_CLASS
        and isinstance(transformer, list)
        and len(transformer) == 2
        and transformer[1] == TRANSFORMER_CLASS
    )


def load_diffusers_folder(path: str | os.PathLike, device: torch.device, dtype: torch.dtype) -> FuseDiTPipeline:
    """``FuseDiTPipeline.from_pretrained(path)`` with the transformer and the LLM in ``dtype`` (the VAE and a CLIP
    pooler stay float32, as fusedit loads them), on ``device``."""
    dtypes = {"transformer": dtype, "text_encoder": dtype, "default": torch.float32}
    pipe = FuseDiTPipeline.from_pretrained(str(path), dtype=dtypes)
    return pipe.to(device)


def save_pipeline(pipe: FuseDiTPipeline, out_dir: str | os.PathLike, max_shard_size: str | int = "10GB") -> Path:
    """Write ``pipe`` with ``save_pretrained`` into ``out_dir`` (which must not exist or be empty) through a temporary
    sibling, so that a failure leaves no half-written folder. The transformer's weights are read back and compared
    with the model's before the folder is renamed into place."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new folder")
    tmp = out_dir.with_name(out_dir.name + ".tmp-export")
    if tmp.exists():
        shutil.rmtree(tmp)
    with naming_full_disk(out_dir, cleanup=tmp):  # a full disk: the partial folder goes, the message names out_dir
        pipe.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=max_shard_size)
    try:
        verify_saved_weights(pipe.transformer, tmp / "transformer")
    except CheckpointError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        out_dir.rmdir()
    tmp.rename(out_dir)
    return out_dir
