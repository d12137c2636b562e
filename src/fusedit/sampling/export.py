"""Export a trained run to a self-contained pipeline folder.

Layout::

    OUT/model_index.json          {"_class_name": "FuseDiTPipeline", "fusedit": "<version>", ...}
    OUT/config.yaml               the ExperimentConfig (paths to local LLM/VAE rewritten relative to OUT)
    OUT/transformer/model.safetensors   trained weights (EMA by default)
    OUT/transformer/config.json   the model and text sections as JSON
    OUT/scheduler/scheduler_config.json
    OUT/llm/                      the LLM + tokenizer, copied only when they are local folders (a hub id stays a hub
                                  id: the LLM is never copied into training checkpoints)
    OUT/vae/                      the VAE, same rule
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import save_file

from fusedit import __version__
from fusedit.atomic import write_text_atomic
from fusedit.checkpoint.weights import find_run_weights
from fusedit.experiment import load_experiment
from fusedit.sampling.pipeline import make_scheduler


def _copy_folder(source: str, target: Path) -> None:
    shutil.copytree(source, target, dirs_exist_ok=True)


def export_pipeline(run_dir: str | Path, out_dir: str | Path, *, use_ema: bool = True, copy_local: bool = True) -> Path:
    """Write the pipeline folder of ``run_dir`` into ``out_dir`` (which must not exist or be empty); the weights come
    from ``final/``, else from the run's latest checkpoint (single-process or sharded)."""

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing: {run_dir} is not a training run directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new folder")
    config = load_experiment(config_path)
    weights = find_run_weights(run_dir, use_ema)
    tmp = out_dir.with_name(out_dir.name + ".tmp-export")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "transformer").mkdir(parents=True)
    save_file(weights.read(), str(tmp / "transformer" / "model.safetensors"))
    text, data = config.text, config.data
    if copy_local and Path(text.llm).is_dir():
        _copy_folder(text.llm, tmp / "llm")
        tokenizer = text.tokenizer
        if tokenizer and Path(tokenizer).is_dir() and Path(tokenizer).resolve() != Path(text.llm).resolve():
            _copy_folder(tokenizer, tmp / "tokenizer")
            tokenizer = "tokenizer"
        elif tokenizer and Path(tokenizer).resolve() == Path(text.llm).resolve():
            tokenizer = "llm"
        text = dataclasses.replace(text, llm="llm", tokenizer=tokenizer)
    if copy_local and data.vae and Path(data.vae).is_dir():
        _copy_folder(data.vae, tmp / "vae")
        data = dataclasses.replace(data, vae="vae")
    config = dataclasses.replace(config, text=text, data=data)
    write_text_atomic(tmp / "config.yaml", yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    # The same configuration as JSON beside the weights (model + text sections), for tools that read JSON.
    transformer_config = {
        "model": dataclasses.asdict(config.model),
        "text": dataclasses.asdict(config.text),
        "fusedit_version": __version__,
    }
    write_text_atomic(tmp / "transformer" / "config.json", json.dumps(transformer_config, indent=2))
    scheduler: Any = make_scheduler(config.sample.shift)
    scheduler.save_pretrained(str(tmp / "scheduler"))
    index = {
        "_class_name": "FuseDiTPipeline",
        "fusedit": __version__,
        "weights": "ema" if weights.ema else "model",
        "source_run": str(run_dir.resolve()),
    }
    write_text_atomic(tmp / "model_index.json", json.dumps(index, indent=2))
    if out_dir.exists():
        out_dir.rmdir()
    tmp.rename(out_dir)
    return out_dir
