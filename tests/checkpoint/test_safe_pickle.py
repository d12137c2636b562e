"""Item 11 of issue 17: no fusedit checkpoint file executes code when loaded. A pickle payload planted in a
per-rank state file, an RNG file or an optimizer file is refused, and its code never runs."""

from __future__ import annotations

import json
import pickle
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from fusedit.checkpoint.dcp_safety import SafeLoadPlanner, checkpoint_error_of
from fusedit.checkpoint.errors import CheckpointError
from fusedit.checkpoint.rng import capture_rng_state
from fusedit.checkpoint.safe_pickle import load_torch_file
from fusedit.checkpoint.sharded import load_sharded_checkpoint, read_sharded_weights, save_sharded_checkpoint
from fusedit.checkpoint.single import load_checkpoint
from fusedit.dist.env import DistEnv

from .test_single import save


class Payload:
    """Unpickling this calls ``open(marker, "w")`` (stands for any code an attacker would run)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path, marker):
    torch.save({"rng": Payload(marker)}, path)


def test_payload_in_a_torch_file_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    plant(tmp_path / "rank-00000.pt", marker)
    with pytest.raises(CheckpointError, match="refused: it holds Python objects"):
        load_torch_file(tmp_path / "rank-00000.pt")
    assert not marker.exists()
    # a raw pickle (not torch's zip format) is refused too
    (tmp_path / "raw.pt").write_bytes(pickle.dumps(Payload(marker), protocol=2))
    with pytest.raises(CheckpointError):
        load_torch_file(tmp_path / "raw.pt")
    assert not marker.exists()


def test_rng_states_load_without_unpickling_code(tmp_path):
    torch.save(capture_rng_state({"noise": torch.Generator().manual_seed(1)}), tmp_path / "rng.pt")
    state = load_torch_file(tmp_path / "rng.pt")
    assert state["numpy"][0] == "MT19937" and isinstance(state["numpy"][1], torch.Tensor)


@pytest.mark.parametrize("name", ["rng.pt", "optimizer.pt"])
def test_payload_in_a_single_process_checkpoint_is_refused(tmp_path, name):
    path = save(tmp_path, 3)
    marker = tmp_path / "pwned"
    plant(path / name, marker)
    state = json.loads((path / "trainer_state.json").read_text())
    state["files"][name] = (path / name).stat().st_size  # sizes match: only the content betrays it
    (path / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=f"{name}: refused"):
        load_checkpoint(path)
    assert not marker.exists()


def test_payload_in_a_sharded_checkpoints_rank_file_is_refused(tmp_path, monkeypatch):
    """The per-rank state of a sharded checkpoint (``rank-00000.pt``), the file issue 17 names."""
    import fusedit.checkpoint.sharded as sharded

    path = tmp_path / "step-000001"
    path.mkdir()
    marker = tmp_path / "pwned"
    plant(path / "rank-00000.pt", marker)
    state = {"format": sharded.FORMAT, "step": 1, "world_size": 1, "has_ema": False, "files": {}}
    (path / "trainer_state.json").write_text(json.dumps(state))
    monkeypatch.setattr(sharded, "_payload", lambda *a: {"model": {}, "optimizer": {}})
    monkeypatch.setattr(sharded, "_dcp_load", lambda payload, p: None)
    monkeypatch.setattr(sharded, "set_state_dict", lambda *a, **k: None)
    with pytest.raises(CheckpointError, match="rank-00000.pt: refused"):
        load_sharded_checkpoint(path, model=torch.nn.Linear(1, 1), optimizer=None)
    assert not marker.exists()


def sharded_checkpoint(run_dir):
    """A real one-process sharded (DCP) checkpoint of a small model and its AdamW state."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = save_sharded_checkpoint(
            run_dir, 1, model=model, optimizer=optimizer, state={}, rank_state={"rng": {}}, env=DistEnv()
        )
    return path, model, optimizer


def load_into(path, model, optimizer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_sharded_checkpoint(path, model=model, optimizer=optimizer)


def test_payload_in_dcp_metadata_is_refused(tmp_path):
    """DCP itself unpickles ``dcp/.metadata`` with plain pickle: fusedit checks it against an allow-list first."""
    path, model, optimizer = sharded_checkpoint(tmp_path)
    assert load_into(path, model, optimizer).step == 1  # the intact checkpoint loads
    marker = tmp_path / "pwned"
    metadata = path / "dcp" / ".metadata"
    metadata.write_bytes(pickle.dumps(Payload(marker)))
    state = json.loads((path / "trainer_state.json").read_text())
    state["files"]["dcp/.metadata"] = metadata.stat().st_size
    (path / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"\.metadata: refused: .*io\.open"):
        load_into(path, model, optimizer)
    with pytest.raises(CheckpointError, match="refused"):
        read_sharded_weights(path)
    assert not marker.exists()


def test_payload_in_a_dcp_byte_item_is_refused(tmp_path):
    """DCP reads non-tensor items with ``torch.load(weights_only=False)``; the planner checks them first."""
    marker = tmp_path / "pwned"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"extra": {"obj": Payload(marker), "lr": 0.5}}, checkpoint_id=str(tmp_path / "dcp"))
        with pytest.raises(CheckpointError, match="extra.obj: refused"):
            try:
                dcp.load(
                    {"extra": {"obj": None, "lr": 0.0}}, checkpoint_id=str(tmp_path / "dcp"), planner=SafeLoadPlanner()
                )
            except CheckpointException as error:
                raise checkpoint_error_of(error, tmp_path / "dcp") from None
        safe = {"extra": {"lr": 0.0}}
        dcp.load(safe, checkpoint_id=str(tmp_path / "dcp"), planner=SafeLoadPlanner())
    assert safe["extra"]["lr"] == 0.5 and not marker.exists()
