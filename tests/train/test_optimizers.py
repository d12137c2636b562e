"""``train.optimizer``: PyTorch's AdamW and bitsandbytes' 8-bit AdamW (real on the CPU backend), its checkpoint
round trip through the trainer, and the one-line errors where bitsandbytes is missing or cannot run."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from fusedit import lowmem
from fusedit.config import ConfigError
from fusedit.train.config import TrainConfig
from fusedit.train.optimizers import MIN_8BIT_SIZE, make_optimizer
from fusedit.train.trainer import Trainer

from .fakes import FrozenTextEncoder, ImageCaptionDataset, TinyVelocityModel, crash_then_resume

bnb = pytest.importorskip("bitsandbytes")

HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)


def _step(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    optimizer.step()


def test_adamw8bit_keeps_8bit_state_for_large_tensors_and_follows_adamw():
    torch.manual_seed(0)
    big = nn.Parameter(torch.randn(64, 128))  # 8192 elements: 8-bit state
    small = nn.Parameter(torch.randn(100))  # under MIN_8BIT_SIZE: bitsandbytes keeps it in 32 bits
    reference = [nn.Parameter(big.detach().clone()), nn.Parameter(small.detach().clone())]
    eight = make_optimizer("adamw8bit", [big, small], **HYPER)
    exact = make_optimizer("adamw", reference, **HYPER)
    assert isinstance(eight, bnb.optim.AdamW8bit) and isinstance(exact, torch.optim.AdamW)
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        grads = [torch.randn(big.shape, generator=generator), torch.randn(small.shape, generator=generator)]
        _step(eight, [big, small], grads)
        _step(exact, reference, grads)
    state = eight.state[big]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    assert state["state1"].shape == big.shape and big.numel() >= MIN_8BIT_SIZE
    assert eight.state[small]["state1"].dtype == torch.float32
    # the 8-bit update tracks AdamW's: the weights moved by 5 steps of lr 1e-2 agree to a small fraction of that
    moved = (reference[0] - big.detach()).abs().max()
    assert 0 < moved < 2e-3 and (reference[0].detach() - big.detach()).abs().mean() < 3e-4
    torch.testing.assert_close(small.detach(), reference[1].detach(), atol=1e-6, rtol=0)


def _trainer(run_dir, cfg: TrainConfig, model_seed: int = 0, dataset=None) -> Trainer:
    torch.manual_seed(1000)
    text_encoder = FrozenTextEncoder()
    torch.manual_seed(model_seed)
    model = TinyVelocityModel(hidden=32, blocks=1, dropout=0.0)  # the block's 9216-element kernel is 8-bit
    return Trainer(
        cfg, model, text_encoder, dataset or ImageCaptionDataset(), run_dir=run_dir, progress=False, tensorboard=False
    )


def test_adamw8bit_training_resumes_exactly(tmp_path):
    cfg = TrainConfig(
        max_steps=6, batch_size=4, lr=1e-2, checkpoint_every=3, ema_every=0, log_every=3, optimizer="adamw8bit"
    )
    full, full_losses, resumed, losses = crash_then_resume(_trainer, cfg, tmp_path)
    assert isinstance(full.optimizer, bnb.optim.AdamW8bit) and sorted(losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert losses[step] == pytest.approx(full_losses[step], abs=1e-6)
    states = [s for s in resumed.optimizer.state.values() if s["state1"].dtype == torch.uint8]
    assert states, "no parameter got 8-bit state"
    for a, b in zip(full.params.values(), resumed.params.values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_missing_bitsandbytes_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(ConfigError, match=r"adamw8bit needs the bitsandbytes package.*fusedit\[lowmem\]") as info:
        make_optimizer("adamw8bit", [nn.Parameter(torch.zeros(4))], **HYPER)
    assert "\n" not in str(info.value)


def test_bitsandbytes_without_a_kernel_for_the_device_is_one_clear_line(monkeypatch):
    class NoKernel:
        def __init__(self, params, **_kwargs):
            self.params = params

        def step(self):
            raise NotImplementedError("no kernel for bitsandbytes::optimizer_update_8bit_blockwise on cpu")

    fake = types.SimpleNamespace(optim=types.SimpleNamespace(AdamW8bit=NoKernel))
    monkeypatch.setattr(lowmem.importlib, "import_module", lambda name: fake)
    with pytest.raises(ConfigError, match=r"cannot run 8-bit AdamW on cpu .*use train.optimizer=adamw"):
        make_optimizer("adamw8bit", [nn.Parameter(torch.zeros(4))], **HYPER)


def test_config_refuses_combinations_8bit_adamw_cannot_do():
    with pytest.raises(ConfigError, match="fused_adamw"):
        TrainConfig(optimizer="adamw8bit", fused_adamw=True).validate()
    with pytest.raises(ConfigError, match="fsdp"):
        TrainConfig(optimizer="adamw8bit", distributed="fsdp").validate()
    TrainConfig(optimizer="adamw8bit", distributed="ddp").validate()
    with pytest.raises(ConfigError, match="expected one of adamw, adamw8bit"):
        make_optimizer("sgd", [nn.Parameter(torch.zeros(4))], **HYPER)
