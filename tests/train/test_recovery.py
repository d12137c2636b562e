"""Issue 17, items 4 and 10 at the Trainer level: the run directory is locked while a trainer runs, a corrupt newest
checkpoint falls back to the newest intact one (with a message), and temporaries of a killed ``final/`` export are
removed on the next start."""

from __future__ import annotations

import json
import os

import pytest

from fusedit.checkpoint.errors import CheckpointError
from fusedit.rundir.lock import LOCK_FILE, RunDirLockedError

from ..rundir.test_lock import start_holder
from .test_trainer import config, make_trainer


def corrupt_weights(checkpoint):
    """Damaged exponent bytes in the checkpoint's model weights (size unchanged: only the values betray it)."""
    path = checkpoint / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-2:] = b"\xc0\x7f"
    path.write_bytes(bytes(data))


def test_corrupt_newest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, caplog):
    cfg = config(max_steps=6, checkpoint_every=2, keep_checkpoints=3)
    full = make_trainer(tmp_path / "full", cfg).fit()
    run = tmp_path / "run"
    make_trainer(run, config(max_steps=4, checkpoint_every=2, keep_checkpoints=3)).fit()
    corrupt_weights(run / "checkpoints" / "step-000004")
    with caplog.at_level("WARNING", logger="fusedit.train"):
        resumed = make_trainer(run, cfg).fit()
    assert resumed.start_step == 2 and sorted(resumed.losses) == [3, 4, 5, 6]
    assert [resumed.losses[s] for s in (3, 4, 5, 6)] == pytest.approx([full.losses[s] for s in (3, 4, 5, 6)], abs=1e-6)
    assert "step-000004 cannot be resumed" in caplog.text and "NaN/inf" in caplog.text


def test_no_intact_checkpoint_names_the_way_out(tmp_path):
    cfg = config(max_steps=4, checkpoint_every=2, keep_checkpoints=3)
    make_trainer(tmp_path, cfg).fit()
    for step in (2, 4):
        corrupt_weights(tmp_path / "checkpoints" / f"step-{step:06d}")
    with pytest.raises(CheckpointError, match="--resume-from PATH, or start over with --no-resume"):
        make_trainer(tmp_path, config(max_steps=6, checkpoint_every=2)).fit()


def test_missing_pointer_resumes_the_newest_checkpoint_that_loads(tmp_path):
    cfg = config(max_steps=4, checkpoint_every=2, keep_checkpoints=3)
    make_trainer(tmp_path, cfg).fit()
    (tmp_path / "checkpoints" / "latest").unlink()  # killed between the rename and the pointer update
    assert make_trainer(tmp_path, config(max_steps=6, checkpoint_every=2)).fit().start_step == 4


def test_stale_final_export_temporaries_are_removed_on_start(tmp_path):
    cfg = config(max_steps=2, checkpoint_every=2)
    make_trainer(tmp_path, cfg).fit()
    stale = tmp_path / ".final.tmp-999999"  # what a kill -9 during the export leaves (see test_run_dir for a real one)
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    make_trainer(tmp_path, cfg).fit()
    assert not stale.exists() and (tmp_path / "final" / "model.safetensors").is_file()


def test_trainer_refuses_a_run_directory_locked_by_another_process(tmp_path):
    run = tmp_path / "run"
    holder = start_holder(run)
    try:
        with pytest.raises(RunDirLockedError, match=f"pid {holder.pid}"):
            make_trainer(run, config(max_steps=2)).fit()
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # nothing written
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()
    summary = make_trainer(run, config(max_steps=2)).fit()  # the dead holder's lock is taken over
    assert summary.step == 2 and not (run / LOCK_FILE).exists() and os.getpid() != holder.pid
