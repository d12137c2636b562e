"""``key=value`` overrides are accepted after options too; anything else left over is still an error."""

from __future__ import annotations

import pytest

from fusedit.commands import parse_arguments


def test_overrides_after_an_option_join_the_overrides():
    args = parse_arguments(["train", "demo", "train.lr=1e-3", "--no-resume", "train.max_steps=10", "name=x"])
    assert args.no_resume and args.config == "demo"
    assert args.overrides == ["train.lr=1e-3", "train.max_steps=10", "name=x"]


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "demo", "--no-resume", "--bogus"],  # an unknown option
        ["train", "demo", "--no-resume", "notakeyvalue"],  # a word that is no override
        ["export", "run", "out", "extra=1"],  # a command without overrides
    ],
)
def test_other_leftovers_are_still_refused(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_arguments(argv)
    assert exit_info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err
