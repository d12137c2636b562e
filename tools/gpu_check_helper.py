"""Helpers of ``tools/gpu_check.py`` that need torch (the runner itself uses the standard library only).

Uses only fusedit's public surface: :func:`fusedit.load_pipeline`, the pipeline call and the ``fusedit.cli`` module
(run as ``python -m fusedit.cli`` would run it), plus transformers / tokenizers to write a random LLM.

    python tools/gpu_check_helper.py parity --device cuda [--fixtures DIR ...] [--limit N]
        CUDA-vs-CPU parity of every reference fixture found (fp32 and bf16); prints one JSON object (last line).
    python tools/gpu_check_helper.py make-llm --out DIR [--hidden 256 --layers 4 ...]
        A randomly initialised Gemma 2 causal LM + word-level tokenizer over shapes-world words, saved for
        ``text.llm=DIR``.
    python tools/gpu_check_helper.py cli ARGS...
        ``python -m fusedit.cli ARGS...``, then writes this process's peak memory as JSON to
        ``$GPU_CHECK_MEMORY_FILE.rank<RANK>`` (CUDA: max_memory_allocated / max_memory_reserved; CPU: peak RSS).
        Works under torchrun.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import runpy
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FP32_TOLERANCE = 1e-4


# ----------------------------------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------------------------------


def default_fixture_roots() -> list[Path]:
    """Where reference fixtures live: ``tests/fixtures/`` (all of it, recursively: ``reference-tiny`` and
    ``reference_variants``) and ``$GPU_CHECK_FIXTURES`` (os.pathsep-separated, for fixtures made elsewhere). Missing
    roots are ignored."""
    roots = [REPO / "tests" / "fixtures"]
    roots += [Path(p) for p in os.environ.get("GPU_CHECK_FIXTURES", "").split(os.pathsep) if p]
    return roots


def find_fixtures(roots) -> list[Path]:
    """Fixture folders (``expected.json`` + ``expected.safetensors`` + ``pipeline/``) under ``roots``, sorted by name;
    the same fixture found twice (identical ``expected.safetensors``, e.g. a fixture and a copy of it) counts once,
    the first root winning."""
    found, seen = [], set()
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for expected in sorted(root.rglob("expected.json")):
            folder = expected.parent
            tensors = folder / "expected.safetensors"
            if not (tensors.is_file() and (folder / "pipeline").is_dir()):
                continue
            digest = hashlib.sha256(tensors.read_bytes()).hexdigest()
            if digest in seen:
                continue
            seen.add(digest)
            found.append(folder)
    return sorted(found, key=lambda f: (f.name, str(f)))


def _sample_fixture(folder: Path, device: str, dtype):
    """The fixture's recorded call through the public pipeline API; returns ``(latents on CPU float32, reference
    latents, reference key)``."""
    from safetensors.torch import load_file

    import fusedit

    expected = json.loads((folder / "expected.json").read_text())
    tensors = load_file(str(folder / "expected.safetensors"))
    kwargs = {}
    if "latents" in tensors:
        key = "latents"
    elif "latents_use_cache=False" in tensors:  # the shared reference-tiny fixture: the reference's uncached run
        key, kwargs = "latents_use_cache=False", {"use_text_cache": False}
    else:
        raise ValueError(f"{folder}: expected.safetensors has neither 'latents' nor 'latents_use_cache=False'")
    pipe = fusedit.load_pipeline(folder / "pipeline", device=device, dtype=dtype)
    out = pipe(
        expected["prompts"],
        negative_prompt=expected["negative_prompt"],
        height=expected["height"],
        width=expected["width"],
        num_inference_steps=expected["num_inference_steps"],
        guidance_scale=expected["guidance_scale"],
        latents=tensors["initial_latents"].clone(),
        max_sequence_length=expected["max_sequence_length"],
        output_type="latent",
        **kwargs,
    )
    latents = out.images.detach().float().cpu()
    del pipe
    return latents, tensors[key].float(), key


def _max_abs(a, b):
    """Largest absolute difference; None when it is not finite (NaN/inf: JSON has no such numbers)."""
    diff = (a - b).abs().max().item()
    return diff if math.isfinite(diff) else None


def _largest(results: list[dict], key: str):
    values = [r[key] for r in results if isinstance(r.get(key), float)]
    return max(values) if values else None


def _compare_fixture(folder: Path, device: str, tolerance: float) -> dict:
    """One fixture sampled on the CPU in fp32 and on ``device`` in fp32 and bf16: the largest absolute latent
    differences between them and against the reference's latents. Any error is recorded, not raised (every fixture
    is reported, not only the first failure)."""
    import torch

    entry = {"fixture": folder.name, "path": str(folder.relative_to(REPO) if folder.is_relative_to(REPO) else folder)}
    started = time.perf_counter()
    try:
        cpu, reference, key = _sample_fixture(folder, "cpu", torch.float32)
        dev32, _, _ = _sample_fixture(folder, device, torch.float32)
        dev16, _, _ = _sample_fixture(folder, device, torch.bfloat16)
        entry.update(
            reference_key=key,
            fp32_max_abs_vs_cpu=_max_abs(dev32, cpu),
            fp32_max_abs_vs_reference=_max_abs(dev32, reference),
            cpu_max_abs_vs_reference=_max_abs(cpu, reference),
            bf16_max_abs_vs_cpu_fp32=_max_abs(dev16, cpu),
            bf16_max_abs_vs_reference=_max_abs(dev16, reference),
            latent_abs_max=cpu.abs().max().item(),
        )
        fp32 = entry["fp32_max_abs_vs_cpu"]
        entry["pass"] = fp32 is not None and fp32 <= tolerance and entry["bf16_max_abs_vs_cpu_fp32"] is not None
        if not entry["pass"]:
            entry["error"] = (
                f"fp32 {device} vs CPU: {fp32} (tolerance {tolerance}); bf16 vs CPU fp32: "
                f"{entry['bf16_max_abs_vs_cpu_fp32']} (None = not finite)"
            )
    except Exception as error:  # report every fixture, not only the first failure
        entry.update({"pass": False, "error": f"{type(error).__name__}: {error}"})
    entry["seconds"] = round(time.perf_counter() - started, 3)
    details = json.dumps({k: v for k, v in entry.items() if k not in ("fixture", "path")})
    print(f"parity {entry['fixture']}: {'ok' if entry['pass'] else 'FAIL'} {details}", file=sys.stderr)
    return entry


def cmd_parity(args) -> int:
    import torch

    device = args.device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            print(json.dumps({"ok": False, "error": f"CUDA is not available (torch {torch.__version__})"}))
            return 1
        # fp32 parity means fp32: no TF32 in matmuls or convolutions
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.cuda.reset_peak_memory_stats()
    roots = [Path(r) for r in args.fixtures] if args.fixtures else default_fixture_roots()
    fixtures = find_fixtures(roots)
    if args.limit:
        fixtures = fixtures[: args.limit]
    results = [_compare_fixture(folder, device, args.tolerance) for folder in fixtures]
    ok = bool(fixtures) and all(r["pass"] for r in results)
    summary = {
        "ok": ok,
        "device": device,
        "tolerance_fp32": args.tolerance,
        "fixtures": len(fixtures),
        "failed": [r["fixture"] for r in results if not r["pass"]],
        "roots": [str(r) for r in roots if Path(r).is_dir()],
        "missing_roots": [str(r) for r in roots if not Path(r).is_dir()],
        "max_fp32_abs_vs_cpu": _largest(results, "fp32_max_abs_vs_cpu"),
        "max_fp32_abs_vs_reference": _largest(results, "fp32_max_abs_vs_reference"),
        "max_cpu_abs_vs_reference": _largest(results, "cpu_max_abs_vs_reference"),
        "max_bf16_abs_vs_cpu_fp32": _largest(results, "bf16_max_abs_vs_cpu_fp32"),
        "results": results,
    }
    if not fixtures:
        summary["error"] = f"no reference fixtures found under {', '.join(str(r) for r in roots)}"
    if device.startswith("cuda"):
        summary["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        summary["device_name"] = torch.cuda.get_device_name()
    print(json.dumps(summary))
    return 0 if ok else 1


# ----------------------------------------------------------------------------------------------------------------------
# a random LLM for the training step
# ----------------------------------------------------------------------------------------------------------------------

#: Words of shapes-world captions (anything else maps to <unk>: the LLM is random, the vocabulary only sets its size).
WORDS = (
    "a an the of and with is are to on in at one two three four five six seven eight nine ten photo image "
    "picture red green blue yellow purple orange pink white black brown gray grey cyan circle circles square "
    "squares triangle triangles star stars cross crosses shape shapes object objects left right above below "
    "top bottom next near side small big large , ."
).split()


def cmd_make_llm(args) -> int:
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import Gemma2Config, Gemma2ForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0..3
    vocab = {token: i for i, token in enumerate(specials + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B:1", special_tokens=[("<bos>", 2)]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=args.max_length,
    )
    config = Gemma2Config(
        vocab_size=len(vocab),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        query_pre_attn_scalar=args.head_dim,
        max_position_embeddings=512,
        sliding_window=512,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    torch.manual_seed(args.seed)
    model = Gemma2ForCausalLM(config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(
        json.dumps(
            {
                "ok": True,
                "llm": str(out),
                "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
                "vocab": len(vocab),
            }
        )
    )
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# the fusedit CLI with a peak-memory report
# ----------------------------------------------------------------------------------------------------------------------


def _memory_report() -> dict:
    report = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        report.update(
            peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
            peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
        )
    return report


def cmd_cli(argv: list[str]) -> int:
    """Run ``python -m fusedit.cli ARGV`` in this process, then record the peak memory."""
    sys.argv = ["fusedit", *argv]
    code = 0
    try:
        runpy.run_module("fusedit.cli", run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        target = os.environ.get("GPU_CHECK_MEMORY_FILE")
        if target:
            rank = os.environ.get("RANK", "0")
            Path(f"{target}.rank{rank}").write_text(json.dumps(_memory_report()))
    return code


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "cli":
        return cmd_cli(argv[1:])
    parser = argparse.ArgumentParser(
        prog="gpu_check_helper.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("parity", help="CUDA vs CPU parity of the reference fixtures")
    p.add_argument("--device", default="cuda")
    p.add_argument(
        "--fixtures",
        nargs="*",
        default=None,
        help="roots to search (default: tests/fixtures, $GPU_CHECK_FIXTURES)",
    )
    p.add_argument("--limit", type=int, default=0, help="only the first N fixtures (0: all)")
    p.add_argument("--tolerance", type=float, default=FP32_TOLERANCE)
    p.set_defaults(func=cmd_parity)
    p = sub.add_parser("make-llm", help="save a random Gemma 2 causal LM + tokenizer")
    p.add_argument("--out", required=True)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_llm)
    sub.add_parser(
        "cli", help="python -m fusedit.cli ARGS..., then write the peak memory to $GPU_CHECK_MEMORY_FILE.rank<RANK>"
    )
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
