"""Generate tiny reference fixtures: the reference implementation's (tang-bd/fuse-dit) sampled latents across its
design space, for ``tests/reference/test_reference_variants.py``.

For every variant in :data:`VARIANTS` this builds the reference's own model (``diffusion.models.FuseDiT`` or
``diffusion.models.DiT``) from a tiny Gemma / Gemma 2 config, perturbs every parameter with small noise (the
reference's initialisation zeroes the output projection and the AdaLN-Zero gates, which would hide most of the
network), rounds the weights to float16 (so the float16 files written here hold exactly the weights the reference
ran with, in float32; ``pos_embed_max_size`` is 16 to keep the saved sin-cos table small), saves a pipeline folder
in the reference's format with its own ``save_pretrained`` (``model_index.json``, ``transformer/``, ``scheduler/``,
``tokenizer/`` copied from ``tests/fixtures/reference-tiny``, a tiny ``vae/``, and ``llm/`` for the shallow
baselines) and runs the reference's sampling (16×16 images, 2× VAE → 16-channel 8×8 latents, 3 Euler steps, CFG 6,
16 text tokens) from fixed initial latents:

* FuseDiT (deep fusion): the reference's ``FuseDiTPipeline`` with ``use_cache=False`` (its training-time
  computation; its cached path differs for 2d-rope and crashes for 1d-rope: docs/design.md, "Reference checkpoints").
* DiT (shallow baselines): the reference's ``DiTPipeline`` cannot sample (it passes ``text_modulation_embeds``, an
  argument ``DiT.forward`` does not take, and indexes ``[0]`` into the returned tensor). The script records that
  crash, then runs the same computation as its training step / its pipeline: the LLM's hidden states
  ``llm(ids, 4D mask, positions, output_hidden_states=True)[1][text_hidden_states_index]`` once, then per step
  ``DiT.forward`` on ``[uncond ; cond]``, CFG and ``FlowMatchEulerDiscreteScheduler.step``.

Each variant's folder holds ``pipeline/`` and ``expected.json`` (settings, what was run, notes) +
``expected.safetensors`` (``initial_latents``, ``latents``: float32). Variants the reference cannot run at all are
listed in ``tests/fixtures/reference_variants/index.json`` with the error.

Regenerate (CPU only, about two minutes; fixtures were made with the reference at commit
5e6431a67f8c87b348bae7af682df19fed164617 and torch 2.13.0+cpu, transformers 4.43.3, diffusers 0.32.0, tokenizers
0.19.1, einops 0.8.0, numpy 2.4.6, safetensors 0.8.0)::

    python3 -m venv /tmp/refenv
    /tmp/refenv/bin/pip install torch==2.13.0            # the CPU wheel; never an unpinned torch (CUDA build)
    /tmp/refenv/bin/pip install transformers==4.43.3 diffusers==0.32.0 einops==0.8.0 sentencepiece==0.2.0 \\
        accelerate==0.31.0 safetensors numpy
    git clone https://github.com/tang-bd/fuse-dit /tmp/fuse-dit-ref     # the reference implementation
    git -C /tmp/fuse-dit-ref checkout 5e6431a67f8c87b348bae7af682df19fed164617
    /tmp/refenv/bin/python tools/make_reference_fixtures.py --reference /tmp/fuse-dit-ref \\
        --tokenizer tests/fixtures/reference-tiny/pipeline/tokenizer --out tests/fixtures/reference_variants

The reference pins torch 2.5.0; its model code runs unchanged on torch 2.13's CPU wheel. ``--only NAME`` regenerates
one variant. The output is deterministic for a given torch build (seeded). This file imports the reference's
``diffusion`` package from ``--reference``; it contains none of its code.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
import traceback
from pathlib import Path

PROMPTS = ["a red circle on the left", "two blue cats next to a big tree"]
SETTINGS = dict(
    height=16, width=16, num_inference_steps=3, guidance_scale=6.0, max_sequence_length=16, negative_prompt=""
)

# Tiny LLM geometry: 4 heads, 2 KV heads (GQA), head_dim 8, hidden 32, MLP 32: all fixtures together stay < 3 MB.
LLM_BASE = dict(
    hidden_size=32,
    intermediate_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)

# name -> options. kind: FuseDiT | DiT; llm: gemma | gemma2; llm_layers: LLM depth before the reference prunes it.
VARIANTS = {
    # --- deep fusion, joint self-attention -------------------------------------------------------------------------
    "fuse_self_ape_adalnzero_gemma2": dict(
        kind="FuseDiT",
        llm="gemma2",
        attention="self",
        pos_embed="ape",
        timestep_conditioning="adaln-zero",
        sandwich_norm=False,
        qk_norm=True,
        dit_hidden_size=48,
    ),
    "fuse_self_1drope_adalnsingle_gemma": dict(
        kind="FuseDiT",
        llm="gemma",
        attention="self",
        pos_embed="1d-rope",
        timestep_conditioning="adaln-single",
        sandwich_norm=True,
        qk_norm=False,
    ),
    "fuse_self_mrope_addition_gemma2": dict(
        kind="FuseDiT",
        llm="gemma2",
        attention="self",
        pos_embed="m-rope",
        timestep_conditioning="addition",
        sandwich_norm=False,
        qk_norm=True,
    ),
    "fuse_self_2drope_none_gemma": dict(
        kind="FuseDiT",
        llm="gemma",
        attention="self",
        pos_embed="2d-rope",
        timestep_conditioning=None,
        sandwich_norm=True,
        qk_norm=True,
    ),
    # layer map: 1 text-only LLM layer, LLM layers 1-2 fused (the LLM's 4th layer is pruned, as the reference does)
    "fuse_self_2drope_adalnzero_layermap_gemma2": dict(
        kind="FuseDiT",
        llm="gemma2",
        attention="self",
        pos_embed="2d-rope",
        timestep_conditioning="adaln-zero",
        sandwich_norm=True,
        qk_norm=True,
        llm_layers=4,
        initial_layers=1,
        shared_attention_layers=[1, 2],
        dit_num_hidden_layers=2,
    ),
    # layer map with a gap (LLM layers 0 and 2 fused, LLM layer 1 and one DiT layer run alone): the reference
    # crashes (its DiT-only layers call a text projection FuseDiT does not have); recorded in index.json
    "fuse_self_1drope_none_gap_gemma": dict(
        kind="FuseDiT",
        llm="gemma",
        attention="self",
        pos_embed="1d-rope",
        timestep_conditioning=None,
        sandwich_norm=False,
        qk_norm=True,
        llm_layers=3,
        shared_attention_layers=[0, 2],
        dit_num_hidden_layers=3,
    ),
    # --- deep fusion, cross-attention --------------------------------------------------------------------------------
    "fuse_cross_2drope_adalnzero_gemma2": dict(
        kind="FuseDiT",
        llm="gemma2",
        attention="cross",
        pos_embed="2d-rope",
        timestep_conditioning="adaln-zero",
        sandwich_norm=True,
        qk_norm=True,
    ),
    "fuse_cross_ape_none_gemma": dict(
        kind="FuseDiT",
        llm="gemma",
        attention="cross",
        pos_embed="ape",
        timestep_conditioning=None,
        sandwich_norm=False,
        qk_norm=False,
    ),
    "fuse_cross_mrope_addition_gemma": dict(
        kind="FuseDiT",
        llm="gemma",
        attention="cross",
        pos_embed="m-rope",
        timestep_conditioning="addition",
        sandwich_norm=True,
        qk_norm=True,
    ),
    # layer map with cross-attention: LLM layer 0 text-only, layers 1-2 fused
    "fuse_cross_ape_adalnsingle_layermap_gemma2": dict(
        kind="FuseDiT",
        llm="gemma2",
        attention="cross",
        pos_embed="ape",
        timestep_conditioning="adaln-single",
        sandwich_norm=True,
        qk_norm=True,
        initial_layers=1,
        dit_num_hidden_layers=2,
    ),
    # the reference crashes for cross-attention + 1d-rope (image rotary tables span text + image); recorded
    "fuse_cross_1drope_adalnsingle_gemma2": dict(
        kind="FuseDiT",
        llm="gemma2",
        attention="cross",
        pos_embed="1d-rope",
        timestep_conditioning="adaln-single",
        sandwich_norm=False,
        qk_norm=True,
    ),
    # --- shallow fusion baselines ------------------------------------------------------------------------------------
    "dit_self_2drope_adalnzero_gemma2": dict(
        kind="DiT",
        llm="gemma2",
        attention="self",
        pos_embed="2d-rope",
        timestep_conditioning="adaln-zero",
        sandwich_norm=True,
        qk_norm=True,
    ),
    "dit_self_ape_none_gemma": dict(
        kind="DiT",
        llm="gemma",
        attention="self",
        pos_embed="ape",
        timestep_conditioning=None,
        sandwich_norm=False,
        qk_norm=False,
        text_hidden_states_index=-2,
        dit_hidden_size=48,
    ),
    "dit_cross_1drope_adalnsingle_gemma": dict(
        kind="DiT",
        llm="gemma",
        attention="cross",
        pos_embed="1d-rope",
        timestep_conditioning="adaln-single",
        sandwich_norm=False,
        qk_norm=True,
    ),
    # the reference crashes for a cross-attention DiT narrower/wider than the LLM (its text_k_proj expects the
    # LLM width but gets the context embedder's output); recorded
    "dit_cross_ape_none_width48_gemma": dict(
        kind="DiT",
        llm="gemma",
        attention="cross",
        pos_embed="ape",
        timestep_conditioning=None,
        sandwich_norm=False,
        qk_norm=False,
        dit_hidden_size=48,
    ),
    "dit_cross_mrope_addition_gemma2": dict(
        kind="DiT",
        llm="gemma2",
        attention="cross",
        pos_embed="m-rope",
        timestep_conditioning="addition",
        sandwich_norm=True,
        qk_norm=True,
    ),
}


def llm_config(llm: str, num_layers: int, vocab_size: int):
    from transformers import Gemma2Config, GemmaConfig

    if llm == "gemma":
        # Like google/gemma-2b's config: hidden_act "gelu" with hidden_activation unset, which transformers 4.43
        # runs as gelu_pytorch_tanh (the reference's MLPs too).
        return GemmaConfig(
            vocab_size=vocab_size, num_hidden_layers=num_layers, hidden_act="gelu", hidden_activation=None, **LLM_BASE
        )
    return Gemma2Config(
        vocab_size=vocab_size,
        num_hidden_layers=num_layers,
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=LLM_BASE["head_dim"],
        sliding_window=4096,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        **LLM_BASE,
    )


def perturb(module, generator, scale: float = 0.05) -> None:
    """Add N(0, scale²) noise to every parameter (norms become 1+w ≠ 1, zero-initialised gates/projections come
    alive), then round to float16 precision."""
    import torch

    with torch.no_grad():
        for parameter in module.parameters():
            noise = torch.randn(parameter.shape, generator=generator) * scale
            parameter.add_(noise.to(parameter.dtype))
            parameter.copy_(parameter.half().float())


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[4, 4],
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    )


def to_float16_file(path: Path) -> None:
    """Rewrite a safetensors file with float16 tensors (the weights were rounded to float16 before running)."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    save_file(
        {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()},
        str(path),
        metadata={"format": "pt"},
    )


