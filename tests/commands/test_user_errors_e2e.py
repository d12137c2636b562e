"""Issue 17, item 6, end to end with a real (tiny) model: data with nothing usable and a full disk during a
checkpoint end in one line and exit code 2, and the run resumes once space is freed."""

from __future__ import annotations

import errno
import io
import tarfile

import pytest

import fusedit.checkpoint.single
from fusedit.cli import main as cli

pytestmark = pytest.mark.slow


def train(overrides: list[str], run_dir) -> list[str]:
    return ["train", "demo", *overrides, "--run-dir", str(run_dir), "--device", "cpu"]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.mark.parametrize("workers", [0, 1])
def test_an_image_folder_with_no_readable_image(tmp_path, tiny_llm_dir, demo_overrides, capsys, workers):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "captions.jsonl").write_text('{"file": "a.png", "caption": "x"}\n{"file": "b.png", "caption": "y"}\n')
    (folder / "a.png").write_bytes(b"not an image")
    data = ["data.source=folder", f"data.path={folder}", f"data.num_workers={workers}"]
    assert cli(train(demo_overrides(tiny_llm_dir) + data, tmp_path / "run")) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: no readable image in {folder}: all 2 image(s) listed in captions.jsonl")


def test_shards_with_no_usable_sample(tmp_path, tiny_llm_dir, demo_overrides, capsys):
    shard = tmp_path / "train-0000.tar"
    with tarfile.open(shard, "w") as tf:
        for name, data in (("k.image.jpg", b"not a jpeg"), ("k.synthetic_caption.txt", b"a red circle")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    data = ["data.source=webdataset", f"data.path={shard}"]
    assert cli(train(demo_overrides(tiny_llm_dir) + data, tmp_path / "run")) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: no usable sample in 1 shard(s) ({shard}): 1 corrupt or incomplete sample(s)")


def test_a_full_disk_during_a_checkpoint_then_resume(tmp_path, tiny_llm_dir, demo_overrides, capsys, monkeypatch):
    run = tmp_path / "run"
    real_save_file = fusedit.checkpoint.single.save_file
    calls = []

    def disk_fills_at_step_4(tensors, path, *args, **kwargs):
        calls.append(path)
        if ".step-000004." in path:
            real_save_file(tensors, path, *args, **kwargs)  # part of the checkpoint is written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(fusedit.checkpoint.single, "save_file", disk_fills_at_step_4)
    assert cli(train(demo_overrides(tiny_llm_dir), run)) == 2
    line = one_error_line(capsys)
    assert line == f"error: no space left on device at {run / 'checkpoints' / 'step-000004'}; free space and resume"
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-000002"]  # the partial write is gone
    assert (checkpoints / "latest").read_text().strip() == "step-000002"

    monkeypatch.setattr(fusedit.checkpoint.single, "save_file", real_save_file)  # space freed
    assert cli(train(demo_overrides(tiny_llm_dir), run)) == 0
    out = capsys.readouterr()
    assert "resumed from" in out.out + out.err and f"final weights: {run / 'final'}" in out.out
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-000002", "step-000004"]
