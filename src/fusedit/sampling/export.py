"""Export a trained run (or convert a reference folder) to a self-contained pipeline folder in diffusers' format.

Layout (``FuseDiTPipeline.save_pretrained``; ``DiffusionPipeline.from_pretrained`` reads it back after
``import fusedit.diffusers_native``, and so does :func:`fusedit.load_pipeline`)::

    OUT/model_index.json          {"_class_name": "FuseDiTPipeline", components, "text_config", "sample_defaults",
                                   "run_config" (name, data, train, and "export": where the weights came from)}
    OUT/transformer/              config.json (every model.* field + the LLM's geometry) and
                                  diffusion_pytorch_model.safetensors (sharded past max_shard_size)
    OUT/scheduler/                scheduler_config.json (FlowMatchEulerDiscreteScheduler, the run's shift)
    OUT/text_encoder/             the LLM's decoder (the layers the model reads), save_pretrained
    OUT/tokenizer/
    OUT/vae/                      the VAE, when the model has one
    OUT/text_encoder_2/, OUT/tokenizer_2/   the CLIP text model of text.pooled: clip

The LLM and the VAE are written into the folder (hub ids included), so that it loads with nothing else.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fusedit import __version__
from fusedit.checkpoint.weights import find_run_weights
from fusedit.diffusers_native.convert import save_pipeline
from fusedit.sampling.loading import load_pipeline


def export_pipeline(
    run_dir: str | Path, out_dir: str | Path, *, use_ema: bool = True, max_shard_size: str | int = "10GB"
) -> Path:
    """Write the pipeline of ``run_dir`` into ``out_dir`` (which must not exist or be empty) in diffusers' format.

    ``run_dir``: a training run (the weights come from ``final/``, else from its latest checkpoint, single-process
    or sharded; EMA unless ``use_ema`` is false), an older fusedit export, or a reference (fuse-dit) pipeline folder
    (converted). ``max_shard_size``: the transformer's weights are split into files of at most this size.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not run_dir.exists():
        raise FileNotFoundError(f"{run_dir} does not exist; expected a training run directory or a reference folder")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new folder")
    pipe = load_pipeline(run_dir, device="cpu", dtype=torch.float32, use_ema=use_ema)
    if any(pipe.get_list_adapters().values()):  # a LoRA run: its adapters merged into the exported weights
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    if pipe.config["run_config"] is not None:
        ema = (run_dir / "config.yaml").is_file() and find_run_weights(run_dir, use_ema).ema
        provenance = {"source": str(run_dir.resolve()), "weights": "ema" if ema else "model", "fusedit": __version__}
        pipe.register_to_config(run_config={**pipe.config["run_config"], "export": provenance})
    return save_pipeline(pipe, out_dir, max_shard_size=max_shard_size)