def build(name: str, options: dict, ref, tokenizer, seed: int):
    """The reference transformer (and, for DiT, its LLM) with perturbed float16-exact weights."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    llm_layers = options.get("llm_layers", 3)
    base = llm_config(options["llm"], llm_layers, len(tokenizer))
    shared = options.get("shared_attention_layers", "all")
    common = dict(
        attention=options["attention"],
        dit_hidden_size=options.get("dit_hidden_size", base.hidden_size),
        dit_num_hidden_layers=options.get("dit_num_hidden_layers", llm_layers),
        in_channels=16,
        out_channels=16,
        patch_size=2,
        pos_embed=options["pos_embed"],
        pos_embed_max_size=16,
        qk_norm=options["qk_norm"],
        sample_size=SETTINGS["height"] // 2,
        sandwich_norm=options["sandwich_norm"],
        text_hidden_size=base.hidden_size,
        timestep_conditioning=options["timestep_conditioning"],
    )
    llm = None
    if options["kind"] == "FuseDiT":
        # as the reference's build_fusedit: prune the LLM after the last fused layer
        if shared != "all":
            base.num_hidden_layers = min(base.num_hidden_layers, max(shared) + 1)
        config = ref.configs.FuseDiTConfig(
            base_config=base, initial_layers=options.get("initial_layers", 0), shared_attention_layers=shared, **common
        )
        transformer = ref.models.FuseDiT(config)
    else:
        from transformers import AutoModel

        config = ref.configs.DiTConfig(
            base_config=base, text_hidden_states_index=options.get("text_hidden_states_index", -1), **common
        )
        transformer = ref.models.DiT(config)
        llm = AutoModel.from_config(base)
        perturb(llm, generator, scale=0.1)
        llm.eval()
    perturb(transformer, generator)
    return transformer.eval(), llm


def run_variant(name: str, options: dict, ref, args) -> dict:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    seed = 1000 + sorted(VARIANTS).index(name)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    transformer, llm = build(name, options, ref, tokenizer, seed)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(args.scheduler)
    vae = tiny_vae().eval()
    if options["kind"] == "FuseDiT":
        pipe = ref.pipelines.FuseDiTPipeline(transformer=transformer, scheduler=scheduler, vae=vae, tokenizer=tokenizer)
    else:
        pipe = ref.pipelines.DiTPipeline(
            transformer=transformer, scheduler=scheduler, vae=vae, tokenizer=tokenizer, llm=llm
        )
    folder = args.out / name
    if folder.exists():
        shutil.rmtree(folder)
    pipe.save_pretrained(str(folder / "pipeline"))
    for weights in (folder / "pipeline").rglob("*.safetensors"):
        to_float16_file(weights)
    shutil.rmtree(folder / "pipeline" / "tokenizer")
    shutil.copytree(args.tokenizer, folder / "pipeline" / "tokenizer", copy_function=shutil.copyfile)

    s = SETTINGS
    initial = torch.randn(
        len(PROMPTS), 16, s["height"] // 2, s["width"] // 2, generator=torch.Generator().manual_seed(seed + 7)
    )
    notes = []
    call = dict(
        prompt=PROMPTS,
        height=s["height"],
        width=s["width"],
        num_inference_steps=s["num_inference_steps"],
        guidance_scale=s["guidance_scale"],
        negative_prompt=s["negative_prompt"],
        max_sequence_length=s["max_sequence_length"],
        latents=initial.clone(),
        output_type="latent",
    )
    with torch.no_grad():
        if options["kind"] == "FuseDiT":
            latents = pipe(**call, use_cache=False)[0]
            run = "reference FuseDiTPipeline, use_cache=False"
            try:
                cached = pipe(**call, use_cache=True)[0]
                notes.append(
                    f"reference use_cache=True differs from uncached by max abs "
                    f"{(cached - latents).abs().max().item():.3g}"
                )
            except Exception as error:  # noqa: BLE001 - recorded, not fatal
                notes.append(f"reference use_cache=True crashes: {type(error).__name__}: {error}")
        else:
            try:
                pipe(**call)
                notes.append("reference DiTPipeline ran (unexpected)")
            except Exception as error:  # noqa: BLE001 - the known crash, recorded
                notes.append(
                    f"reference DiTPipeline crashes: {type(error).__name__}: {error}; sampled with the "
                    f"reference DiT.forward in an Euler/CFG loop like its pipeline instead"
                )
            latents = dit_loop(pipe, ref, initial.clone())
            run = "reference DiT.forward + LLM hidden states in the DiTPipeline's Euler/CFG loop"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {"initial_latents": initial.contiguous(), "latents": latents.float().contiguous()},
        str(folder / "expected.safetensors"),
    )
    expected = dict(
        prompts=PROMPTS,
        **s,
        output_type="latent",
        run=run,
        options=options,
        seed=seed,
        notes=notes,
        reference_versions=versions(),
    )
    (folder / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    return expected


def dit_loop(pipe, ref, latents):
    """The shallow baseline's sampling, as its DiTPipeline and training step compute it (see module docstring)."""
    import torch

    s = SETTINGS
    prompts = [s["negative_prompt"]] * len(PROMPTS) + PROMPTS
    tokens = pipe.tokenizer(
        prompts, return_tensors="pt", padding="max_length", truncation=True, max_length=s["max_sequence_length"]
    )
    mask4d = ref.models.update_self_attention_mask(tokens.attention_mask, 0, False, "cpu", pipe.llm.dtype)
    positions = torch.arange(tokens.input_ids.shape[1]).unsqueeze(0)
    hidden = pipe.llm(
        tokens.input_ids, mask4d, positions, use_cache=False, output_hidden_states=True, return_dict=False
    )[1][pipe.transformer.config.text_hidden_states_index]
    timesteps, _ = ref.pipelines.retrieve_timesteps(pipe.scheduler, s["num_inference_steps"], "cpu")
    for t in timesteps:
        model_input = torch.cat([latents] * 2)
        v = pipe.transformer(
            hidden_states=model_input,
            timestep=t.expand(model_input.shape[0]),
            text_hidden_states=hidden,
            attention_mask=tokens.attention_mask,
        )
        v_uncond, v_text = v.chunk(2)
        v = v_uncond + s["guidance_scale"] * (v_text - v_uncond)
        latents = pipe.scheduler.step(v, t, latents, return_dict=False)[0]
    return latents


