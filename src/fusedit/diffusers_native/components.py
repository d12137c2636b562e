"""What the diffusers pipeline keeps beside its components, and the small fixes that make components saveable.

A :class:`~fusedit.diffusers_native.pipeline.FuseDiTPipeline` folder records three fusedit sections in its
``model_index.json`` (the model's own section is the transformer's ``config.json``):

* ``text_config``: the :class:`~fusedit.text.config.TextConfig` (prompt format, padding, attention flavour, pooled
  text); its paths name the folder's components (``text_encoder``, ``tokenizer``, ``text_encoder_2``);
* ``sample_defaults``: the :class:`~fusedit.experiment.SampleConfig` (steps, CFG, negative prompt, shift, interval);
* ``run_config``: the rest of a training run's :class:`~fusedit.experiment.ExperimentConfig` (``name``, ``data``,
  ``train``; the VAE path names ``vae``; ``export``: the source run and which weights, for an exported folder), or
  ``null`` for a converted reference folder.

Every section is written from its dataclass and read back through :func:`fusedit.config.from_dict` (unknown keys
refused, missing keys defaulted, values validated), so a field added to a config travels without a change here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from fusedit.config import from_dict, to_dict
from fusedit.experiment import ExperimentConfig, SampleConfig
from fusedit.models.config import ModelConfig
from fusedit.text.config import TextConfig

#: The key of ``run_config`` that records where an exported folder's weights came from (not a config section).
EXPORT_KEY = "export"
#: The folder names of the components the text section points at.
TEXT_ENCODER, TOKENIZER, POOLED_ENCODER = "text_encoder", "tokenizer", "text_encoder_2"


def text_config_for_folder(text: TextConfig) -> TextConfig:
    """``text`` with its LLM, tokenizer and CLIP paths naming the pipeline folder's components."""
    return dataclasses.replace(
        text,
        llm=TEXT_ENCODER,
        tokenizer=TOKENIZER,
        clip_model=POOLED_ENCODER if text.pooled == "clip" else None,
    )


def run_config_of(experiment: ExperimentConfig | None) -> dict[str, Any] | None:
    """The run-only sections of ``experiment`` (``name``, ``data``, ``train``) for ``model_index.json``; the VAE, saved
    as the ``vae`` component, is named by its folder."""
    if experiment is None:
        return None
    data = experiment.data
    if data.vae is not None:
        data = dataclasses.replace(data, vae="vae", vae_subfolder=None)
    return {"name": experiment.name, "data": to_dict(data), "train": to_dict(experiment.train)}


def read_text_config(data: Mapping[str, Any] | None) -> TextConfig:
    return from_dict(TextConfig, dict(data or {"llm": TEXT_ENCODER}), "text_config")


def read_sample_defaults(data: Mapping[str, Any] | None) -> SampleConfig:
    return from_dict(SampleConfig, dict(data or {}), "sample_defaults")


def experiment_of(
    run_config: Mapping[str, Any] | None, model: ModelConfig, text: TextConfig, sample: SampleConfig
) -> ExperimentConfig | None:
    """The run's :class:`ExperimentConfig` put back together (None without a ``run_config``)."""
    if run_config is None:
        return None
    sections = {"model": to_dict(model), "text": to_dict(text), "sample": to_dict(sample)}
    run = {key: value for key, value in run_config.items() if key != EXPORT_KEY}
    return from_dict(ExperimentConfig, {**run, **sections})


def match_config_to_layers(decoder: Any) -> None:
    """Make ``decoder.config`` describe the layers the decoder still has.

    The text encoder drops the LLM layers past the last one a deep-fusion model reads
    (:meth:`fusedit.text.encoder.TextEncoder._truncate_unused_layers`); the saved ``text_encoder/`` must then say so,
    or loading it would build (and randomly initialise) the dropped layers. The model's own record of the LLM's
    geometry (``llm_geometry`` in the transformer's config) keeps the full depth.
    """
    config, kept = decoder.config, len(decoder.layers)
    if config.num_hidden_layers == kept:
        return
    config.num_hidden_layers = kept
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = list(config.layer_types)[:kept]


def prepare_tokenizer(tokenizer: Any, padding_side: str) -> Any:
    """Set the padding side of the text config and fall back to EOS for a missing pad token (as
    :func:`fusedit.text.llm.load_tokenizer` does)."""
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def align_cpu_tensors(module: Any, alignment: int = 64) -> None:
    """Copy the CPU parameters and buffers of ``module`` that start at an address not aligned to ``alignment``
    bytes into freshly allocated (aligned) memory.

    Weights read from a memory-mapped safetensors file sit wherever the file puts them; float32 CPU kernels then take
    other code paths and round differently (about 1e-7 per operation, measured 1e-6 to 4e-6 after a few sampling
    steps of the reference fixtures). One copy at load time makes a loaded folder sample bit for bit like the
    pipeline that saved it (and leaves the memory map).
    """
    if not isinstance(module, torch.nn.Module):
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.device.type == "cpu" and tensor.numel() and tensor.data_ptr() % alignment:
                tensor.data = tensor.data.clone()
