"""The frozen LLM in less memory: 8-bit linear layers (``text.quantization: int8``, bitsandbytes on its CPU backend),
offload between encodings (``text.offload``, checked by a spy on the device moves), and both composed with 8-bit
AdamW and activation checkpointing in a real training run."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from fusedit.config import ConfigError
from fusedit.experiment import load_experiment
from fusedit.text.config import TextConfig
from fusedit.text.context import TextRequirements
from fusedit.text.encoder import TextEncoder
from fusedit.train.launch import train_run

PROMPTS = ["a red circle above a blue square", "two green triangles", ""]
REQUIREMENTS = TextRequirements(kv_layers=(0, 1))


def _encoder(llm_dir, **text) -> TextEncoder:
    return TextEncoder.from_config(TextConfig(llm=str(llm_dir), max_length=12, **text), REQUIREMENTS)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.slow
def test_int8_llm_has_8bit_linears_and_close_keys_values(tiny_llm_dir):
    bnb = pytest.importorskip("bitsandbytes")
    exact = _encoder(tiny_llm_dir).encode(PROMPTS)
    encoder = _encoder(tiny_llm_dir, quantization="int8")
    q_proj = encoder.decoder.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear8bitLt) and q_proj.weight.dtype == torch.int8
    assert encoder.decoder.embed_tokens.weight.dtype == torch.float32  # embeddings stay in text.dtype
    quantized = encoder.encode(PROMPTS)
    for layer in (0, 1):
        # measured on this random-weight tiny LLM: 0.3 % (layer 0) to 1.1 % (layer 1) relative error
        assert _relative_error(quantized.keys[layer], exact.keys[layer]) < 0.03
        assert _relative_error(quantized.values[layer], exact.values[layer]) < 0.03
        assert not torch.equal(quantized.keys[layer], exact.keys[layer])  # it did quantize
    assert torch.equal(quantized.mask, exact.mask)


def test_int8_without_bitsandbytes_is_one_clear_line(tiny_llm_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ConfigError, match=r"text.quantization=int8 needs the bitsandbytes package") as info:
        _encoder(tiny_llm_dir, quantization="int8")
    assert "\n" not in str(info.value)


class _MoveSpy:
    """Records every ``decoder.to(...)`` call (and forwards it), and the device the decoder was last sent to when its
    forward ran."""

    def __init__(self, encoder: TextEncoder, monkeypatch) -> None:
        self.moves: list[str] = []
        self.at_forward: list[str] = []
        original = encoder.decoder.to

        def to(*args, **kwargs):
            self.moves.append(str(torch.device(args[0] if args else kwargs["device"])))
            return original(*args, **kwargs)

        monkeypatch.setattr(encoder.decoder, "to", to)
        encoder.decoder.register_forward_pre_hook(
            lambda *_: self.at_forward.append(self.moves[-1] if self.moves else "not moved")
        )


def test_offload_moves_the_llm_to_the_execution_device_only_while_encoding(tiny_llm_dir, monkeypatch):
    exact = _encoder(tiny_llm_dir).encode(PROMPTS)
    encoder = _encoder(tiny_llm_dir, offload=True)
    # On a CPU-only machine the execution device is named "cpu:0" (the same memory as "cpu", where the weights rest)
    # so that the move there and the move back are told apart.
    encoder.execution_device = torch.device("cpu", 0)
    spy = _MoveSpy(encoder, monkeypatch)
    assert encoder.device == torch.device("cpu", 0)
    context = encoder.encode(PROMPTS)
    assert spy.moves == ["cpu:0", "cpu"] and spy.at_forward == ["cpu:0"]
    torch.testing.assert_close(context.keys[1], exact.keys[1], atol=0, rtol=0)
    encoder.encode(PROMPTS[:1])
    assert spy.moves == ["cpu:0", "cpu"] * 2


def test_offload_moves_back_after_an_error_and_not_without_offload(tiny_llm_dir, monkeypatch):
    encoder = _encoder(tiny_llm_dir, offload=True)
    encoder.execution_device = torch.device("cpu", 0)
    spy = _MoveSpy(encoder, monkeypatch)

    def fail(*_args):
        raise RuntimeError("planted failure in the LLM forward")

    handle = encoder.decoder.layers[0].register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="planted failure"):
        encoder.encode(PROMPTS)
    assert spy.moves == ["cpu:0", "cpu"]  # to the execution device, and back despite the error
    handle.remove()
    plain = _encoder(tiny_llm_dir)
    plain_spy = _MoveSpy(plain, monkeypatch)
    plain.encode(PROMPTS)
    assert plain_spy.moves == [] and plain_spy.at_forward == ["not moved"] and plain.execution_device is None


def test_text_config_refuses_combinations():
    with pytest.raises(ConfigError, match="do not combine"):
        TextConfig(llm="x", offload=True, quantization="int8").validate()
    with pytest.raises(ConfigError, match="frozen LLM"):
        TextConfig(llm="x", trainable=True, quantization="int8").validate()
    with pytest.raises(ConfigError, match="frozen LLM"):
        TextConfig(llm="x", trainable=True, offload=True).validate()


@pytest.mark.slow
def test_low_memory_options_compose_with_activation_checkpointing(tiny_llm_dir, demo_overrides, tmp_path):
    """8-bit AdamW + 8-bit LLM, with and without activation checkpointing: the same losses (checkpointing recomputes
    the DiT blocks exactly and never reruns the LLM); offload on top changes nothing on the CPU."""
    pytest.importorskip("bitsandbytes")
    base = demo_overrides(tiny_llm_dir) + ["train.max_steps=3", "train.optimizer=adamw8bit", "train.ema_every=0"]
    losses = {}
    for name, extra in {
        "plain": ["text.quantization=int8"],
        "checkpointed": ["text.quantization=int8", "train.activation_checkpointing=true"],
        "offload": ["text.offload=true", "train.activation_checkpointing=true"],
        "offload-plain": ["text.offload=true"],
    }.items():
        config = load_experiment("demo", base + extra)
        losses[name] = train_run(config, tmp_path / name, device="cpu", progress=False).losses
    assert losses["plain"] == pytest.approx(losses["checkpointed"], abs=1e-6)
    assert losses["offload"] == pytest.approx(losses["offload-plain"], abs=1e-6)
    assert all(math.isfinite(v) for run in losses.values() for v in run.values()) and len(losses["plain"]) == 3
