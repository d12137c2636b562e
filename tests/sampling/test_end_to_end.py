"""Train -> checkpoint -> resume -> export -> load -> sample, with a real (tiny) LLM and model, on CPU.

(Cached = uncached = training-time sampling is tested on a text-dependent model in ``test_text_paths.py``.)
"""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import fusedit
from fusedit.checkpoint.errors import CheckpointError
from fusedit.cli import main as cli
from fusedit.config import ConfigError
from fusedit.experiment import load_experiment
from fusedit.sampling.denoise import conditional_velocity, guided_velocity
from fusedit.sampling.export import export_pipeline
from fusedit.sampling.text import CachedText
from fusedit.text.context import TextContext
from fusedit.train.launch import train_run

pytestmark = pytest.mark.slow

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llm_dir, demo_overrides):
    run = tmp_path_factory.mktemp("run")
    config = load_experiment("demo", demo_overrides(tiny_llm_dir))
    summary = train_run(config, run, device="cpu", progress=False)
    return run, config, summary


def test_resume_continues_exactly(tmp_path, tiny_llm_dir, demo_overrides, trained):
    """Crash after the step-2 checkpoint (later checkpoints, final weights and metrics lost), resume to step 4."""
    run, _, summary = trained
    crashed = tmp_path / "crashed"
    shutil.copytree(run, crashed)
    shutil.rmtree(crashed / "final")
    shutil.rmtree(crashed / "checkpoints" / "step-000004")
    (crashed / "checkpoints" / "latest").write_text("step-000002")
    resumed = train_run(load_experiment("demo", demo_overrides(tiny_llm_dir)), crashed, device="cpu", progress=False)
    assert resumed.start_step == 2 and resumed.step == 4
    assert set(resumed.losses) == {3, 4}
    for step in (3, 4):
        assert abs(resumed.losses[step] - summary.losses[step]) <= 1e-6, (step, resumed.losses[step])
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(str(run / "final" / name)), load_file(str(crashed / "final" / name))
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_cached_text_contexts_resume_exactly_and_train_as_the_uncached_run(tmp_path, tiny_llm_dir, demo_overrides):
    """``train.cache_text_context``: the resumed run starts with an empty cache, and still continues exactly; the
    losses are those of the uncached run up to float rounding (rows encoded alone instead of batched)."""
    overrides = demo_overrides(tiny_llm_dir)
    uncached = train_run(
        load_experiment("demo", overrides + ["train.cache_text_context=false"]), tmp_path / "uncached", progress=False
    )
    cached = overrides + ["train.cache_text_context=true"]
    full = train_run(load_experiment("demo", cached), tmp_path / "full", device="cpu", progress=False)
    for step, loss in uncached.losses.items():
        assert abs(full.losses[step] - loss) <= 1e-4, (step, full.losses[step], loss)
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "full", crashed)
    shutil.rmtree(crashed / "final")
    shutil.rmtree(crashed / "checkpoints" / "step-000004")
    (crashed / "checkpoints" / "latest").write_text("step-000002")
    resumed = train_run(load_experiment("demo", cached), crashed, device="cpu", progress=False)
    assert resumed.start_step == 2 and {s: resumed.losses[s] for s in (3, 4)} == {s: full.losses[s] for s in (3, 4)}
    a = load_file(str(tmp_path / "full" / "final" / "ema.safetensors"))
    b = load_file(str(crashed / "final" / "ema.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_frozen_llm_is_not_in_checkpoints(trained):
    run, _, summary = trained
    weights = load_file(str(summary.last_checkpoint / "model.safetensors"))
    assert weights and not any(k.startswith("llm.") for k in weights)


def test_cfg_scale_one_is_the_conditional_prediction(trained):
    run, _, _ = trained
    pipe = fusedit.load_pipeline(run, device="cpu")
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(500.0)
    cond = pipe.encode_prompt(PROMPTS)
    expected = pipe.model(x, t.expand(2), cond)
    both = TextContext.cat([pipe.unconditional_context("", 2), cond])
    velocity = CachedText(pipe.model, cond, both)
    torch.testing.assert_close(conditional_velocity(velocity, x, t), expected)
    torch.testing.assert_close(guided_velocity(velocity, x, t, 1.0), expected, atol=1e-5, rtol=1e-5)


def test_guidance_interval_guides_only_inside_it(trained):
    run, _, _ = trained
    pipe = fusedit.load_pipeline(run, device="cpu")
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():  # the briefly trained model barely reads the text yet; perturb it so that guidance matters
        for parameter in pipe.model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    latents = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    kwargs = dict(num_inference_steps=4, guidance_scale=3.0, latents=latents, output_type="latent")
    interval = (0.0, 0.6)
    guided = pipe(PROMPTS, guidance_interval=interval, **kwargs).images

    # Independent loop: the full CFG batch everywhere, the guided velocity kept only where σ lies in the interval.
    encoder, model, scheduler = pipe.context_encoder, pipe.model, pipe.scheduler
    scheduler.set_timesteps(4)
    sigmas = [float(t) / 1000 for t in scheduler.timesteps]
    assert any(s > interval[1] for s in sigmas) and any(s <= interval[1] for s in sigmas), sigmas
    x = latents.clone()
    for t in scheduler.timesteps:
        v_cond = model(x, t.expand(2), encoder.encode(PROMPTS))
        v_uncond = model(x, t.expand(2), encoder.encode(["", ""]))
        v = v_uncond + 3.0 * (v_cond - v_uncond) if float(t) / 1000 <= interval[1] else v_cond
        x = scheduler.step(v, t, x, return_dict=False)[0]
    torch.testing.assert_close(guided, x, atol=1e-5, rtol=1e-5)

    everywhere = pipe(PROMPTS, **kwargs).images
    torch.testing.assert_close(pipe(PROMPTS, guidance_interval=[0.0, 1.0], **kwargs).images, everywhere)
    assert (guided - everywhere).abs().max() > 1e-4, "skipping guidance at high noise must change the samples"
    nowhere = pipe(PROMPTS, guidance_interval=[0.0, 0.0], **kwargs).images
    unguided = pipe(PROMPTS, **{**kwargs, "guidance_scale": 1.0}).images
    torch.testing.assert_close(nowhere, unguided, atol=1e-5, rtol=1e-5)

    # the model's sample config supplies the default; bad intervals are refused with the rule
    pipe.defaults.guidance_interval = list(interval)
    torch.testing.assert_close(pipe(PROMPTS, **kwargs).images, guided)
    for bad in ([0.7, 0.2], [0.0, 1.5], [0.5]):
        with pytest.raises(ValueError, match="guidance_interval"):
            pipe(PROMPTS, guidance_interval=bad, **kwargs)
    with pytest.raises(ConfigError, match=r"sample.guidance_interval: got \[0.9, 0.1\], expected 0 <= sigma_low"):
        load_experiment("demo", ["sample.guidance_interval=[0.9, 0.1]"])


def test_export_round_trip_is_exact(trained, tmp_path):
    run, _, _ = trained
    out = export_pipeline(run, tmp_path / "exported")
    assert (out / "text_encoder" / "config.json").is_file(), "the LLM is written into the exported folder"
    shutil.move(str(run), str(tmp_path / "moved-run"))  # the export must not depend on the run directory
    try:
        exported = fusedit.load_pipeline(out, device="cpu")
        weights = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
        own = exported.model.state_dict()
        assert weights.keys() == own.keys() and all(torch.equal(own[k], v) for k, v in weights.items())
        images = exported(PROMPTS, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
        assert len(images) == 2 and images[0].size == (16, 16)
        assert exported.experiment is not None and exported.experiment.data.source == "shapes"
    finally:
        shutil.move(str(tmp_path / "moved-run"), str(run))


def test_cli_sample_and_user_errors(trained, tmp_path, capsys):
    run, _, _ = trained
    target = tmp_path / "img.png"
    assert cli(["sample", str(run), "--prompt", "a red circle", "--out", str(target), "--steps", "2"]) == 0
    assert target.is_file()

    assert cli(["sample", str(run), "--prompt", "a red circle", "--out", str(target), "--height", "18"]) == 2
    assert "height and width must be positive multiples of 4" in capsys.readouterr().err
    # the demo config's sin-cos position table covers 16 patches of 4 px per side
    assert cli(["sample", str(run), "--prompt", "a red circle", "--out", str(target), "--height", "68"]) == 2
    assert "68x16 is larger than this model's sin-cos position table allows: at most 64x64" in capsys.readouterr().err
    assert cli(["sample", str(run), "--prompt", "   ", "--out", str(target)]) == 2
    assert "prompt 0 is empty" in capsys.readouterr().err
    assert cli(["sample", str(tmp_path / "nope"), "--prompt", "x", "--out", str(target)]) == 2
    assert "does not exist" in capsys.readouterr().err
    long_prompt = " ".join(["a red circle and a blue square"] * 5)
    assert cli(["sample", str(run), "--prompt", long_prompt, "--out", str(target), "--steps", "1"]) == 0
    assert "1 prompt(s) were longer than the maximum text length and were truncated" in capsys.readouterr().out
    assert cli(["train", "demo", "model.pos_embd=ape"]) == 2
    assert "unknown key 'model.pos_embd'" in capsys.readouterr().err
    interval = ["--guidance-interval", "0", "0.5", "--steps", "2", "--cfg", "3"]
    assert cli(["sample", str(run), "--prompt", "a red circle", "--out", str(target)] + interval) == 0
    assert (
        cli(["sample", str(run), "--prompt", "a red circle", "--out", str(target), "--guidance-interval", "0.5", "0.1"])
        == 2
    )
    assert "guidance_interval: got [0.5, 0.1], expected 0 <= sigma_low <= sigma_high <= 1" in capsys.readouterr().err


def test_cli_samples_at_a_non_square_bucket_size(trained, tmp_path):
    run, _, _ = trained
    target = tmp_path / "wide.png"
    argv = ["sample", str(run), "--prompt", "a red circle", "--out", str(target), "--steps", "2"]
    assert cli([*argv, "--height", "16", "--width", "32"]) == 0
    assert Image.open(target).size == (32, 16)


@pytest.mark.parametrize(
    "resolution,message",
    [
        (18, "data.resolution: got 18, expected a multiple of 4 (model.patch_size 4 × the codec's spatial factor 1)"),
        (
            68,
            "data.resolution: got 68, which is 17 patches per side, but the sin-cos position table has "
            "model.pos_embed_max_size=16",
        ),
    ],
)
def test_training_size_is_checked_before_training(tmp_path, tiny_llm_dir, demo_overrides, resolution, message):
    config = load_experiment("demo", demo_overrides(tiny_llm_dir) + [f"data.resolution={resolution}"])
    with pytest.raises(ConfigError) as error:
        train_run(config, tmp_path / "run", device="cpu", progress=False)
    assert message in str(error.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_and_corrupt_checkpoints_are_reported(trained, tmp_path):
    run, _, _ = trained
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    ema = broken / "final" / "ema.safetensors"
    ema.write_bytes(ema.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        fusedit.load_pipeline(broken, device="cpu")
    empty = tmp_path / "empty-run"
    (empty / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "config.yaml", empty / "config.yaml")
    with pytest.raises(CheckpointError, match="no final/ weights and no checkpoint"):
        fusedit.load_pipeline(empty, device="cpu")


def test_negative_prompt_as_a_list(trained):
    run, _, _ = trained
    pipe = fusedit.load_pipeline(run, device="cpu")
    latents = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    kwargs = dict(num_inference_steps=2, guidance_scale=2.0, latents=latents, output_type="latent")
    same = pipe(PROMPTS, negative_prompt=["", ""], **kwargs).images
    torch.testing.assert_close(same, pipe(PROMPTS, negative_prompt="", **kwargs).images)
    mixed = pipe(PROMPTS, negative_prompt=["", "a white square"], **kwargs).images
    torch.testing.assert_close(mixed[0], same[0])
    assert (mixed[1] - same[1]).abs().max() > 0, "the second prompt's own negative prompt must be used"
    with pytest.raises(ValueError, match="one per prompt"):
        pipe(PROMPTS, negative_prompt=["only one"], **kwargs)


def test_run_with_a_relative_llm_path_loads_from_any_directory(tmp_path, tiny_llm_dir, demo_overrides, monkeypatch):
    monkeypatch.chdir(tiny_llm_dir.parent)
    config = load_experiment("demo", demo_overrides(tiny_llm_dir.name) + ["train.max_steps=1"])
    assert config.text.llm == tiny_llm_dir.name
    run = tmp_path / "run"
    train_run(config, run, device="cpu", progress=False)
    monkeypatch.chdir(tmp_path)  # the LLM folder is not reachable by its relative name from here
    saved = load_experiment(run / "config.yaml")
    assert saved.text.llm == str(tiny_llm_dir.resolve())
    pipe = fusedit.load_pipeline(run, device="cpu")
    assert pipe("a red circle", num_inference_steps=1, output_type="pt").images.shape == (1, 3, 16, 16)
