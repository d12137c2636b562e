"""Sharded checkpoints resume on a different number of processes (and wrapper)."""
import warnings

import pytest

from fusedit.checkpoint.layout import find_latest
from fusedit.checkpoint.sharded import is_sharded_checkpoint
from fusedit.train.config import TrainConfig

from .common import BASE, losses_of, single_process
from .workers import fit_losses, make_trainer, spawn

pytestmark = pytest.mark.slow


def test_two_process_fsdp_checkpoint_resumes_in_one_process(tmp_path, tiny_llm_dir):
    _, full = single_process(tmp_path / "single", tiny_llm_dir)
    run = tmp_path / "run"
    first = spawn(2, fit_losses, {**BASE, "max_steps": 3, "distributed": "fsdp"}, str(run), str(tiny_llm_dir), tmp=tmp_path)
    assert sorted(losses_of(first[0])) == [1, 2, 3]
    # one process, no process group: DCP reshards model, EMA and optimizer; RNG and data position continue
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        resumed = make_trainer(TrainConfig(**{**BASE, "max_steps": 6}), run, tiny_llm_dir, model_seed=77)
        summary = resumed.fit()
    assert summary.start_step == 3 and sorted(summary.losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert summary.losses[step] == pytest.approx(full.losses[step], abs=1e-5)
    assert not is_sharded_checkpoint(find_latest(run))  # the 1-process continuation writes ordinary checkpoints


def test_one_process_fsdp_checkpoint_resumes_on_two_ddp_processes(tmp_path, tiny_llm_dir, group):
    _, full = single_process(tmp_path / "single", tiny_llm_dir)
    run = tmp_path / "run"
    first = make_trainer(TrainConfig(**{**BASE, "max_steps": 3, "distributed": "fsdp"}), run, tiny_llm_dir).fit()
    assert is_sharded_checkpoint(first.last_checkpoint)
    for step in (1, 2, 3):
        assert first.losses[step] == pytest.approx(full.losses[step], abs=1e-5)
    results = spawn(2, fit_losses, {**BASE, "max_steps": 6, "distributed": "ddp"}, str(run), str(tiny_llm_dir), tmp=tmp_path)
    assert results[0]["start"] == 3
    got = losses_of(results[0])
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(full.losses[step], abs=1e-5)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_single_process_checkpoint_resumes_on_two_processes(tmp_path, tiny_llm_dir, mode):
    _, full = single_process(tmp_path / "single", tiny_llm_dir)
    run = tmp_path / "run"
    first = make_trainer(TrainConfig(**{**BASE, "max_steps": 3}), run, tiny_llm_dir).fit()
    assert not is_sharded_checkpoint(first.last_checkpoint)
    results = spawn(2, fit_losses, {**BASE, "max_steps": 6, "distributed": mode}, str(run), str(tiny_llm_dir), tmp=tmp_path)
    assert results[0]["start"] == 3
    got = losses_of(results[0])
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(full.losses[step], abs=1e-5)
    assert is_sharded_checkpoint(find_latest(run))  # the distributed continuation writes sharded checkpoints


def test_batch_must_split_over_processes(tmp_path, tiny_llm_dir, group):
    with pytest.raises(ValueError, match="divisible"):
        make_trainer(TrainConfig(**{**BASE, "batch_size": 6, "gradient_accumulation_steps": 4,
                                    "distributed": "ddp"}), tmp_path, tiny_llm_dir)


def test_muon_two_process_checkpoint_resumes_in_one_process(tmp_path, tiny_llm_dir):
    """Muon's per-parameter flags and momentum buffers go through DCP's optimizer state dict and back."""
    _, full = single_process(tmp_path / "single", tiny_llm_dir, optimizer="muon")
    run = tmp_path / "run"
    config = {**BASE, "max_steps": 3, "distributed": "ddp", "optimizer": "muon"}
    first = spawn(2, fit_losses, config, str(run), str(tiny_llm_dir), tmp=tmp_path)
    assert sorted(losses_of(first[0])) == [1, 2, 3] and is_sharded_checkpoint(find_latest(run))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        resumed = make_trainer(TrainConfig(**{**BASE, "max_steps": 6, "optimizer": "muon"}), run, tiny_llm_dir)
        summary = resumed.fit()
    assert summary.start_step == 3
    # two processes sum gradients in another order, and the bfloat16 Newton-Schulz iteration magnifies it (7e-7 at
    # step 3, 2e-5 at step 4); a lost momentum buffer moves step 5 by 1e-3
    for step in (4, 5, 6):
        assert summary.losses[step] == pytest.approx(full.losses[step], abs=1e-4)
    flags = [flag for group in resumed.optimizer.param_groups for flag in group["muon"]]
    assert any(flags) and not all(flags)
