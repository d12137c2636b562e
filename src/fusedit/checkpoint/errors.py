"""The error every checkpoint reader raises."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint (or a run directory's ``latest`` pointer) is missing, incomplete or corrupt, or does not fit the
    run loading it. The message names the file and what is wrong with it."""
