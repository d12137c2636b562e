import json
import math

import pytest
import torch
from safetensors.torch import load_file

from fusedit.checkpoint.layout import find_latest, list_checkpoints
from fusedit.train.config import TrainConfig
from fusedit.train.data_order import ResumableBatchSampler, epoch_permutation
from fusedit.train.errors import NonFiniteLossError
from fusedit.train.logging import read_metrics
from fusedit.train.trainer import Trainer

from .fakes import FrozenTextEncoder, ImageCaptionDataset, TinyVelocityModel, TrainableTextEncoder


def config(**overrides) -> TrainConfig:
    base = dict(
        max_steps=8,
        batch_size=4,
        gradient_accumulation_steps=2,
        lr=1e-2,
        lr_schedule="cosine",
        warmup_steps=2,
        min_lr=1e-3,
        checkpoint_every=3,
        keep_checkpoints=2,
        ema_every=2,
        ema_decay=0.9,
        caption_dropout=0.3,
        log_every=2,
        mixed_precision="bf16",
        seed=5,
    )
    base.update(overrides)
    return TrainConfig(**base)


def make_trainer(run_dir, cfg, dataset=None, model_seed=0, text_encoder=None, **kwargs):
    if text_encoder is None:
        torch.manual_seed(1000)  # the frozen encoder is not checkpointed: it must be the same in every run
        text_encoder = FrozenTextEncoder()
    torch.manual_seed(model_seed)
    model = TinyVelocityModel()
    return Trainer(
        cfg,
        model,
        text_encoder,
        dataset or ImageCaptionDataset(),
        run_dir=run_dir,
        progress=False,
        tensorboard=False,
        **kwargs,
    )


def weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.params.items()}


