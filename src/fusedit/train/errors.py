"""Errors of the training loop, each naming what went wrong and what to do about it."""
from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint (or a run directory's ``latest`` pointer) is missing, incomplete or corrupt.

    The message names the file and what is wrong with it.
    """


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN/inf. Raised before the optimiser step, so no weights were changed
    and no checkpoint with non-finite weights was written.

    Attributes:
        step: the optimiser step (1-based) whose loss was not finite.
        last_checkpoint: the newest good checkpoint directory, or ``None`` if none was written.
    """

    def __init__(self, message: str, step: int, last_checkpoint=None) -> None:
        super().__init__(message)
        self.step = step
        self.last_checkpoint = last_checkpoint
