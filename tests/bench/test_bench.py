"""``fusedit bench``: FLOP counts, JSON output, user errors (the dense formulation it times is tested in
tests/reference/test_joint.py).

Timings are never asserted: only structure and numerics.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from fusedit.bench import flops, runs, timing
from fusedit.bench.flops import dit_forward_flops, llm_forward_flops
from fusedit.bench.presets import PRESETS, BenchError
from fusedit.bench.runs import build_setup, run_bench
from fusedit.cli import main as cli_main
from fusedit.models.config import resolve_model_config

CPU = torch.device("cpu")


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
    assert (
        cli_main(
            [
                "bench",
                "train",
                "--preset",
                "tiny",
                "--batch-size",
                "2",
                "--iters",
                "1",
                "--warmup",
                "1",
                "--vs-dense",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    result = _last_json(capsys)
    for key in (
        "preset",
        "mode",
        "device",
        "dtype",
        "batch_size",
        "img_per_s",
        "mfu",
        "peak_memory_gib",
        "model_tflop_per_iter",
        "peak_tflops",
        "time_per_iter_s",
        "speedup_vs_dense",
    ):
        assert key in result, key
    assert (result["preset"], result["mode"], result["device"], result["dtype"], result["batch_size"]) == (
        "tiny",
        "train",
        "cpu",
        "float32",
        2,
    )
    assert result["img_per_s"] > 0 and result["peak_memory_gib"] > 0 and 0 < result["mfu"]
    assert result["dense"]["img_per_s"] > 0 and result["speedup_vs_dense"] > 0
    assert result["llm"] is True and len(result["times_s"]) == 1


def test_sample_without_llm_reports_seconds_per_image():
    result = run_bench("sample", "tiny", batch_size=1, iters=1, warmup=0, llm=False)
    assert result["mode"] == "sample" and result["steps"] == 25 and result["s_per_image"] > 0
    assert result["llm"] is False and result["llm_params_m"] is None and "dense" not in result
    expected = flops.model_flops_per_iteration(
        build_setup(PRESETS["tiny"], CPU, torch.float32, 1, "sample", llm=False, need_llm=False).model.resolved,
        PRESETS["tiny"],
        "sample",
        1,
        llm=False,
    )
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
    line = runs.summary_line(
        {
            "preset": "tiny",
            "mode": "train",
            "device_name": "cpu",
            "dtype": "float32",
            "batch_size": 1,
            "img_per_s": 1.0,
            "mfu": None,
            "peak_memory_gib": None,
            "dense": {"error": "out of memory"},
            "speedup_vs_dense": None,
        }
    )
    assert "dense formulation out of memory" in line


def test_paired_speedup_is_robust_to_load_changes():
    # the machine got twice as slow half-way: per-pair ratios stay 1.5
    assert timing.paired_speedup([1.0, 1.0, 2.0, 2.0], [1.5, 1.5, 3.0, 3.0]) == pytest.approx(1.5)
    assert timing.paired_speedup([], [1.0]) is None