def assert_same(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_interrupted_and_resumed_run_reproduces_the_uninterrupted_run(tmp_path, accumulation):
    cfg = config(gradient_accumulation_steps=accumulation)
    full = make_trainer(tmp_path / "full", cfg)
    full_summary = full.fit()
    assert sorted(full_summary.losses) == list(range(1, 9))

    crashing = ImageCaptionDataset()
    crashing.crash_after = 4 * 4 + 1  # crash while fetching data of step 5; the last checkpoint is step 3
    interrupted = make_trainer(tmp_path / "resumed", cfg, dataset=crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        interrupted.fit()
    assert find_latest(tmp_path / "resumed").name == "step-000003"

    resumed = make_trainer(tmp_path / "resumed", cfg, model_seed=123)  # different init: weights must be loaded
    summary = resumed.fit()
    assert summary.start_step == 3 and summary.resumed_from.name == "step-000003"
    assert sorted(summary.losses) == [4, 5, 6, 7, 8]
    for step in range(4, 9):
        assert summary.losses[step] == pytest.approx(full_summary.losses[step], abs=1e-6)
    assert_same(weights(resumed), weights(full))
    assert_same(resumed.ema.state_dict(), full.ema.state_dict())
    assert not torch.equal(resumed.ema.state_dict()["inp.weight"], weights(resumed)["inp.weight"])
    # the final export and the last checkpoint agree between both runs
    for name in ("model.safetensors", "ema.safetensors"):
        assert_same(load_file(tmp_path / "resumed" / "final" / name), load_file(tmp_path / "full" / "final" / name))
    # metrics: each logged step exactly once
    steps = [r["step"] for r in read_metrics(tmp_path / "resumed")]
    assert steps == [2, 4, 6, 8]
    assert [r["step"] for r in read_metrics(tmp_path / "full")] == steps


def test_final_step_is_checkpointed_and_old_checkpoints_pruned(tmp_path):
    summary = make_trainer(tmp_path, config(max_steps=7, checkpoint_every=2)).fit()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000006", "step-000007"]
    assert summary.last_checkpoint.name == "step-000007"
    state = json.loads((summary.last_checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 7 and state["data"]["samples_seen"] == 28
    assert state["config"]["train"]["max_steps"] == 7
    final = tmp_path / "final"
    assert {p.name for p in final.iterdir()} == {"model.safetensors", "ema.safetensors", "config.yaml"}
    # a second fit() has nothing to do and keeps the weights
    again = make_trainer(tmp_path, config(max_steps=7, checkpoint_every=2), model_seed=9)
    assert again.fit().losses == {}
    assert_same(weights(again), load_file(final / "model.safetensors"))


def test_resume_false_starts_over_and_resume_from_picks_a_checkpoint(tmp_path):
    cfg = config(max_steps=6, checkpoint_every=3, keep_checkpoints=3)
    first = make_trainer(tmp_path / "a", cfg).fit()
    fresh = make_trainer(tmp_path / "a", cfg, resume=False).fit()
    assert fresh.start_step == 0 and fresh.losses == pytest.approx(first.losses, abs=1e-6)
    picked = make_trainer(tmp_path / "b", cfg, resume_from=tmp_path / "a" / "checkpoints" / "step-000003").fit()
    assert picked.start_step == 3
    assert [picked.losses[s] for s in (4, 5, 6)] == pytest.approx([first.losses[s] for s in (4, 5, 6)], abs=1e-6)


def test_non_finite_loss_stops_with_the_step_and_the_last_good_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, config(max_steps=6, checkpoint_every=2, gradient_accumulation_steps=1))
    forward = trainer.model.forward
    calls = {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        out = forward(*args)
        return out * float("nan") if calls["n"] == 3 else out

    trainer.forward_model = poisoned
    with pytest.raises(NonFiniteLossError, match=r"step 3 .*step-000002") as info:
        trainer.fit()
    assert info.value.step == 3 and info.value.last_checkpoint.name == "step-000002"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002"]
    assert all(torch.isfinite(p).all() for p in trainer.params.values())
    assert not (tmp_path / "final").exists()


def test_frozen_text_encoder_is_never_optimised_or_saved(tmp_path):
    encoder = FrozenTextEncoder()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    trainer = make_trainer(tmp_path, config(max_steps=2, checkpoint_every=1), text_encoder=encoder)
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in encoder.parameters()}
    assert id(trainer.model.frozen) not in optimised
    trainer.fit()
    for path in [
        tmp_path / "final" / "model.safetensors",
        *(d / "model.safetensors" for d in list_checkpoints(tmp_path)),
    ]:
        keys = set(load_file(path))
        assert keys == {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())


def test_trainable_text_encoder_joins_optimizer_and_checkpoint(tmp_path):
    encoder = TrainableTextEncoder()
    before = encoder.proj.weight.detach().clone()
    trainer = make_trainer(tmp_path, config(max_steps=2, caption_dropout=0.0), text_encoder=encoder)
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in encoder.parameters()} <= optimised
    trainer.fit()
    saved = load_file(tmp_path / "final" / "model.safetensors")
    assert {"llm.proj.weight", "llm.proj.bias"} <= set(saved)
    assert not torch.equal(encoder.proj.weight, before)
    torch.testing.assert_close(saved["llm.proj.weight"], encoder.proj.weight.detach())


def test_llm_lr_scale_gives_the_llm_its_own_group_on_the_same_schedule(tmp_path):
    """``train.llm_lr_scale``: the LLM's parameters (after the model's, as checkpoints number them) form a second
    AdamW group at ``lr × scale``, and the warm-up/cosine schedule scales both groups alike at every step."""
    encoder = TrainableTextEncoder()
    trainer = make_trainer(tmp_path, config(max_steps=6, llm_lr_scale=0.25), text_encoder=encoder)
    dit_group, llm_group = trainer.optimizer.param_groups
    assert {id(p) for p in llm_group["params"]} == {id(p) for p in encoder.parameters()}
    assert {id(p) for p in dit_group["params"]} == {id(p) for p in trainer.model.parameters() if p.requires_grad}
    ratios = []
    for _ in range(6):
        dit_lr, llm_lr = trainer.lr_scheduler.get_last_lr()
        ratios.append(llm_lr / dit_lr)
        trainer.lr_scheduler.step()
    assert ratios == pytest.approx([0.25] * 6)
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(1e-3)  # the cosine's end: min_lr
    one = make_trainer(tmp_path / "one", config(max_steps=6), text_encoder=TrainableTextEncoder())
    assert len(one.optimizer.param_groups) == 1  # the default keeps one group (and older checkpoints loadable)


def test_data_order_is_a_seeded_permutation_per_epoch_and_resumable():
    stream = iter(ResumableBatchSampler(5, 3, seed=1))
    batches = [next(stream) for _ in range(4)]
    flat = sum(batches, [])
    assert flat[:5] == epoch_permutation(5, 1, 0).tolist()
    assert flat[5:10] == epoch_permutation(5, 1, 1).tolist()
    assert sorted(flat[:5]) == list(range(5))
    resumed = iter(ResumableBatchSampler(5, 3, seed=1, start=6))
    assert sum([next(resumed) for _ in range(2)], []) == flat[6:12]


def test_caption_dropout_rate_and_cpu_bf16_note(tmp_path, caplog):
    trainer = make_trainer(tmp_path, config(caption_dropout=0.5))
    assert not trainer.use_bf16 and any("float32" in n for n in trainer.notes)
    dropped = trainer.drop_captions(["x"] * 4000)
    assert 0.45 < dropped.count("") / 4000 < 0.55
    none = make_trainer(tmp_path, config(caption_dropout=0.0)).drop_captions(["x"] * 100)
    assert none == ["x"] * 100


def test_learning_signal_loss_decreases(tmp_path):
    cfg = config(
        max_steps=40,
        lr=3e-3,
        lr_schedule="constant",
        caption_dropout=0.0,
        checkpoint_every=100,
        ema_every=0,
        gradient_accumulation_steps=1,
        batch_size=8,
        log_every=10,
    )
    summary = make_trainer(tmp_path, cfg).fit()
    losses = [summary.losses[s] for s in sorted(summary.losses)]
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    assert not (tmp_path / "final" / "ema.safetensors").exists()


def test_sample_grid_metrics_and_tensorboard(tmp_path):
    calls = []

    def sample_fn(prompts, step):
        calls.append((list(prompts), step))
        return torch.rand(len(prompts), 3, 8, 8, generator=torch.Generator().manual_seed(step)) * 2 - 1

    torch.manual_seed(0)
    trainer = Trainer(
        config(max_steps=4, sample_every=2, sample_prompts=["a red square", "a blue circle"]),
        TinyVelocityModel(),
        FrozenTextEncoder(),
        ImageCaptionDataset(),
        run_dir=tmp_path,
        sample_fn=sample_fn,
        progress=True,
        tensorboard=True,
    )
    trainer.fit()
    assert calls == [(["a red square", "a blue circle"], 2), (["a red square", "a blue circle"], 4)]
    assert (tmp_path / "samples" / "step-000002.png").is_file()
    assert any((tmp_path / "logs").iterdir())
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [2, 4]
    assert {"loss", "lr", "grad_norm", "img_per_s"} <= set(records[0])
    assert all(math.isfinite(r["loss"]) for r in records)


def test_clear_errors_for_bad_inputs(tmp_path):
    with pytest.raises(TypeError, match="ExperimentConfig"):
        Trainer({"max_steps": 1}, TinyVelocityModel(), FrozenTextEncoder(), ImageCaptionDataset(), run_dir=tmp_path)
    with pytest.raises(ValueError, match="distributed"):
        make_trainer(tmp_path, config(distributed="ddp"))

    class BadData(ImageCaptionDataset):
        def __getitem__(self, i):
            return {"pixels": self.images[i]}

    with pytest.raises(TypeError, match="'image' and 'caption'"):
        make_trainer(tmp_path / "bad", config(), dataset=BadData()).fit()
