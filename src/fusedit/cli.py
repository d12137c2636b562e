"""The ``fusedit`` entry point (``python -m fusedit.cli ...`` under torchrun): see :mod:`fusedit.commands`."""

from __future__ import annotations

import sys

from fusedit.commands import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
