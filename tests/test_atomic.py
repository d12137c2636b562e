"""Crash-safe writes when the disk fills (issue 17, item 6): the temporary goes, the error names the path, what
was there before stays complete."""

from __future__ import annotations

import errno
import shutil
from collections import namedtuple

import pytest
import torch

import fusedit.atomic
from fusedit.atomic import DiskFullError, is_disk_full, naming_full_disk, write_dir_atomic, write_text_atomic

Usage = namedtuple("Usage", "total used free")


def test_a_full_disk_in_a_directory_write_keeps_the_old_directory(tmp_path, monkeypatch):
    target = tmp_path / "final"
    write_dir_atomic(target, {"model.safetensors": {"w": torch.ones(2)}, "note.txt": "old"})

    def full(tensors, path):
        open(path, "wb").write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fusedit.atomic, "save_file", full)
    with pytest.raises(DiskFullError) as caught:
        write_dir_atomic(target, {"model.safetensors": {"w": torch.zeros(2)}, "note.txt": "new"})
    assert str(caught.value) == f"no space left on device at {target}; free space and resume"
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no temporary left behind
    assert (target / "note.txt").read_text() == "old"


def test_a_full_disk_in_a_text_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "config.yaml"
    write_text_atomic(target, "old\n")
    real_open = open

    def full_open(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        if "w" in mode:
            handle.write = lambda text: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
        return handle

    monkeypatch.setattr("builtins.open", full_open)
    with pytest.raises(DiskFullError, match=f"no space left on device at {target}"):
        write_text_atomic(target, "new\n")
    monkeypatch.undo()
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_a_writer_without_an_errno_counts_as_a_full_disk_only_when_space_is_low(tmp_path, monkeypatch):
    """torch.save on a full disk raises ``RuntimeError: ... unexpected pos`` (seen on a real 64 KiB tmpfs)."""
    error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 4096, 4096))
    assert is_disk_full(error, tmp_path / "missing" / "file.pt")  # the nearest existing folder is asked
    with pytest.raises(DiskFullError), naming_full_disk(tmp_path / "x.pt"):
        raise error
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 0, 10**9))
    assert not is_disk_full(error, tmp_path)
    with pytest.raises(RuntimeError, match="unexpected pos"), naming_full_disk(tmp_path / "x.pt"):
        raise error
    assert not is_disk_full(ValueError("no"), tmp_path)


def test_a_wrapped_full_disk_is_found_in_the_chain():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("saving failed") from inner
    except RuntimeError as outer:
        assert is_disk_full(outer)
    assert is_disk_full(Exception("Error while serializing: I/O error: No space left on device (os error 28)"))
