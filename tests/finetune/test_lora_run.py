"""A LoRA run end to end: adapters alone in peft's format in checkpoints and final/, the adapter round trip into a
fresh pipeline, fused = unfused, weight 0 and unloading give the base model back, exact resume, LLM adapters,
export, and ``fusedit sample --lora``."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fusedit.commands import main
from fusedit.data.codec import PixelCodec
from fusedit.experiment import load_experiment
from fusedit.finetune.adapters import read_adapter
from fusedit.finetune.init import read_init_weights
from fusedit.sampling.export import export_pipeline
from fusedit.sampling.loading import load_pipeline
from fusedit.sampling.pipeline import FuseDiTPipeline as Sampler
from fusedit.sampling.pipeline import make_scheduler
from fusedit.train.launch import build_trainer
from tests.conftest import overrides_for
from tests.finetune.conftest import lora_config, sample, train

pytestmark = pytest.mark.slow


def sampler_of(trainer) -> Sampler:
    """fusedit's sampler over the trainer's own (adapted) model and text encoder."""
    config = trainer.experiment
    encoder = getattr(trainer.text_encoder, "encoder", trainer.text_encoder)  # inside train.cache_text_context's cache
    return Sampler(trainer.model, encoder, make_scheduler(config.sample.shift), PixelCodec(), config.sample)


@pytest.fixture(scope="module")
def lora_run(tiny_llm_dir, base_folder, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lora") / "teal"
    config = lora_config(tiny_llm_dir, base_folder, "name=teal")
    return run_dir, train(config, run_dir)


@pytest.fixture()
def base_pipe(base_folder):
    return load_pipeline(base_folder, device="cpu")


def test_only_adapters_train_and_they_are_saved_alone(lora_run, base_folder):
    run_dir, trainer = lora_run
    assert set(trainer.params) and all(".lora_" in name for name in trainer.params)
    base = load_pipeline(base_folder, device="cpu").transformer.state_dict()
    for name, tensor in trainer.model.state_dict().items():  # the base weights did not move
        if ".lora_" not in name:
            assert torch.equal(tensor, base[name.replace(".base_layer", "")]), name
    for folder in (run_dir / "final", run_dir / "checkpoints" / "step-000004"):
        dit, llm = read_adapter(folder / "adapter")
        assert (
            llm is None
            and dit.config["r"] == 4
            and dit.config["lora_alpha"] == 12
            and dit.config["peft_type"] == "LORA"
        )
        assert all(k.startswith("base_model.model.layers.") and ".lora_" in k for k in dit.weights)
        assert len(dit.weights) == len(trainer.params)
    saved = load_file(run_dir / "final" / "adapter" / "adapter_model.safetensors")
    name = "base_model.model.layers.0.self_attn.q_proj.lora_B.weight"
    assert torch.equal(saved[name], trainer.params["layers.0.self_attn.q_proj.lora_B.default.weight"].detach())
    assert saved[name].abs().max() > 0, "the adapters trained"
    assert (run_dir / "final" / "adapter_ema" / "adapter_config.json").is_file()


def test_adapter_round_trip_gives_the_trained_models_samples(lora_run, base_pipe):
    run_dir, trainer = lora_run
    expected = sample(sampler_of(trainer))
    base_pipe.load_lora_weights(run_dir / "final" / "adapter", adapter_name="teal")
    assert base_pipe.get_list_adapters() == {"transformer": ["teal"]}
    got = sample(base_pipe)
    assert (got - expected).abs().max().item() <= 1e-6  # measured: 0 (bit for bit)
    assert (got - sample(load_pipeline(run_dir, device="cpu", use_ema=False))).abs().max().item() <= 1e-6


def test_fused_equals_unfused_and_weight_zero_or_unloading_is_the_base(lora_run, base_pipe):
    run_dir, _ = lora_run
    base = sample(base_pipe)
    base_pipe.load_lora_weights(run_dir / "final" / "adapter", adapter_name="teal")
    adapted = sample(base_pipe)
    assert (adapted - base).abs().max() > 1e-2, "the adapters change the samples (else nothing below can fail)"
    base_pipe.set_adapters(["teal"], [0.0])
    assert (sample(base_pipe) - base).abs().max().item() <= 1e-6
    base_pipe.set_adapters(["teal"], [0.5])
    half = sample(base_pipe)
    assert (half - base).abs().max() > 1e-3 and (half - adapted).abs().max() > 1e-3
    base_pipe.unload_lora_weights()
    assert base_pipe.get_list_adapters() == {}
    assert (sample(base_pipe) - base).abs().max().item() <= 1e-6
    base_pipe.load_lora_weights(run_dir / "final" / "adapter", adapter_name="teal")
    base_pipe.fuse_lora()
    assert base_pipe.fused_loras == {"teal"}
    assert (sample(base_pipe) - adapted).abs().max().item() <= 1e-5
    base_pipe.unfuse_lora()
    assert (sample(base_pipe) - adapted).abs().max().item() <= 1e-5


def test_resume_of_a_lora_run_is_exact(tiny_llm_dir, base_folder, lora_run, tmp_path):
    run_dir, _ = lora_run
    config = lora_config(tiny_llm_dir, base_folder, "name=teal")
    trainer = build_trainer(config, tmp_path / "resumed", device=torch.device("cpu"), resume=True, progress=False)
    trainer.resume_from = run_dir / "checkpoints" / "step-000002"
    with torch.no_grad():  # other adapter values: the checkpoint's must be loaded
        for param in trainer.params.values():
            param.normal_()
    summary = trainer.fit()
    assert summary.start_step == 2 and summary.step == 4
    for name in ("model.safetensors", "ema.safetensors", "adapter/adapter_model.safetensors"):
        straight = load_file(run_dir / "final" / name)
        again = load_file(tmp_path / "resumed" / "final" / name)
        assert straight.keys() == again.keys()
        assert all(torch.equal(straight[k], again[k]) for k in straight), f"{name}: bit for bit"


def test_export_of_a_lora_run_holds_the_fused_model(lora_run, tmp_path):
    run_dir, _ = lora_run
    from_run = sample(load_pipeline(run_dir, device="cpu"))
    export_pipeline(run_dir, tmp_path / "export")
    exported = load_pipeline(tmp_path / "export", device="cpu")
    assert exported.get_list_adapters() == {}
    assert (sample(exported) - from_run).abs().max().item() <= 1e-5


def test_sample_command_with_lora_and_its_user_errors(lora_run, base_folder, tmp_path, capsys):
    run_dir, _ = lora_run
    out = tmp_path / "img.png"
    adapter = run_dir / "final" / "adapter"
    args = ["sample", str(base_folder), "--prompt", "a red circle", "--steps", "2", "--device", "cpu"]
    assert main([*args, "--out", str(out), "--lora", f"{adapter}:0.5"]) == 0 and out.is_file()
    assert main([*args, "--out", str(out), "--lora", f"{adapter}:half"]) == 2
    assert "'half' is not a number" in capsys.readouterr().err
    assert main([*args, "--out", str(out), "--lora", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_llm_adapters_train_and_round_trip(tiny_llm_dir, base_folder, base_pipe, tmp_path):
    config = lora_config(
        tiny_llm_dir,
        base_folder,
        "finetune.lora.llm_target_modules=[attention]",
        "train.max_steps=2",
        "train.cache_text_context=false",  # the LLM's adapters train: its contexts change every step
    )
    trainer = train(config, tmp_path / "llm")
    llm_params = [name for name in trainer.params if name.startswith("llm.")]
    assert llm_params and all(".lora_" in name for name in llm_params)
    moved = [n for n in llm_params if ".lora_B." in n and trainer.params[n].detach().abs().max() > 0]
    assert moved, "gradients reached the LLM's adapters through the text context"
    dit, llm = read_adapter(tmp_path / "llm" / "final" / "adapter")
    assert llm is not None and all(k.startswith("base_model.model.layers.") for k in llm.weights)
    trainer.text_encoder.eval()  # the trainer left the LLM in training mode (its adapters train)
    expected = sample(sampler_of(trainer))
    base = sample(base_pipe)
    base_pipe.load_lora_weights(tmp_path / "llm" / "final" / "adapter", adapter_name="both")
    assert set(base_pipe.get_list_adapters()) == {"transformer", "text_encoder"}
    from_run = sample(load_pipeline(tmp_path / "llm", device="cpu", use_ema=False))
    assert (from_run - expected).abs().max().item() <= 1e-6  # measured: 0 (bit for bit)
    # the exported folder's own copy of the LLM with the adapters loaded through transformers: a few ulps (1.2e-6)
    assert (sample(base_pipe) - expected).abs().max().item() <= 1e-5
    base_pipe.set_adapters(["both"], [0.0])
    assert (sample(base_pipe) - base).abs().max().item() <= 1e-6
    assert json.loads((tmp_path / "llm" / "final" / "adapter" / "text_encoder" / "adapter_config.json").read_text())


def test_full_finetuning_from_a_pipeline_folder(tiny_llm_dir, base_folder, base_pipe, tmp_path):
    config = load_experiment("demo", overrides_for(tiny_llm_dir) + [f"finetune.init_from={base_folder}"])
    trainer = build_trainer(config, tmp_path / "full", device=torch.device("cpu"), resume=True, progress=False)
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    base = base_pipe.transformer.state_dict()
    assert start.keys() == base.keys() and all(torch.equal(start[k], base[k]) for k in start)
    assert len(trainer.params) == len(list(trainer.model.parameters())), "every DiT weight trains"
    trainer.fit()
    assert not (tmp_path / "full" / "final" / "adapter").exists()
    finished = load_pipeline(tmp_path / "full", device="cpu", use_ema=False).transformer.state_dict()
    assert any(not torch.equal(finished[k], base[k]) for k in base)


def test_a_lora_run_as_a_starting_point_gives_its_merged_model(lora_run):
    run_dir, _ = lora_run
    pipe = load_pipeline(run_dir, device="cpu")
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused = pipe.transformer.state_dict()
    merged = read_init_weights(run_dir)
    assert merged.keys() <= fused.keys()
    assert max((merged[k] - fused[k]).abs().max().item() for k in merged) <= 1e-6


def test_adapters_of_another_model_or_no_adapters_are_refused_before_loading(lora_run, tmp_path, tiny_llm_dir):
    from tests.diffusers_native.conftest import tiny_pipeline

    run_dir, _ = lora_run
    wider = tiny_pipeline(tiny_llm_dir, overrides_for(tiny_llm_dir) + ["model.dit_hidden_size=64"])
    with pytest.raises(ValueError, match=r"LoRA weight .transformer\.layers\.0\.\S+ has shape .* adapters of another"):
        wider.load_lora_weights(run_dir / "final" / "adapter", adapter_name="teal")
    assert wider.get_list_adapters() == {}, "nothing was loaded"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no LoRA weights"):
        wider.load_lora_weights(tmp_path / "empty")
