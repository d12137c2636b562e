"""Item 5 of issue 17: corrupt weight files are errors naming the file (size against the safetensors header, garbled
header, NaN/inf from a flipped byte), and exports re-read what they wrote."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fusedit.checkpoint.errors import CheckpointError
from fusedit.checkpoint.single import read_safetensors
from fusedit.checkpoint.verify import check_safetensors_file, verify_saved_weights


@pytest.fixture
def weights_file(tmp_path):
    path = tmp_path / "ema.safetensors"
    save_file({"w": torch.linspace(-1, 1, 64).reshape(8, 8), "b": torch.zeros(8)}, str(path))
    return path


def test_intact_file_reads(weights_file):
    assert set(read_safetensors(weights_file)) == {"w", "b"}


def test_truncated_and_extended_files_are_refused(weights_file):
    data = weights_file.read_bytes()
    weights_file.write_bytes(data[:-5])
    with pytest.raises(CheckpointError, match="its safetensors header describes .*; the file is truncated"):
        read_safetensors(weights_file)
    weights_file.write_bytes(data + b"\0" * 7)
    with pytest.raises(CheckpointError, match="longer than its header says"):
        read_safetensors(weights_file)
    weights_file.write_bytes(data[:4])
    with pytest.raises(CheckpointError, match="too short"):
        check_safetensors_file(weights_file)


def test_damaged_exponent_bytes_give_non_finite_weights_and_an_error(weights_file):
    data = bytearray(weights_file.read_bytes())
    data[-2:] = b"\xc0\x7f"  # the last float32's exponent bits all set: NaN (what sampled black images)
    weights_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"ema\.safetensors: '.*' holds 1 NaN/inf value"):
        read_safetensors(weights_file)


def test_flipped_header_byte_is_refused(weights_file):
    data = bytearray(weights_file.read_bytes())
    data[8] = ord("}")  # the header's opening brace
    weights_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_safetensors(weights_file)


def test_export_reads_back_what_it_wrote(tmp_path):
    module = nn.Linear(4, 3)
    folder = tmp_path / "transformer"
    folder.mkdir()
    save_file({k: v.detach().clone() for k, v in module.state_dict().items()}, str(folder / "model.safetensors"))
    verify_saved_weights(module, folder)
    with torch.no_grad():
        module.weight[0, 0] += 1  # what was written differs from the model
    with pytest.raises(CheckpointError, match="'weight' reads back different"):
        verify_saved_weights(module, folder)
    save_file({"weight": module.weight.detach().clone()}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing \['bias'\]"):
        verify_saved_weights(module, folder)
