"""Issue 17 end to end with the real CLI and a tiny model: items 1-5 and 10, the fault tests with real processes and
``kill -9`` (``T`` below is the demo config shrunk to a seconds-long CPU run, ``conftest.overrides_for``)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fusedit.cli import main as cli
from fusedit.experiment import load_experiment
from fusedit.rundir.config_guard import CHANGES_FILE
from fusedit.rundir.lock import LOCK_FILE
from fusedit.train.launch import train_run
from fusedit.train.logging import read_metrics

pytestmark = pytest.mark.slow


def tree_digest(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root`` (what "nothing in the run changed" compares)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llm_dir, demo_overrides):
    """A finished 4-step run (checkpoints at steps 2 and 4)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    train_run(load_experiment("demo", demo_overrides(tiny_llm_dir)), run, device="cpu", progress=False)
    return run


@pytest.fixture
def run(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def train_args(llm_dir, run, *extra):
    from tests.conftest import overrides_for

    overrides = [e for e in extra if "=" in e and not e.startswith("-")]
    flags = [e for e in extra if e not in overrides]
    return ["train", "demo", *overrides_for(llm_dir), *overrides, *flags, "--run-dir", str(run), "--device", "cpu"]


def start_cli(args, tmp_path, name):
    """``fusedit ARGS`` in a real process (stderr to ``tmp_path/name.err``)."""
    err = open(tmp_path / f"{name}.err", "w")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "fusedit.cli", *args], stdout=err, stderr=err, env=env, cwd=tmp_path)


def wait_for(condition, proc, timeout=120.0):
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) before the condition held")
        if time.time() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.2)


def one_error_line(stderr: str) -> bool:
    """One ``error: ...`` line and no traceback (progress bars of model loading aside)."""
    return "Traceback" not in stderr and sum(line.startswith("error:") for line in stderr.splitlines()) == 1


def kill9(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize(
    "override",
    [
        "model.dit_hidden_size=64",  # item 1: the failed resume used to rewrite config.yaml
        "model.pos_embed=1d-rope",  # item 2: these used to continue with exit 0
        "text.max_length=8",
        "data.shapes.seed=5",
    ],
)
def test_refused_resume_changes_nothing_and_the_run_still_samples(run, tiny_llm_dir, tmp_path, capsys, override):
    before = tree_digest(run)
    assert cli(train_args(tiny_llm_dir, run, override)) == 2
    err = capsys.readouterr().err
    assert one_error_line(err) and override.split("=")[0] in err and "nothing was changed" in err
    assert tree_digest(run) == before  # config.yaml, metrics.jsonl, checkpoints, final/: byte-identical
    image = tmp_path / "x.png"
    assert cli(["sample", str(run), "--prompt", "a red circle", "--out", str(image), "--steps", "1"]) == 0


def test_allowed_change_needs_the_flag_and_is_recorded(run, tiny_llm_dir, capsys):
    config_before = (run / "config.yaml").read_bytes()
    assert cli(train_args(tiny_llm_dir, run, "train.max_steps=6")) == 2
    assert "--allow-change train.max_steps" in capsys.readouterr().err
    assert cli(train_args(tiny_llm_dir, run, "train.max_steps=6", "--allow-change", "train.max_steps")) == 0
    assert [r["step"] for r in read_metrics(run) if "loss" in r][-2:] == [5, 6]
    assert (run / "config.yaml").read_bytes() == config_before  # written once
    record = json.loads((run / CHANGES_FILE).read_text())
    assert record["step"] == 4 and record["changes"] == {"train.max_steps": [4, 6]}


def test_resume_from_a_named_checkpoint(run, tiny_llm_dir, capsys):
    """Item 10: ``--resume-from PATH`` exists (the recovery when the newest checkpoint is corrupt)."""
    assert cli(train_args(tiny_llm_dir, run, "--resume-from", str(run / "checkpoints" / "step-000002"))) == 0
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4]  # steps 3, 4 retrained once
    assert cli(train_args(tiny_llm_dir, run, "--no-resume", "--resume-from", str(run))) == 2
    assert "contradict" in capsys.readouterr().err


