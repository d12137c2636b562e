"""The training-memory estimate's components against the real objects: parameter counts against the models' numel,
optimizer state against bitsandbytes' real state, each block's activations against the tensors autograd really
saves (counted by storage through ``saved_tensors_hooks``), and how the total scales. The check of whole-step peaks
against measured CPU peaks is ``tools/memory_check.py`` (docs/performance.md); no test here is timed."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fusedit.bench.inputs import build_llm
from fusedit.bench.memory import (
    MemorySettings,
    block_activation_bytes,
    count_parameters,
    dit_parameter_counts,
    optimizer_state_bytes,
)
from fusedit.bench.memory_plan import plan_for_experiment, plan_for_preset
from fusedit.bench.presets import PRESETS, BenchError
from fusedit.cli import main as cli_main
from fusedit.experiment import load_experiment
from fusedit.models.config import resolve_model_config
from fusedit.models.dit import DiffusionTransformer
from fusedit.text.config import TextConfig
from fusedit.text.encoder import TextEncoder

TINY = PRESETS["tiny"]


def test_parameter_counts_equal_the_real_models():
    plan = plan_for_preset(TINY, 8)
    torch.manual_seed(0)
    model = DiffusionTransformer(plan.resolved)
    assert plan.dit.trainable == sum(p.numel() for p in model.parameters())
    assert plan.dit.buffers == sum(b.numel() for b in model.buffers())
    assert plan.dit.tensors == tuple(p.numel() for p in model.parameters())
    decoder = build_llm(TINY, torch.device("cpu"), torch.float32)
    encoder = TextEncoder(decoder, None, TextConfig(llm="x"), model.text_requirements())
    assert plan.llm.frozen == sum(p.numel() for p in encoder.decoder.parameters()) and plan.llm.trainable == 0
    # a model fusing only the first two LLM layers keeps two: the estimate counts what the encoder keeps
    short = replace(TINY, model={"shared_attention_layers": [0, 1]})
    assert plan_for_preset(short, 8).llm.frozen < plan.llm.frozen


def test_adamw_state_is_two_fp32_moments_and_8bit_state_matches_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    params = [torch.nn.Parameter(torch.randn(n)) for n in (8192, 5000, 100)]
    sizes = tuple(p.numel() for p in params)
    assert optimizer_state_bytes(sizes, "adamw") == 8 * sum(sizes)
    optimizer = bnb.optim.AdamW8bit(params, min_8bit_size=4096)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    real = sum(t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    assert optimizer_state_bytes(sizes, "adamw8bit") == real
    assert real < 0.3 * optimizer_state_bytes(sizes, "adamw")


def _saved_bytes_of_block(model: DiffusionTransformer, settings: MemorySettings, index: int, autocast) -> int:
    """Bytes of the distinct storages autograd saves while block ``index`` runs (parameters excluded)."""
    from fusedit.bench.inputs import random_text_context, synthetic_tokens

    generator = torch.Generator().manual_seed(0)
    preset = replace(TINY, real_tokens=settings.text_keys)
    _, mask = synthetic_tokens(preset, settings.batch, generator)
    context = random_text_context(model, mask, generator, torch.float32).trimmed()
    if model.resolved.config.attention == "cross":
        context.raw_keys = dict(context.keys)  # cross-attention reads the pre-RoPE keys
    if model.resolved.config.fusion == "shallow":
        context.hidden_states = torch.randn(settings.batch, context.length, model.resolved.llm.hidden_size)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}  # storage -> bytes when first saved inside the block, 0 when saved before it
    inside = [False]
    model.layers[index].register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
    model.layers[index].register_forward_hook(lambda *_: inside.__setitem__(0, False))

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in params:
            seen.setdefault(key, t.untyped_storage().nbytes() if inside[0] else 0)
        return t

    size = settings.latent_size
    x = torch.randn(settings.batch, settings.latent_channels, size, size, requires_grad=True)
    with (
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        model(x, torch.rand(settings.batch) * 1000, context)
    return sum(seen.values())


VARIANTS = {
    "scaled recipe": {},
    "no qk-norm, no sandwich": {"qk_norm": False, "sandwich_norm": False},
    "adaln-zero": {"timestep_conditioning": "adaln-zero"},
    "deep cross-attention": {"attention": "cross"},
    "shallow self-attention": {"fusion": "shallow"},
}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_block_activations_equal_what_autograd_saves(variant, precision):
    preset = replace(TINY, model=VARIANTS[variant])
    plan = plan_for_preset(preset, 2, precision=precision)
    torch.manual_seed(0)
    model = DiffusionTransformer(plan.resolved).train()
    measured = _saved_bytes_of_block(model, plan.settings, 1, precision == "bf16")
    estimated = block_activation_bytes(plan.resolved, plan.settings, fused=True)
    if precision == "bf16":  # autocast's bf16 weight copies: the estimate's own row, here counted in the block
        linears = [m for m in model.layers[1].modules() if isinstance(m, torch.nn.Linear)]
        estimated += 2 * sum(m.weight.numel() for m in linears)
    assert estimated == pytest.approx(measured, rel=0.03), (variant, precision, estimated, measured)


def test_totals_scale_with_batch_sharding_checkpointing_and_8bit():
    one, four = plan_for_preset(TINY, 1).estimate(), plan_for_preset(TINY, 4).estimate()
    rows1, rows4 = dict((n, b) for n, b, _ in one.rows), dict((n, b) for n, b, _ in four.rows)
    assert rows4["DiT parameters + buffers"] == rows1["DiT parameters + buffers"]
    assert rows4["activations"] == pytest.approx(4 * rows1["activations"], rel=0.01)
    big = PRESETS["fusedit-2b"]
    base = plan_for_preset(big, 8, "cuda", precision="bf16", llm_bytes=2)
    rows = {n: b for n, b, _ in base.estimate().rows}
    fsdp = {n: b for n, b, _ in base.with_settings(world_size=8, sharding="fsdp").estimate().rows}
    assert fsdp["optimizer state"] == rows["optimizer state"] // 8 and fsdp["gradients"] == rows["gradients"] // 8
    eight = {n: b for n, b, _ in base.with_settings(optimizer="adamw8bit").estimate().rows}
    assert eight["optimizer state"] < 0.26 * rows["optimizer state"]
    assert base.with_settings(activation_checkpointing=True).estimate().peak < base.estimate().peak
    int8 = {n: b for n, b, _ in base.with_settings(llm_int8=True).estimate().rows}
    assert int8["LLM weights"] < 0.65 * rows["LLM weights"]  # linears 1 byte instead of 2; the embedding stays
    offload = base.with_settings(llm_offload=True).estimate()
    assert offload.peak == base.estimate().peak - rows["LLM weights"]
    on_cpu = plan_for_preset(TINY, 8, "cpu")
    assert on_cpu.with_settings(llm_offload=True).estimate().peak == on_cpu.estimate().peak  # nothing to offload to


def test_count_parameters_on_meta_matches_a_real_module():
    resolved = plan_for_preset(TINY, 1).resolved
    assert dit_parameter_counts(resolved).trainable == count_parameters(DiffusionTransformer(resolved)).trainable


def test_cli_prints_the_table(capsys):
    assert cli_main(["bench", "train", "--estimate-memory", "--preset", "tiny", "--optimizer", "adamw8bit"]) == 0
    out = capsys.readouterr().out
    assert "8-bit AdamW" in out and "peak (DiT forward/backward)" in out and "preset tiny" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "sample", "--estimate-memory", "--preset", "tiny"], "estimates a training step"),
        (["bench", "train", "--estimate-memory"], "exactly one of --preset"),
        (["bench", "train", "--estimate-memory", "--preset", "huge"], "unknown preset"),
        (
            ["bench", "train", "--estimate-memory", "--preset", "tiny", "--world-size", "0"],
            "expected a positive integer",
        ),
        (["bench", "train", "--preset", "tiny", "--config", "demo"], "--config is for --estimate-memory"),
    ],
)
def test_cli_user_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_estimate_for_a_training_config(tiny_llm_dir, demo_overrides, capsys):
    overrides = demo_overrides(tiny_llm_dir) + ["train.batch_size=8", "train.gradient_accumulation_steps=2"]
    lowmem = ["train.optimizer=adamw8bit", "text.quantization=int8", "train.mixed_precision=bf16"]
    config = load_experiment("demo", overrides + lowmem + ["train.distributed=ddp"])
    plan = plan_for_experiment(config, world_size=2, device="cuda")
    assert plan.settings.batch == 2 and plan.settings.optimizer == "adamw8bit" and plan.settings.llm_int8
    assert plan.settings.image_tokens == (16 // 4) ** 2 and plan.settings.precision == "bf16"
    assert plan.settings.sharding == "ddp" and plan.settings.world_size == 2
    with pytest.raises(BenchError, match="train.distributed"):
        plan_for_experiment(load_experiment("demo", overrides), world_size=2, device="cuda")
    real = resolve_model_config(config.model, plan.resolved.llm)
    assert plan.dit.trainable == sum(p.numel() for p in DiffusionTransformer(real).parameters())
    argv = ["bench", "train", "--estimate-memory", "--config", "demo", "--device", "cpu", "--set", *overrides]
    assert cli_main(argv) == 0
    assert "config demo" in capsys.readouterr().out
    assert cli_main(["bench", "train", "--estimate-memory", "--config", "demo", "--set", "text.llm=/nonexistent"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_muon_state_is_one_moment_for_its_matrices_and_two_for_the_rest():
    from fusedit.train.config import TrainConfig
    from fusedit.train.setup import build_optimizer

    plan = plan_for_preset(TINY, 8)
    named = dict(DiffusionTransformer(plan.resolved).named_parameters())
    optimizer, _ = build_optimizer(TrainConfig(optimizer="muon", lr=1e-3), named)  # the trainer's parameter groups
    for p in named.values():
        p.grad = torch.ones_like(p)
    optimizer.step()
    real = sum(t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    assert plan.dit.muon > 0 and optimizer_state_bytes(plan.dit.tensors, "muon", plan.dit.muon) == real
    rows = {n: b for n, b, _ in plan.with_settings(optimizer="muon").estimate().rows}
    assert rows["optimizer state"] == real
