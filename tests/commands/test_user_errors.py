"""Issue 17, items 6-10: a user's mistake or a machine's fault ends in one clear line and a non-zero exit, before
anything is loaded, never in a traceback or a silent default (the end-to-end cases that need a model are in
``test_user_errors_e2e.py``)."""

from __future__ import annotations

import argparse
import errno
from pathlib import Path

import pytest
import torch

import fusedit.sampling.export
import fusedit.sampling.loading
from fusedit.cli import build_parser
from fusedit.cli import main as cli
from fusedit.commands import one_line
from fusedit.config_keys import attribute_docs, iter_keys
from fusedit.data.errors import NoUsableDataError
from fusedit.data.folder import ImageFolderDataset
from fusedit.experiment import ExperimentConfig, load_experiment
from fusedit.train.config import TrainConfig


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a command gets as far as loading a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the command loaded a model before refusing its arguments")

    monkeypatch.setattr(fusedit.sampling.loading, "load_pipeline", refuse)


def error_line(capsys) -> str:
    """The last line of stderr (argparse prints the usage first, then ``prog: error: ...``)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def exit_code(argv: list[str]) -> int:
    try:
        return cli(argv)
    except SystemExit as stop:  # argparse refuses a value with exit code 2
        return int(stop.code or 0)


SAMPLE = ["sample", "some-run", "--prompt", "a red circle", "--out", "x.png"]


# ---- item 8: bad values are refused, not replaced by defaults ------------------------------------------------------
@pytest.mark.parametrize(
    "extra,message",
    [
        (["--height", "0", "--width", "0"], "argument --height: expected a positive integer (1 or more), got 0"),
        (["--width", "-16"], "argument --width: expected a positive integer (1 or more), got -16"),
        (["--steps", "0"], "argument --steps: expected a positive integer (1 or more), got 0"),
        (["--cfg", "-5"], "argument --cfg: expected a guidance scale >= 1 (1 = no guidance"),
        (["--cfg", "0.5"], "argument --cfg: expected a guidance scale >= 1 (1 = no guidance"),
        (["--cfg", "nan"], "argument --cfg: expected a finite number, got 'nan'"),
        (["--cfg", "inf"], "argument --cfg: expected a finite number, got 'inf'"),
        (["--num-images", "0"], "argument --num-images: expected a positive integer (1 or more), got 0"),
        (["--max-length", "0"], "argument --max-length: expected a positive integer (1 or more), got 0"),
    ],
)
def test_sample_refuses_bad_values_before_loading(no_loading, capsys, extra, message):
    assert exit_code(SAMPLE + extra) == 2
    assert message in error_line(capsys)


def test_cfg_one_is_accepted_as_no_guidance():
    args = build_parser().parse_args(SAMPLE + ["--cfg", "1"])
    assert args.cfg == 1.0


@pytest.mark.parametrize(
    "argv,message",
    [
        (["bench", "train", "--preset", "tiny", "--batch-size", "0"], "argument --batch-size: expected a positive"),
        (["bench", "train", "--preset", "tiny", "--iters", "0"], "argument --iters: expected a positive"),
        (["eval", "run", "--suite", "shapes", "--cfg", "0.5"], "argument --cfg: expected a guidance scale >= 1"),
        (["eval", "run", "--suite", "shapes", "--steps", "0"], "argument --steps: expected a positive"),
        (["demo", "--steps", "0"], "argument --steps: expected a positive"),
    ],
)
def test_other_commands_refuse_bad_values(capsys, argv, message):
    assert exit_code(argv) == 2
    assert message in error_line(capsys)


# ---- item 9: unclear messages --------------------------------------------------------------------------------------
def test_out_with_an_unknown_extension_fails_before_sampling(no_loading, capsys, tmp_path):
    assert exit_code(SAMPLE[:-1] + [str(tmp_path / "image.xyz")]) == 2
    assert "has extension '.xyz'; name an image file such as out.png" in error_line(capsys)
    assert exit_code(SAMPLE[:-1] + [str(tmp_path)]) == 2
    assert f"is a folder; name an image file, e.g. {tmp_path / 'out.png'}" in error_line(capsys)
    assert exit_code(SAMPLE[:-1] + [str(tmp_path / "noext")]) == 2
    assert "has no extension" in error_line(capsys)


def test_train_without_a_config_says_what_is_needed(capsys):
    assert exit_code(["train"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: fusedit train")
    assert "error: a config is needed" in err and "`fusedit configs` lists the shipped ones" in err
    assert "Traceback" not in err


# ---- item 6: devices -----------------------------------------------------------------------------------------------
def test_malformed_device_is_one_line(no_loading, capsys):
    assert exit_code(SAMPLE + ["--device", "gpu0"]) == 2
    err = capsys.readouterr().err
    assert err == "error: device 'gpu0' is not a device name; use cpu, cuda, cuda:N (N = GPU index) or mps\n"


def test_cuda_on_a_cpu_only_torch_is_one_line(no_loading, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    for argv in (SAMPLE + ["--device", "cuda"], ["train", "demo", "--device", "cuda:1"]):
        assert exit_code(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: device 'cuda") and "has no CUDA support; use --device cpu" in err
        assert err.count("\n") == 1


def test_cuda_index_beyond_the_visible_gpus(monkeypatch):
    from fusedit.devices import DeviceError, check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match=r"only 2 GPU\(s\) are visible \(cuda:0 to cuda:1\)"):
        check_device("cuda:2")


def test_an_error_from_a_dataloader_worker_is_one_line(tmp_path):
    (tmp_path / "captions.jsonl").write_text('{"file": "a.png", "caption": "x"}\n')
    (tmp_path / "a.png").write_bytes(b"not a png")
    loader = torch.utils.data.DataLoader(ImageFolderDataset(tmp_path, resolution=8), batch_size=1, num_workers=1)
    with pytest.raises(NoUsableDataError) as caught:
        next(iter(loader))
    assert "Original Traceback" in str(caught.value)  # what torch re-raises: the worker's whole traceback
    assert one_line(caught.value).startswith(f"no readable image in {tmp_path}: all 1 image(s) listed")
    assert "\n" not in one_line(caught.value)


# ---- item 6: a full disk -------------------------------------------------------------------------------------------
@pytest.mark.slow  # several seconds: subprocesses / the full control set
def test_a_full_disk_is_one_line_naming_the_path(capsys, monkeypatch, tmp_path):
    def fill_disk(path, out, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fusedit.sampling.export, "export_pipeline", fill_disk)
    assert exit_code(["export", "some-run", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"error: no space left on device at {tmp_path / 'out'}; free space and resume\n"


# ---- item 10 (part): help text and the override keys ----------------------------------------------------------------
def all_actions(parser: argparse.ArgumentParser, prog: str = "fusedit"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from all_actions(sub, f"{prog} {name}")
        else:
            yield prog, action


@pytest.mark.slow  # builds every command's parser (imports each command's modules): several seconds
def test_every_option_of_every_command_has_help():
    actions = list(all_actions(build_parser()))
    assert len({prog for prog, _ in actions}) == 11  # fusedit + its 10 commands
    missing = [
        f"{prog} {'/'.join(action.option_strings) or action.dest}"
        for prog, action in actions
        if not (action.help and action.help.strip() and action.help != argparse.SUPPRESS)
    ]
    assert missing == []


def test_the_help_walker_sees_an_undocumented_option(monkeypatch):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["sample"]
    sub.add_argument("--planted")
    assert any(a.dest == "planted" and not a.help for _, a in all_actions(parser))


def test_configs_keys_lists_every_key_with_type_default_and_help(capsys):
    assert cli(["configs", "--keys"]) == 0
    out = capsys.readouterr().out
    keys = list(iter_keys(ExperimentConfig))
    assert len(keys) > 90 and all(k.help for k in keys), [k.key for k in keys if not k.help]
    for key in keys:
        assert f"{key.key}: {key.type} = {key.default}\n    {key.help}" in out
    assert "train.max_steps: int = 1000\n    optimiser steps to train." in out
    assert "model.pos_embed: 'ape' | '1d-rope' | '2d-rope' | 'm-rope' = 2d-rope" in out
    assert "train.warmup_steps: int = 0\n    for the schedules above." in out  # a grouped docstring entry


def test_train_list_keys_shows_the_values_of_the_given_config(capsys):
    steps = load_experiment("tiny/base").train.max_steps
    assert steps != TrainConfig().max_steps
    assert cli(["train", "tiny/base", "--list-keys"]) == 0
    out = capsys.readouterr().out
    assert f"train.max_steps: int = {steps}\n" in out  # tiny/base's value, not the default 1000
    assert cli(["train", "--list-keys"]) == 0
    assert "train.max_steps: int = 1000\n" in capsys.readouterr().out


def test_attribute_docs_reads_grouped_and_continued_entries():
    docs = attribute_docs(TrainConfig)
    assert docs["lr"] == docs["betas"] == "AdamW."
    assert docs["lr_schedule"].startswith("``constant``") and docs["lr_schedule"].endswith("to ``min_lr``).")
    assert "distributed" in docs and attribute_docs(Path) == {}


def test_a_full_disk_while_sample_writes_the_image(capsys, monkeypatch, tmp_path):
    class Image:
        def save(self, path):
            Path(path).write_bytes(b"\x89PNG partial")
            raise OSError(errno.ENOSPC, "No space left on device")

    class Pipe:
        device = torch.device("cpu")

        def __call__(self, *args, **kwargs):
            return argparse.Namespace(images=[Image()], num_truncated=0)

    monkeypatch.setattr(fusedit.sampling.loading, "load_pipeline", lambda *a, **k: Pipe())
    out = tmp_path / "img.png"
    assert exit_code(["sample", "run", "--prompt", "a red circle", "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: no space left on device at {out}; free space and resume\n"
    assert not out.exists()  # the partial image is removed