def test_kill_during_no_resume_before_its_first_checkpoint_keeps_the_old_run(run, tiny_llm_dir, tmp_path):
    """Item 3: ``--no-resume`` used to truncate metrics.jsonl at start; killed before its first checkpoint, the
    history was gone and a plain resume reported "nothing to do" on the old step."""
    before = tree_digest(run)
    args = train_args(tiny_llm_dir, run, "--no-resume", "train.max_steps=100000", "train.checkpoint_every=100000")
    proc = start_cli(args, tmp_path, "fresh")
    metrics = run / "metrics.jsonl"
    try:  # the new run has logged a step (the old one is aside), no checkpoint yet
        wait_for(lambda: any(tmp_path.glob("run.previous-*")) and metrics.is_file() and metrics.read_text(), proc)
    finally:
        kill9(proc)
    [previous] = list(tmp_path.glob("run.previous-*"))
    assert "was moved to" in (tmp_path / "fresh.err").read_text()
    assert tree_digest(previous) == before  # the whole old run, byte for byte
    assert not (run / "checkpoints").exists()
    # a plain resume of the new run starts it from step 0 (it used to say "nothing to do" at the old step 4)
    assert (
        cli(
            train_args(
                tiny_llm_dir,
                run,
                "train.max_steps=2",
                "train.checkpoint_every=100000",
                "--allow-change",
                "train.max_steps",
            )
        )
        == 0
    )
    assert [r["step"] for r in read_metrics(run)] == [1, 2]


def test_second_trainer_is_refused_and_a_killed_owners_lock_is_taken_over(run, tiny_llm_dir, tmp_path):
    """Item 4: two ``fusedit train`` on one directory used to both write; the second one now exits at once."""
    long = ["train.max_steps=100000", "--allow-change", "train.max_steps"]
    first = start_cli(train_args(tiny_llm_dir, run, *long), tmp_path, "first")
    try:
        wait_for(lambda: len(read_metrics(run)) >= 6, first)
        second = subprocess.run(
            [sys.executable, "-m", "fusedit.cli", *train_args(tiny_llm_dir, run, *long)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        assert second.returncode == 2
        assert (
            second.stderr.strip().count("\n") == 0
            and f"in use by another fusedit process (pid {first.pid}" in second.stderr
        )
        assert first.poll() is None  # the owner is undisturbed
    finally:
        kill9(first)
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == first.pid  # left behind by the kill
    step = int((run / "checkpoints" / "latest").read_text().strip().split("-")[1])
    third = subprocess.run(
        [
            sys.executable,
            "-m",
            "fusedit.cli",
            *train_args(tiny_llm_dir, run, f"train.max_steps={step}", "--allow-change", "train.max_steps"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert third.returncode == 0, third.stderr
    assert f"taking over the lock of {run} left by pid {first.pid}" in third.stderr
    assert not (run / LOCK_FILE).exists()


KILL_DURING_EXPORT = """
import os, signal, sys
import fusedit.atomic
def killed(tmp, final):  # the export's files are written; die before the rename
    os.kill(os.getpid(), signal.SIGKILL)
fusedit.atomic.replace_dir = killed
from fusedit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_during_the_final_export_leaves_no_temporary_behind(run, tiny_llm_dir, tmp_path):
    """Item 10: a kill during the ``final/`` export used to leave ``.final.tmp-<pid>`` forever."""
    shutil.rmtree(run / "final")
    proc = subprocess.run(
        [sys.executable, "-c", KILL_DURING_EXPORT, *train_args(tiny_llm_dir, run)], cwd=tmp_path, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in run.glob(".final.tmp-*")] == [f".final.tmp-{proc.args and _pid_of(run)}"]
    assert cli(train_args(tiny_llm_dir, run)) == 0
    assert not list(run.glob(".final.*")) and (run / "final" / "ema.safetensors").is_file()


def _pid_of(run):
    return next(run.glob(".final.tmp-*")).name.rsplit("-", 1)[1]


def flip_to_nan(path):
    data = bytearray(path.read_bytes())
    data[-2:] = b"\xc0\x7f"
    path.write_bytes(bytes(data))


def test_corrupt_final_weights_fail_sampling_and_export_in_one_line(run, tmp_path, capsys):
    """Item 5: a byte-flipped ``final/ema.safetensors`` sampled an all-black PNG; export copied bad weights."""
    flip_to_nan(run / "final" / "ema.safetensors")
    image, out = tmp_path / "x.png", tmp_path / "export"
    assert cli(["sample", str(run), "--prompt", "a red circle", "--out", str(image), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert one_error_line(err) and "ema.safetensors" in err and "NaN/inf" in err and not image.exists()
    assert cli(["export", str(run), str(out)]) == 2
    assert "NaN/inf" in capsys.readouterr().err and not out.exists()
    ema = run / "final" / "ema.safetensors"
    ema.write_bytes(ema.read_bytes()[:-100])  # truncated
    assert cli(["export", str(run), str(out)]) == 2
    assert "truncated" in capsys.readouterr().err and not out.exists()
