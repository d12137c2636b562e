"""``fusedit bench``: the dense (reference) formulation equals our model, FLOP counts, JSON output, user errors.

Timings are never asserted: only structure and numerics.
"""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from fusedit.bench import flops, inputs, runs, timing
from fusedit.bench.flops import dit_forward_flops, llm_forward_flops
from fusedit.bench.presets import PRESETS, BenchError
from fusedit.bench.runs import build_setup, run_bench
from fusedit.cli import main as cli_main
from fusedit.reference.joint import dense_joint_mask, joint_velocity as dense_velocity
from fusedit.models.config import resolve_model_config

CPU = torch.device("cpu")

VARIANTS = {
    "recipe": {},  # the paper's scaled recipe: 2d-rope, no timestep, sandwich norm, qk-norm
    "adaln-1d-rope": {"timestep_conditioning": "adaln-zero", "pos_embed": "1d-rope", "sandwich_norm": False},
    # LLM layers 0 and 2 run text-only, DiT layer 2 runs past the map without text; APE + AdaLN-single
    "layer-map": {"shared_attention_layers": [1, 3], "dit_num_hidden_layers": 3, "pos_embed": "ape",
                  "timestep_conditioning": "adaln-single", "qk_norm": False},
    # cross-attention deep fusion: the text stream advanced in the loop, each block reading its layer's pre-RoPE K/V
    "cross": {"attention": "cross", "shared_attention_layers": [0, 2], "pos_embed": "m-rope"},
    # shallow fusion: the LLM's hidden states recomputed by a plain forward (no trimming, no recorded cache)
    "shallow-self": {"fusion": "shallow", "attention": "self", "timestep_conditioning": "adaln-zero"},
    "shallow-cross": {"fusion": "shallow", "attention": "cross", "pos_embed": "1d-rope"},
}


def _setup(variant: dict, batch: int = 3, seed: int = 0):
    preset = replace(PRESETS["tiny"], model=variant)
    setup = build_setup(preset, CPU, torch.float32, batch, "train", llm=True, need_llm=True, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # random weights everywhere (the model zero-initialises its output and AdaLN layers)
        for param in setup.model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    # prompts of different lengths: 12, 22 and 32 (no padding) real tokens
    ids, mask = setup.input_ids.clone(), setup.mask.clone()
    for row, real in enumerate((12, 22, 32)[:batch]):
        mask[row] = torch.arange(mask.shape[1]) >= mask.shape[1] - real
        ids[row, mask.shape[1] - real] = inputs.BOS_ID
        ids[row, mask.shape[1] - real + 1:] = ids[row, mask.shape[1] - real + 1:].clamp_min(4)
    ids = ids.masked_fill(~mask, inputs.PAD_ID)
    x = torch.randn(batch, 3, 32, 32, generator=generator)
    t = torch.rand(batch, generator=generator) * 1000
    return setup, ids, mask, x, t


@pytest.mark.parametrize("name", list(VARIANTS))
def test_dense_formulation_equals_model(name):
    setup, ids, mask, x, t = _setup(VARIANTS[name])
    with torch.no_grad():
        context = setup.encoder.encode_tokens(ids, mask)
        ours = setup.model(x, t, context)
        ours_trimmed = setup.model(x, t, context.trimmed())
        dense = dense_velocity(setup.model, setup.llm, x, t, ids, mask)
    assert ours.abs().max() > 0.1  # a non-trivial velocity
    torch.testing.assert_close(dense, ours, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense, ours_trimmed, atol=1e-5, rtol=1e-5)


def test_dense_formulation_gives_the_same_gradients():
    setup, ids, mask, x, t = _setup(VARIANTS["recipe"], batch=2)
    model = setup.model
    with torch.no_grad():
        context = setup.encoder.encode_tokens(ids, mask).trimmed()
    model(x, t, context).square().mean().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    dense_velocity(model, setup.llm, x, t, ids, mask).square().mean().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, ours[name], atol=1e-5, rtol=1e-4, msg=name)
    assert not any(p.requires_grad for p in setup.llm.parameters())


def test_dense_joint_mask_structure():
    text = torch.tensor([[False, True, True]])
    mask = dense_joint_mask(text, 2, torch.float32)[0, 0] == 0  # True = attend
    expected = torch.tensor([
        [False, False, False, False, False],  # padded text row: nothing (uniform in the reference)
        [False, True, False, False, False],   # causal text rows, no image keys, padded key masked
        [False, True, True, False, False],
        [False, True, True, True, True],      # image rows: every real text key and every image key
        [False, True, True, True, True],
    ])
    assert torch.equal(mask, expected)


def test_dense_rejects_unsupported_llm_families():
    setup, ids, mask, x, t = _setup({}, batch=1)
    setup.llm.config.model_type = "gemma3_text"  # per-layer RoPE bases: not computed by the joint formulation
    with pytest.raises(ValueError, match="covers the decoder families gemma, gemma2, llama, qwen2, qwen3; got "
                                         "'gemma3_text'"):
        dense_velocity(setup.model, setup.llm, x, t, ids, mask)


