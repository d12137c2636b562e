"""Progress output: a bar on a terminal, plain lines every few percent when piped (no carriage returns)."""

from __future__ import annotations

import io

from tqdm.auto import tqdm

from fusedit.progress import LineProgress, progress_bar, track
from fusedit.train.logging import TrainLogger


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_piped_progress_prints_a_line_every_five_percent():
    stream = io.StringIO()
    bar = progress_bar(200, desc="train", unit="step", stream=stream)
    assert isinstance(bar, LineProgress)
    for _ in range(200):
        bar.set_postfix({"loss": "0.5"})
        bar.update()
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert len(lines) == 20  # 5 %, 10 %, ..., 100 %; close() adds nothing after the last line
    assert lines[0].startswith("train: 10/200 steps (5%)") and "loss=0.5" in lines[0] and "ETA" in lines[0]
    assert lines[-1].startswith("train: 200/200 steps (100%)")


def test_resumed_progress_counts_from_the_initial_step_and_closes_with_a_last_line():
    stream = io.StringIO()
    bar = LineProgress(100, initial=90, desc="train", unit="step", stream=stream)
    for _ in range(3):
        bar.update()
    bar.close()
    assert stream.getvalue().splitlines() == [stream.getvalue().splitlines()[0]]
    assert stream.getvalue().startswith("train: 93/100 steps (93%)")


def test_a_terminal_gets_a_tqdm_bar():
    bar = progress_bar(10, stream=_Terminal())
    assert isinstance(bar, tqdm)
    bar.close()


def test_track_yields_everything(capsys):
    assert list(track(range(7), 7, desc="sampling", unit="step")) == list(range(7))
    err = capsys.readouterr().err
    assert "\r" not in err and "sampling: 7/7 steps (100%)" in err


def test_training_log_is_readable_when_piped(tmp_path, capsys):
    log = TrainLogger(tmp_path, 40, progress=True, tensorboard=False)
    for step in range(1, 41):
        log.advance()
        log.log(step, {"loss": 1.0 / step, "img_per_s": 10.0})
    log.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    assert len(err.splitlines()) == 20 and "train: 40/40 steps (100%)" in err
