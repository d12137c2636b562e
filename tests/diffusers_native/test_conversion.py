"""Must-show: a converted reference folder and an exported (tiny, trained) shapes run, read back by
``DiffusionPipeline.from_pretrained``, reproduce ``fusedit.load_pipeline``'s latents (within 1e-6; measured: equal);
and a fresh interpreter loads an exported folder offline after ``import fusedit.diffusers_native`` (no remote code).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

import fusedit
from fusedit.cli import main as cli
from fusedit.diffusers_native.pipeline import FuseDiTPipeline
from fusedit.experiment import load_experiment
from fusedit.sampling.export import export_pipeline
from fusedit.train.launch import train_run

FIXTURES = Path(__file__).parents[1] / "fixtures"
VARIANTS = sorted(json.loads((FIXTURES / "reference_variants" / "index.json").read_text())["variants"])
FAST_VARIANTS = ["dit_self_2drope_adalnzero_gemma2", "fuse_cross_ape_adalnsingle_layermap_gemma2"]
TOLERANCE = 1e-6


def sample_like_the_reference(pipe, folder: Path) -> torch.Tensor:
    expected = json.loads((folder / "expected.json").read_text())
    tensors = load_file(str(folder / "expected.safetensors"))
    return pipe(
        expected["prompts"],
        negative_prompt=expected["negative_prompt"],
        height=expected["height"],
        width=expected["width"],
        num_inference_steps=expected["num_inference_steps"],
        guidance_scale=expected["guidance_scale"],
        latents=tensors["initial_latents"].clone(),
        max_sequence_length=expected["max_sequence_length"],
        output_type="latent",
    ).images


def check_conversion(folder: Path, out: Path) -> None:
    direct = sample_like_the_reference(fusedit.load_pipeline(folder / "pipeline", device="cpu"), folder)
    assert cli(["export", str(folder / "pipeline"), str(out)]) == 0
    converted = DiffusionPipeline.from_pretrained(out)
    assert type(converted) is FuseDiTPipeline and converted.experiment is None
    diff = (sample_like_the_reference(converted, folder) - direct).abs().max().item()
    assert diff <= TOLERANCE, f"{folder.name}: DiffusionPipeline.from_pretrained differs from load_pipeline by {diff}"
    reference = load_file(str(folder / "expected.safetensors"))
    key = "latents" if "latents" in reference else "latents_use_cache=False"
    assert (direct - reference[key]).abs().max() < 1e-5, "and both reproduce the reference's own latents"


@pytest.mark.parametrize("name", ["reference-tiny"] + FAST_VARIANTS)
def test_converted_reference_folder_reproduces_load_pipeline(name, tmp_path):
    folder = FIXTURES / name if name == "reference-tiny" else FIXTURES / "reference_variants" / name
    check_conversion(folder, tmp_path / "converted")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(VARIANTS) - set(FAST_VARIANTS)))
def test_every_reference_variant_converts(name, tmp_path):
    check_conversion(FIXTURES / "reference_variants" / name, tmp_path / "converted")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_llm_dir, demo_overrides) -> Path:
    run = tmp_path_factory.mktemp("shapes-run")
    config = load_experiment("demo", demo_overrides(tiny_llm_dir) + ["train.max_steps=4"])
    train_run(config, run, device="cpu", progress=False)
    return run


PROMPTS = ["a red circle to the left of a blue square", "two green triangles", "a white square"]


def run_latents(pipe) -> torch.Tensor:
    generator = [torch.Generator().manual_seed(s) for s in range(6)]
    return pipe(PROMPTS, num_images_per_prompt=2, generator=generator, output_type="latent", guidance_scale=4.0).images


@pytest.mark.slow
def test_exported_shapes_run_reproduces_load_pipeline(trained_run, tmp_path):
    direct = run_latents(fusedit.load_pipeline(trained_run, device="cpu"))
    out = export_pipeline(trained_run, tmp_path / "exported")
    index = json.loads((out / "model_index.json").read_text())
    assert index["run_config"]["export"]["weights"] == "ema" and index["run_config"]["data"]["source"] == "shapes"
    loaded = DiffusionPipeline.from_pretrained(out)
    diff = (run_latents(loaded) - direct).abs().max().item()
    assert diff <= TOLERANCE, f"DiffusionPipeline.from_pretrained differs from load_pipeline(run) by {diff}"
    assert loaded.experiment.model == load_experiment(trained_run / "config.yaml").model
    with pytest.raises(FileExistsError, match="not empty"):
        export_pipeline(trained_run, out)


FRESH = """
import sys, torch
import fusedit.diffusers_native  # registers FuseDiTPipeline with diffusers
from diffusers import DiffusionPipeline
from safetensors.torch import save_file
torch.set_num_threads(1)
pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
generator = [torch.Generator().manual_seed(s) for s in range(6)]
prompts = {prompts!r}
out = pipe(prompts, num_images_per_prompt=2, generator=generator, output_type="latent", guidance_scale=4.0)
save_file({{"latents": out.images.contiguous()}}, sys.argv[2])
"""


@pytest.mark.slow
def test_a_fresh_interpreter_loads_an_export_offline(trained_run, tmp_path):
    out = export_pipeline(trained_run, tmp_path / "exported")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    script = FRESH.format(prompts=PROMPTS)
    done = subprocess.run(
        [sys.executable, "-c", script, str(out), str(tmp_path / "latents.safetensors")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    fresh = load_file(str(tmp_path / "latents.safetensors"))["latents"]
    diff = (fresh - run_latents(fusedit.load_pipeline(trained_run, device="cpu"))).abs().max().item()
    assert diff <= TOLERANCE, diff
    # without the import, diffusers cannot know the class (the README says to import fusedit.diffusers_native)
    bare = "import sys; from diffusers import DiffusionPipeline; DiffusionPipeline.from_pretrained(sys.argv[1])"
    failed = subprocess.run([sys.executable, "-c", bare, str(out)], env=env, capture_output=True, text=True)
    assert failed.returncode != 0 and "FuseDiTPipeline" in failed.stderr
