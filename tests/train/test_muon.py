"""``train.optimizer=muon``: the AdamW half is PyTorch's AdamW, the Muon half follows PyTorch's Muon, the split of
the real DiT's parameters, the refused combinations, and exact resume through the trainer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fusedit.config import ConfigError
from fusedit.train.config import TrainConfig
from fusedit.train.muon import MuonAdamW, orthogonalize, uses_muon
from fusedit.train.optimizers import make_optimizer
from fusedit.train.trainer import Trainer

from .fakes import FrozenTextEncoder, ImageCaptionDataset, crash_then_resume

HYPER = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _train(optimizer_for, start: list[torch.Tensor], steps: int = 5) -> list[torch.Tensor]:
    """``steps`` updates of copies of ``start`` with seeded random gradients; the final values."""
    params = [nn.Parameter(t.clone()) for t in start]
    optimizer = optimizer_for(params)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
    return [p.detach() for p in params]


def test_unflagged_parameters_get_torch_adamw_exactly():
    torch.manual_seed(0)
    start = [torch.randn(16, 32), torch.randn(16)]
    ours = _train(lambda ps: MuonAdamW([{"params": ps, "muon": [False, False]}], **HYPER), start)
    reference = _train(lambda ps: torch.optim.AdamW(ps, **HYPER), start)
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_flagged_matrices_follow_torch_muon():
    torch.manual_seed(0)
    start = [torch.randn(16, 48), torch.randn(16, 48), torch.randn(48, 16)]  # two orthogonalised as one batch
    ours = _train(lambda ps: MuonAdamW([{"params": ps, "muon": [True] * 3}], **HYPER), start)
    reference = _train(
        lambda ps: torch.optim.Muon(ps, lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"), start
    )
    for initial, mine, theirs in zip(start, ours, reference, strict=True):
        moved = (theirs - initial).norm()
        # both run the Newton-Schulz iteration in bfloat16, rounding in different places: the moves agree to ~2 %
        assert moved > 0.1 and (mine - theirs).norm() < 0.03 * moved


@pytest.mark.parametrize("shape", [(24, 64), (64, 24), (32, 32)])
def test_orthogonalize_approximates_the_polar_factor(shape):
    update = torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 5
    result = orthogonalize(update)
    singular = torch.linalg.svdvals(result)
    assert result.shape == update.shape and singular.min() > 0.6 and singular.max() < 1.25
    u, _, vt = torch.linalg.svd(update, full_matrices=False)
    assert torch.nn.functional.cosine_similarity(result.flatten(), (u @ vt).flatten(), dim=0) > 0.97


def test_the_dit_s_attention_and_mlp_matrices_use_muon(tiny_llm_dir, demo_overrides):
    from fusedit.builders import build_components
    from fusedit.experiment import load_experiment

    model = build_components(load_experiment("demo", demo_overrides(tiny_llm_dir))).model
    flagged = {name for name, p in model.named_parameters() if uses_muon(name, p)}
    kinds = {name.split(".", 2)[2] for name in flagged}
    mlp = {f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    assert kinds == {f"self_attn.{p}_proj.weight" for p in "qkvo"} | mlp
    assert all(name.startswith("layers.") for name in flagged)
    assert any("modulation" in name for name, _ in model.named_parameters())  # adaLN: AdamW
    assert uses_muon("llm.model.layers.3.mlp.up_proj.weight", nn.Parameter(torch.zeros(4, 2)))
    assert not uses_muon("llm.model.layers.3.mlp.up_proj.lora_A.default.weight", nn.Parameter(torch.zeros(4, 2)))
    assert not uses_muon("llm.model.embed_tokens.weight", nn.Parameter(torch.zeros(4, 2)))


def test_bad_flags_are_refused():
    matrix, vector = nn.Parameter(torch.zeros(4, 4)), nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match="2 parameters but 1 muon flags"):
        MuonAdamW([{"params": [matrix, vector], "muon": [True]}], lr=1e-3)
    with pytest.raises(ValueError, match=r"matrices only, got a parameter of shape torch.Size\(\[4\]\)"):
        MuonAdamW([{"params": [vector], "muon": [True]}], lr=1e-3)
    assert isinstance(make_optimizer("muon", [matrix], **HYPER), MuonAdamW)


def test_muon_lr_scale_moves_only_the_muon_matrices_further():
    torch.manual_seed(0)
    start = [torch.randn(16, 48), torch.randn(16)]
    flags = [True, False]
    base = _train(lambda ps: MuonAdamW([{"params": ps, "muon": flags}], **HYPER), start, steps=1)
    scaled = _train(lambda ps: MuonAdamW([{"params": ps, "muon": flags}], muon_lr_scale=3.0, **HYPER), start, steps=1)
    torch.testing.assert_close(scaled[1], base[1], atol=0, rtol=0)  # the AdamW vector: unaffected
    # one step from the same gradient: the same orthogonalised direction, three times the step and the decay
    decay = HYPER["lr"] * HYPER["weight_decay"]
    move = (base[0] - start[0] * (1 - decay)) * 3
    torch.testing.assert_close(scaled[0], start[0] * (1 - 3 * decay) + move, atol=1e-6, rtol=1e-5)


def test_fewer_newton_schulz_steps_are_used_and_bad_settings_refused():
    torch.manual_seed(0)
    start = [torch.randn(16, 48)]
    five = _train(lambda ps: MuonAdamW([{"params": ps, "muon": [True]}], **HYPER), start, steps=1)
    three = _train(lambda ps: MuonAdamW([{"params": ps, "muon": [True]}], ns_steps=3, **HYPER), start, steps=1)
    assert (five[0] - three[0]).abs().max() > 1e-5
    with pytest.raises(ValueError, match="ns_steps must be >= 1, got 0"):
        MuonAdamW([torch.zeros(2, 2, requires_grad=True)], lr=1e-3, ns_steps=0)
    with pytest.raises(ValueError, match="muon_lr_scale must be > 0, got 0"):
        MuonAdamW([torch.zeros(2, 2, requires_grad=True)], lr=1e-3, muon_lr_scale=0)
    with pytest.raises(ConfigError, match="train.muon_ns_steps: got 0, expected >= 1"):
        TrainConfig(optimizer="muon", muon_ns_steps=0).validate()
    with pytest.raises(ConfigError, match="apply to train.optimizer=muon, not 'adamw'"):
        TrainConfig(optimizer="adamw", muon_lr_scale=2.0).validate()
    optimizer = make_optimizer("muon", [torch.zeros(2, 2, requires_grad=True)], **HYPER, muon_ns_steps=3)
    assert optimizer.param_groups[0]["ns_steps"] == 3


def test_config_refuses_combinations_muon_cannot_do():
    with pytest.raises(ConfigError, match="fused_adamw applies to train.optimizer=adamw"):
        TrainConfig(optimizer="muon", fused_adamw=True).validate()
    with pytest.raises(ConfigError, match="muon needs each weight matrix whole.*use train.distributed=ddp"):
        TrainConfig(optimizer="muon", distributed="fsdp").validate()
    TrainConfig(optimizer="muon", distributed="ddp").validate()


class TinyMatrixModel(nn.Module):
    """forward(x (B, 3, H, W), timestep (B,), context (B, 8)) -> (B, 3, H, W): per-pixel linear blocks in
    ``layers`` (matrices Muon updates) between an input and an output projection (AdamW)."""

    def __init__(self, hidden: int = 16, blocks: int = 2) -> None:
        super().__init__()
        self.inp = nn.Linear(3, hidden)
        self.condition = nn.Linear(9, hidden)
        self.layers = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(blocks)])
        self.out = nn.Linear(hidden, 3)

    def forward(self, x, timestep, context):
        condition = self.condition(torch.cat([timestep[:, None] / 1000, context], dim=1))
        h = self.inp(x.permute(0, 2, 3, 1)) + condition[:, None, None, :]
        for layer in self.layers:
            h = h + torch.nn.functional.silu(layer(h))
        return self.out(h).permute(0, 3, 1, 2)


def _trainer(run_dir, cfg: TrainConfig, model_seed: int = 0, dataset=None) -> Trainer:
    torch.manual_seed(1000)
    text_encoder = FrozenTextEncoder()
    torch.manual_seed(model_seed)
    return Trainer(
        cfg,
        TinyMatrixModel(),
        text_encoder,
        dataset or ImageCaptionDataset(),
        run_dir=run_dir,
        progress=False,
        tensorboard=False,
    )


def test_muon_training_resumes_exactly(tmp_path):
    cfg = TrainConfig(
        max_steps=6, batch_size=4, lr=1e-2, checkpoint_every=3, ema_every=0, log_every=3, optimizer="muon"
    )
    full, full_losses, resumed, losses = crash_then_resume(_trainer, cfg, tmp_path)
    assert isinstance(full.optimizer, MuonAdamW) and sorted(losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert losses[step] == full_losses[step]
    kinds = {tuple(sorted(state)) for state in resumed.optimizer.state.values()}
    assert kinds == {("momentum_buffer",), ("exp_avg", "exp_avg_sq", "step")}
    for a, b in zip(full.params.values(), resumed.params.values(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_settings_changed_on_resume_take_effect(tmp_path):
    """A checkpoint saves the optimizer's hyperparameters and the schedule's base rate; a resume with other settings
    (what ``--allow-change`` accepts) must train with the new ones, not the saved ones."""
    first = TrainConfig(
        max_steps=3, batch_size=4, lr=1e-2, weight_decay=0.1, betas=[0.9, 0.95], checkpoint_every=3, ema_every=0,
        log_every=3, optimizer="muon",
    )  # fmt: skip
    _trainer(tmp_path, first).fit()
    changed = TrainConfig(
        max_steps=5, batch_size=4, lr=1e-3, weight_decay=0.0, betas=[0.8, 0.9], checkpoint_every=3, ema_every=0,
        log_every=3, optimizer="muon", muon_ns_steps=3, muon_lr_scale=2.0,
    )  # fmt: skip
    resumed = _trainer(tmp_path, changed)
    summary = resumed.fit()
    assert summary.start_step == 3 and resumed.step == 5
    (group,) = resumed.optimizer.param_groups
    assert (group["lr"], group["initial_lr"], group["weight_decay"]) == (1e-3, 1e-3, 0.0)
    assert (tuple(group["betas"]), group["ns_steps"], group["muon_lr_scale"]) == ((0.8, 0.9), 3, 2.0)
    assert resumed.lr_scheduler.get_last_lr() == [1e-3] and resumed.lr_scheduler.base_lrs == [1e-3]
