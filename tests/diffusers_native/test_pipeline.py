"""FuseDiTPipeline does what diffusers users expect: save_pretrained / DiffusionPipeline.from_pretrained round-trip
(sharded, dtype), num_images_per_prompt, lists of generators, callback_on_step_end (and interrupt),
set_progress_bar_config, enable_model_cpu_offload, output_type and return_dict."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

import fusedit
from fusedit.diffusers_native.pipeline import FuseDiTPipeline, FuseDiTPipelineOutput
from tests.diffusers_native.conftest import tiny_pipeline

PROMPTS = ["a red circle to the left of a blue square", "two green triangles"]
KWARGS = dict(height=16, width=16, num_inference_steps=3, guidance_scale=3.0)


def seeded(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def latents_of(pipe, prompts=PROMPTS, **kwargs) -> torch.Tensor:
    return pipe(prompts, output_type="latent", **{**KWARGS, "generator": seeded(0, 1), **kwargs}).images


def test_save_pretrained_and_from_pretrained_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "saved", max_shard_size="50KB")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "FuseDiTPipeline"
    assert index["transformer"] == ["fusedit.diffusers_native.transformer", "FuseDiTTransformer2DModel"]
    assert index["text_encoder"][0] == "transformers" and index["vae"] == [None, None]
    assert index["text_config"]["llm"] == "text_encoder" and index["run_config"]["data"]["source"] == "shapes"
    assert (tmp_path / "saved" / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert type(loaded) is FuseDiTPipeline
    diff = (latents_of(loaded) - latents_of(pipe)).abs().max().item()
    assert diff == 0, f"{diff}: weights are copied out of their memory maps, so the samples are bit for bit equal"
    assert loaded.experiment.model == pipe.experiment.model and loaded.defaults == pipe.defaults
    assert fusedit.load_pipeline(tmp_path / "saved", device="cpu").model.model_config == pipe.model.model_config
    half = DiffusionPipeline.from_pretrained(tmp_path / "saved", dtype=torch.bfloat16)
    assert half.transformer.dtype == torch.bfloat16 and half.text_encoder.dtype == torch.bfloat16
    assert latents_of(half).isfinite().all()


def test_images_per_prompt_and_a_list_of_generators(pipe):
    both = latents_of(pipe, num_images_per_prompt=2, generator=seeded(10, 11, 12, 13))
    assert both.shape == (4, 3, 16, 16)
    for i, (prompt, seed) in enumerate(zip([PROMPTS[0]] * 2 + [PROMPTS[1]] * 2, (10, 11, 12, 13), strict=True)):
        alone = latents_of(pipe, prompt, generator=seeded(seed))
        torch.testing.assert_close(both[i : i + 1], alone, atol=1e-5, rtol=1e-5)
    assert (both[0] - both[1]).abs().max() > 1e-3, "two seeds, two images"
    with pytest.raises(ValueError, match="list of 3 generators for 4 images"):
        latents_of(pipe, num_images_per_prompt=2, generator=seeded(1, 2, 3))


def test_callback_on_step_end_sees_every_step_and_can_change_the_latents(pipe):
    seen: list[tuple[int, float, tuple]] = []

    def record(p, i, t, kwargs):
        assert p is pipe and p.num_timesteps == 3 and p.guidance_scale == 3.0
        seen.append((i, float(t), tuple(kwargs["latents"].shape)))
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == 2 else {}

    out = latents_of(pipe, callback_on_step_end=record)
    assert [s[0] for s in seen] == [0, 1, 2] and seen[0][1] == 1000.0 and seen[0][2] == (2, 3, 16, 16)
    assert out.abs().max() == 0, "the latents the callback returns at the last step are the output"

    after_first: list[torch.Tensor] = []

    def stop(p, i, t, kwargs):
        after_first.append(kwargs["latents"].clone())
        p._interrupt = True
        return {}

    torch.testing.assert_close(latents_of(pipe, callback_on_step_end=stop), after_first[0])
    assert len(after_first) == 1
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        latents_of(pipe, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["prompt_embeds"])


def test_output_types_and_return_dict(pipe):
    out = pipe(PROMPTS[0], **KWARGS, generator=seeded(0))
    assert isinstance(out, FuseDiTPipelineOutput) and isinstance(out.images[0], Image.Image)
    assert out.images[0].size == (16, 16)
    array = pipe(PROMPTS[0], **KWARGS, generator=seeded(0), output_type="np").images
    tensor = pipe(PROMPTS[0], **KWARGS, generator=seeded(0), output_type="pt").images
    assert array.shape == (1, 16, 16, 3) and tensor.shape == (1, 3, 16, 16)
    np.testing.assert_allclose(array[0], tensor[0].permute(1, 2, 0).numpy())
    np.testing.assert_array_equal(np.asarray(out.images[0]), (array[0] * 255).round().astype(np.uint8))
    as_tuple = pipe(PROMPTS[0], **KWARGS, generator=seeded(0), output_type="pt", return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    torch.testing.assert_close(as_tuple[0], tensor)


def test_progress_bar_follows_set_progress_bar_config(pipe, capfd):
    capfd.readouterr()
    latents_of(pipe)
    assert "3/3" not in capfd.readouterr().err
    pipe.set_progress_bar_config(disable=False)
    try:
        latents_of(pipe)
        assert "3/3" in capfd.readouterr().err
    finally:
        pipe.set_progress_bar_config(disable=True)


def test_model_cpu_offload_gives_the_same_samples(tiny_llm_dir, demo_overrides):
    """The accelerate hooks of enable_model_cpu_offload, exercised with the CPU as the 'accelerator' (the machine
    running the tests has no GPU): components move to the execution device when they run, same numbers."""
    pipe = tiny_pipeline(tiny_llm_dir, demo_overrides(tiny_llm_dir))
    expected = latents_of(pipe)
    pipe.enable_model_cpu_offload(device="cpu")
    assert hasattr(pipe.transformer, "_hf_hook") and pipe._execution_device.type == "cpu"
    torch.testing.assert_close(latents_of(pipe), expected, rtol=0, atol=0)


def test_only_the_llm_layers_the_model_reads_are_saved(tiny_llm_dir, demo_overrides, tmp_path):
    overrides = demo_overrides(tiny_llm_dir) + [
        "model.shared_attention_layers=[0]",
        "model.dit_num_hidden_layers=2",
        "model.text_modulation=false",  # a pooled text embedding reads the last layer: nothing would be dropped
    ]
    pipe = tiny_pipeline(tiny_llm_dir, overrides)
    assert len(pipe.context_encoder.decoder.layers) == 1 and pipe.text_encoder.config.num_hidden_layers == 1
    pipe.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "text_encoder" / "config.json").read_text())["num_hidden_layers"] == 1
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert loaded.transformer.resolved.llm.num_hidden_layers == 2, "the model keeps the LLM's full geometry"
    torch.testing.assert_close(latents_of(loaded), latents_of(pipe), rtol=0, atol=1e-6)
