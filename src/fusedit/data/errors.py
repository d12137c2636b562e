"""Errors of the data sources that are the user's to fix (and that the command line prints as one line)."""

from __future__ import annotations


class NoUsableDataError(ValueError):
    """A data source holds no sample that can be used (every image unreadable, every shard sample corrupt); the
    message names the source and what was found."""
