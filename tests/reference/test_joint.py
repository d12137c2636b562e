"""The reference's formulation (:mod:`fusedit.reference.joint`: the LLM inside the DiT's loop, joint attention over
``[text ; image]`` with the dense mask) equals our model on the cached text context — velocities and gradients — for
every fusion variant and every supported decoder family; it is the uncached path of the pipeline."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import transformers as tf

from fusedit.bench import inputs
from fusedit.bench.presets import PRESETS
from fusedit.bench.runs import build_setup
from fusedit.models.config import LLMGeometry, ModelConfig
from fusedit.models.dit import build_model
from fusedit.reference.joint import dense_joint_mask, joint_velocity
from fusedit.text.config import TextConfig
from fusedit.text.encoder import TextEncoder

CPU = torch.device("cpu")


VARIANTS = {
    "recipe": {},  # the paper's scaled recipe: 2d-rope, no timestep, sandwich norm, qk-norm
    "adaln-1d-rope": {"timestep_conditioning": "adaln-zero", "pos_embed": "1d-rope", "sandwich_norm": False},
    # LLM layers 0 and 2 run text-only, DiT layer 2 runs past the map without text; APE + AdaLN-single
    "layer-map": {
        "shared_attention_layers": [1, 3],
        "dit_num_hidden_layers": 3,
        "pos_embed": "ape",
        "timestep_conditioning": "adaln-single",
        "qk_norm": False,
    },
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
        ids[row, mask.shape[1] - real + 1 :] = ids[row, mask.shape[1] - real + 1 :].clamp_min(4)
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
        dense = joint_velocity(setup.model, setup.llm, x, t, ids, mask)
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
    joint_velocity(model, setup.llm, x, t, ids, mask).square().mean().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, ours[name], atol=1e-5, rtol=1e-4, msg=name)
    assert not any(p.requires_grad for p in setup.llm.parameters())


def test_dense_joint_mask_structure():
    text = torch.tensor([[False, True, True]])
    mask = dense_joint_mask(text, 2, torch.float32)[0, 0] == 0  # True = attend
    expected = torch.tensor(
        [
            [False, False, False, False, False],  # padded text row: nothing (uniform in the reference)
            [False, True, False, False, False],  # causal text rows, no image keys, padded key masked
            [False, True, True, False, False],
            [False, True, True, True, True],  # image rows: every real text key and every image key
            [False, True, True, True, True],
        ]
    )
    assert torch.equal(mask, expected)


def test_dense_rejects_unsupported_llm_families():
    setup, ids, mask, x, t = _setup({}, batch=1)
    setup.llm.config.model_type = "gemma3_text"  # per-layer RoPE bases: not computed by the joint formulation
    with pytest.raises(
        ValueError, match="covers the decoder families gemma, gemma2, llama, qwen2, qwen3; got 'gemma3_text'"
    ):
        joint_velocity(setup.model, setup.llm, x, t, ids, mask)


COMMON = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    pad_token_id=0,
)

# Gemma 2 as Hugging Face runs it (text.attention: hf): logit soft-capping, query_pre_attn_scalar 256 (a text-row
# scale other than head_dim^-0.5), and a sliding window shorter than the prompts.
FAMILIES = {
    "gemma": lambda: tf.GemmaModel(tf.GemmaConfig(**COMMON)),
    "gemma2": lambda: tf.Gemma2Model(tf.Gemma2Config(**COMMON, sliding_window=4, attn_logit_softcapping=2.0)),
    "llama": lambda: tf.LlamaModel(tf.LlamaConfig(**COMMON)),
    "qwen2": lambda: tf.Qwen2Model(tf.Qwen2Config(**COMMON)),
    "qwen3": lambda: tf.Qwen3Model(tf.Qwen3Config(**COMMON)),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("attention", ["self", "cross"])
def test_joint_formulation_follows_each_decoder_family(family, attention):
    torch.manual_seed(0)
    decoder = FAMILIES[family]().eval().requires_grad_(False)
    with torch.no_grad():  # larger weights than the initialisation's: attention logits of order 1, softcaps bite
        for param in decoder.parameters():
            param.mul_(8.0)
    geometry = LLMGeometry.from_hf_config(decoder.config)
    model = build_model(
        ModelConfig(
            attention=attention,
            pos_embed="2d-rope",
            in_channels=3,
            patch_size=2,
            sample_size=4,
            dit_num_hidden_layers=4,
        ),
        geometry,
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    ids = torch.randint(4, 64, (2, 9), generator=generator)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :5] = False
    ids = ids.masked_fill(~mask, 0)
    encoder = TextEncoder(decoder, None, TextConfig(llm="unused"), model.text_requirements())
    x, t = torch.randn(2, 3, 4, 4, generator=generator), torch.tensor([300.0, 800.0])
    with torch.no_grad():
        cached = model(x, t, encoder.encode_tokens(ids, mask))
        joint = joint_velocity(model, encoder.decoder, x, t, ids, mask)
    assert cached.abs().max() > 0.1
    torch.testing.assert_close(joint, cached, atol=1e-5, rtol=1e-5)