def versions() -> dict:
    import diffusers
    import torch
    import transformers

    return dict(torch=torch.__version__, transformers=transformers.__version__, diffusers=diffusers.__version__)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, required=True, help="root of a fuse-dit checkout (has diffusion/)")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        required=True,
        help="tokenizer folder (tests/fixtures/reference-tiny/pipeline/tokenizer)",
    )
    parser.add_argument(
        "--scheduler", type=Path, default=None, help="scheduler folder (default: the tokenizer's sibling scheduler/)"
    )
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/reference_variants"))
    parser.add_argument("--only", action="append", default=None, help="variant name (repeatable)")
    args = parser.parse_args(argv)
    args.scheduler = args.scheduler or args.tokenizer.parent / "scheduler"
    if not (args.reference / "diffusion" / "models.py").is_file():
        parser.error(f"{args.reference} has no diffusion/models.py; give the root of a fuse-dit checkout")
    sys.path.insert(0, str(args.reference.resolve()))

    class Ref:
        configs = importlib.import_module("diffusion.configs")
        models = importlib.import_module("diffusion.models")
        pipelines = importlib.import_module("diffusion.pipelines")

    args.out.mkdir(parents=True, exist_ok=True)
    index_path = args.out / "index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {"variants": {}, "failed": {}}
    for name in args.only or sorted(VARIANTS):
        print(f"== {name}", flush=True)
        try:
            expected = run_variant(name, VARIANTS[name], Ref, args)
            index["variants"][name] = {"run": expected["run"], "notes": expected["notes"]}
            index["failed"].pop(name, None)
        except Exception as error:  # noqa: BLE001 - a variant the reference cannot run is recorded
            traceback.print_exc()
            shutil.rmtree(args.out / name, ignore_errors=True)
            index["variants"].pop(name, None)
            index["failed"][name] = {"options": VARIANTS[name], "error": f"{type(error).__name__}: {error}"}
    index_path.write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
