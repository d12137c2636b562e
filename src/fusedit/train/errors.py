"""Errors of the training loop, each naming what went wrong and what to do about it."""

from __future__ import annotations

from pathlib import Path


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN/inf. Raised before the optimiser step, so no weights were changed
    and no checkpoint with non-finite weights was written.

    Attributes:
        what: ``loss`` or ``gradient norm``.
        loss, grad_norm: the values of the failed step.
        step: the optimiser step (1-based) whose loss was not finite (``None`` when not known).
        last_checkpoint: the newest good checkpoint directory, or ``None`` if none was written.
    """

    def __init__(
        self, what: str, loss: float, grad_norm: float, step: int | None = None, last_checkpoint: Path | None = None
    ) -> None:
        where = f" at step {step}" if step is not None else ""
        message = f"non-finite {what}{where} (loss {loss}, grad norm {grad_norm}); the weights were not updated"
        if step is not None:
            message += f". Last good checkpoint: {last_checkpoint or 'none (no checkpoint written yet)'}"
        super().__init__(message)
        self.what, self.loss, self.grad_norm = what, loss, grad_norm
        self.step = step
        self.last_checkpoint = last_checkpoint

    def at(self, step: int, last_checkpoint: Path | None) -> NonFiniteLossError:
        """The same error, naming the step and the last good checkpoint."""
        return NonFiniteLossError(self.what, self.loss, self.grad_norm, step, last_checkpoint)