def test_analytic_flops_match_the_flop_counter():
    preset = replace(PRESETS["tiny"], real_tokens=PRESETS["tiny"].text_tokens)  # no padding: all keys are useful
    setup = build_setup(preset, CPU, torch.float32, 2, "train", llm=True, need_llm=True)
    resolved = setup.model.resolved
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2) * 1000
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):  # the math backend's matmuls are counted
        context = setup.encoder.encode_tokens(setup.input_ids, setup.mask)
        with FlopCounterMode(display=False) as counter:
            setup.model(x, t, context)
    assert counter.get_total_flops() == 2 * dit_forward_flops(resolved, preset.image_tokens, preset.text_tokens)
    # LLM: the counter sees the eager attention's full square, the analytic count only the causal half
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        setup.llm(input_ids=setup.input_ids, attention_mask=setup.mask.long())
    g, n = resolved.llm, preset.text_tokens
    square_minus_causal = g.num_hidden_layers * 4 * g.num_attention_heads * g.head_dim * (n * n - n * (n + 1) // 2)
    assert counter.get_total_flops() == 2 * (llm_forward_flops(resolved, n) + square_minus_causal)


def _last_json(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def test_train_cli_prints_json_with_dense_comparison(capsys):
    assert cli_main(["bench", "train", "--preset", "tiny", "--batch-size", "2", "--iters", "1", "--warmup", "1",
                       "--vs-dense", "--threads", "1"]) == 0
    result = _last_json(capsys)
    for key in ("preset", "mode", "device", "dtype", "batch_size", "img_per_s", "mfu", "peak_memory_gib",
                "model_tflop_per_iter", "peak_tflops", "time_per_iter_s", "speedup_vs_dense"):
        assert key in result, key
    assert (result["preset"], result["mode"], result["device"], result["dtype"], result["batch_size"]) == (
        "tiny", "train", "cpu", "float32", 2)
    assert result["img_per_s"] > 0 and result["peak_memory_gib"] > 0 and 0 < result["mfu"]
    assert result["dense"]["img_per_s"] > 0 and result["speedup_vs_dense"] > 0
    assert result["llm"] is True and len(result["times_s"]) == 1


def test_sample_without_llm_reports_seconds_per_image():
    result = run_bench("sample", "tiny", batch_size=1, iters=1, warmup=0, llm=False)
    assert result["mode"] == "sample" and result["steps"] == 25 and result["s_per_image"] > 0
    assert result["llm"] is False and result["llm_params_m"] is None and "dense" not in result
    expected = flops.model_flops_per_iteration(build_setup(PRESETS["tiny"], CPU, torch.float32, 1, "sample", llm=False,
                                                        need_llm=False).model.resolved,
                                            PRESETS["tiny"], "sample", 1, llm=False)
    assert result["model_tflop_per_iter"] == pytest.approx(expected / 1e12)


def test_unknown_preset_lists_the_presets(capsys):
    with pytest.raises(SystemExit):
        cli_main(["bench", "train", "--preset", "huge"])
    err = capsys.readouterr().err
    assert "unknown preset 'huge'" in err and all(name in err for name in PRESETS)
    with pytest.raises(BenchError, match="available presets: tiny, small, base, fusedit-2b"):
        run_bench("train", "huge")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_cuda_unavailable_is_a_clear_error():
    with pytest.raises(BenchError, match="CUDA is not available"):
        run_bench("train", "tiny", device="cuda")


def test_presets_and_peaks():
    big = PRESETS["fusedit-2b"]
    assert (big.image_tokens, big.text_tokens, big.real_tokens) == (1024, 256, 96)
    resolved = resolve_model_config(big.model_config(), big.geometry())
    assert resolved.num_layers == 26 and resolved.hidden_size == 2304 and resolved.head_dim == 256
    assert flops.gpu_peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert flops.gpu_peak_flops("NVIDIA H200", "bfloat16") == 989e12
    assert flops.gpu_peak_flops("Some GPU", "bfloat16") is None


def test_out_of_memory_is_reported_not_raised():
    def boom():
        raise torch.OutOfMemoryError("CUDA out of memory")

    calls = []
    out = timing.time_interleaved({"ours": lambda: calls.append(1), "dense": boom}, CPU, warmup=1, iters=2)
    assert out["dense"]["error"] == "out of memory" and out["dense"]["times_s"] == []
    assert out["ours"]["error"] is None and len(out["ours"]["times_s"]) == 2 and len(calls) == 3
    line = runs.summary_line({"preset": "tiny", "mode": "train", "device_name": "cpu", "dtype": "float32",
                               "batch_size": 1, "img_per_s": 1.0, "mfu": None, "peak_memory_gib": None,
                               "dense": {"error": "out of memory"}, "speedup_vs_dense": None})
    assert "dense formulation out of memory" in line


def test_paired_speedup_is_robust_to_load_changes():
    # the machine got twice as slow half-way: per-pair ratios stay 1.5
    assert timing.paired_speedup([1.0, 1.0, 2.0, 2.0], [1.5, 1.5, 3.0, 3.0]) == pytest.approx(1.5)
    assert timing.paired_speedup([], [1.0]) is None
