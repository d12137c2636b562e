import json

import pytest
import torch

import fusedit.checkpoint.layout as layout
import fusedit.checkpoint.single as ckpt
from fusedit.checkpoint.errors import CheckpointError
from fusedit.checkpoint.layout import find_latest, list_checkpoints, remove_stale_temporaries
from fusedit.checkpoint.rng import capture_rng_state, restore_rng_state
from fusedit.checkpoint.single import load_checkpoint, save_checkpoint


def save(run_dir, step, value=1.0, keep=None):
    model = {"w": torch.full((3, 2), value), "b": torch.arange(4.0)}
    generators = {"noise": torch.Generator().manual_seed(step)}
    return save_checkpoint(
        run_dir,
        step,
        model=model,
        ema={k: v * 0.5 for k, v in model.items()},
        optimizer={"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        state={"data": {"samples_seen": step * 4}, "metrics": {"loss": 0.5}},
        rng=capture_rng_state(generators),
        keep=keep,
    )


def test_round_trip_and_latest(tmp_path):
    assert find_latest(tmp_path) is None
    path = save(tmp_path, 12, value=2.0)
    assert path == tmp_path / "checkpoints" / "step-000012"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-000012"
    assert find_latest(tmp_path) == path
    loaded = load_checkpoint(path)
    assert loaded.step == 12 and loaded.state["data"]["samples_seen"] == 48
    assert torch.equal(loaded.model["w"], torch.full((3, 2), 2.0))
    assert torch.equal(loaded.ema["b"], torch.arange(4.0) * 0.5)
    assert loaded.optimizer["param_groups"][0]["lr"] == 0.1
    g = torch.Generator().manual_seed(999)
    restore_rng_state(loaded.rng, {"noise": g})
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=torch.Generator().manual_seed(12)))


def test_keep_newest(tmp_path):
    for step in (1, 2, 3, 4):
        save(tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003", "step-000004"]


def test_rng_state_restores_global_generators(tmp_path):
    state = capture_rng_state()
    expected = (torch.rand(2), __import__("random").random(), __import__("numpy").random.rand())
    restore_rng_state(state)
    assert torch.equal(torch.rand(2), expected[0])
    assert __import__("random").random() == expected[1]
    assert __import__("numpy").random.rand() == expected[2]
    with pytest.raises(CheckpointError, match="no state for the trainer's generator"):
        restore_rng_state(state, {"sigma": torch.Generator()})


@pytest.mark.parametrize("fail_on", ["ema.safetensors", "optimizer.pt", "rng.pt"])
def test_crash_mid_write_leaves_previous_checkpoint_usable(tmp_path, monkeypatch, fail_on):
    save(tmp_path, 1)
    real_save_file, real_torch_save = ckpt.save_file, ckpt.torch.save

    def failing_save_file(tensors, filename, *a, **k):
        if filename.endswith(fail_on):
            raise OSError("disk full (simulated)")
        return real_save_file(tensors, filename, *a, **k)

    def failing_torch_save(obj, f, *a, **k):
        if str(f).endswith(fail_on):
            open(f, "wb").write(b"partial")
            raise OSError("disk full (simulated)")
        return real_torch_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", failing_save_file)
    monkeypatch.setattr(ckpt.torch, "save", failing_torch_save)
    with pytest.raises(OSError, match="simulated"):
        save(tmp_path, 2)
    monkeypatch.undo()
    assert find_latest(tmp_path).name == "step-000001"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001"]
    assert load_checkpoint(find_latest(tmp_path)).step == 1
    assert [p.name.startswith(".step-000002.tmp") for p in remove_stale_temporaries(tmp_path)] == [True]


def test_crash_before_pointer_update_keeps_previous_latest(tmp_path, monkeypatch):
    save(tmp_path, 1)

    def crash(*args, **kwargs):
        raise OSError("power loss (simulated)")

    monkeypatch.setattr(layout, "write_text_atomic", crash)
    with pytest.raises(OSError):
        save(tmp_path, 2)
    assert find_latest(tmp_path).name == "step-000001"
    assert load_checkpoint(tmp_path / "checkpoints" / "step-000002").step == 2  # complete, just unconfirmed


def test_resaving_a_step_replaces_it(tmp_path):
    save(tmp_path, 3, value=1.0)
    save(tmp_path, 3, value=7.0)
    assert torch.equal(load_checkpoint(find_latest(tmp_path)).model["w"], torch.full((3, 2), 7.0))
    assert not remove_stale_temporaries(tmp_path)


def test_truncated_weights_are_detected(tmp_path):
    path = save(tmp_path, 5)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors has \d+ bytes.*truncated"):
        load_checkpoint(path)


def test_garbled_files_are_detected(tmp_path):
    path = save(tmp_path, 5)
    size = (path / "model.safetensors").stat().st_size
    (path / "model.safetensors").write_bytes(b"\xff" * size)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_checkpoint(path)
    path = save(tmp_path, 6)
    size = (path / "optimizer.pt").stat().st_size
    (path / "optimizer.pt").write_bytes(b"\x00" * size)
    with pytest.raises(CheckpointError, match=r"optimizer\.pt: cannot be loaded"):
        load_checkpoint(path)


def test_missing_and_invalid_state(tmp_path):
    path = save(tmp_path, 5)
    (path / "rng.pt").unlink()
    with pytest.raises(CheckpointError, match=r"rng\.pt is missing"):
        load_checkpoint(path)
    (path / "trainer_state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"trainer_state\.json: not valid JSON"):
        load_checkpoint(path)
    (path / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match=r"trainer_state\.json is missing"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def test_bad_pointers(tmp_path):
    save(tmp_path, 5)
    pointer = tmp_path / "checkpoints" / "latest"
    pointer.write_text("step-000009\n")
    with pytest.raises(CheckpointError, match="names 'step-000009'.*does not exist"):
        find_latest(tmp_path)
    pointer.write_text("garbage")
    with pytest.raises(CheckpointError, match="expected a checkpoint name"):
        find_latest(tmp_path)
    pointer.unlink()
    with pytest.raises(CheckpointError, match="latest is missing.*step-000005"):
        find_latest(tmp_path)


def test_state_records_sizes(tmp_path):
    path = save(tmp_path, 1)
    state = json.loads((path / "trainer_state.json").read_text())
    assert set(state["files"]) == {"model.safetensors", "ema.safetensors", "optimizer.pt", "rng.pt"}
    assert state["files"]["rng.pt"] == (path / "rng.pt").stat().st_size
