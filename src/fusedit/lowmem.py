"""The optional ``bitsandbytes`` dependency of low-memory training (``pip install "fusedit[lowmem]"``): 8-bit AdamW
(``train.optimizer: adamw8bit``, :mod:`fusedit.train.optimizers`) and the 8-bit LLM (``text.quantization: int8``,
:mod:`fusedit.text.llm`)."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import warnings
from typing import Any

from fusedit.config import ConfigError


def import_bitsandbytes(what: str) -> Any:
    """The ``bitsandbytes`` module, or a :class:`ConfigError` naming ``what`` needs it and how to install it."""
    # On CPUs with AVX512-BF16, importing bitsandbytes tries to download an optional 4-bit CPU kernel from the
    # Hugging Face hub through the `kernels` package (a network wait of a minute where the hub is unreachable).
    # fusedit uses no 4-bit kernel: hide `kernels` during the import so bitsandbytes falls back at once.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    kernels = sys.modules.get("kernels")  # transformers may have imported it already
    sys.modules["kernels"] = None  # type: ignore[assignment]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module("bitsandbytes")
    except ImportError as error:
        raise ConfigError(
            f"{what} needs the bitsandbytes package, which is not installed ({error}); "
            f'install it with pip install "fusedit[lowmem]" (or pip install bitsandbytes)'
        ) from None
    except Exception as error:  # a broken install or a missing native library
        raise ConfigError(
            f"{what} needs bitsandbytes, which failed to load ({type(error).__name__}: {error}); "
            f"reinstall it for this machine or use the 32-bit alternative"
        ) from None
    finally:
        if kernels is None:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = kernels


def preload_bitsandbytes_quietly() -> None:
    """Import an installed ``bitsandbytes`` now, the quiet way of :func:`import_bitsandbytes`, so that a later import
    through ``peft`` or ``transformers`` finds it loaded instead of printing a line about (or waiting for) the 4-bit
    kernel it cannot fetch. Nothing happens when it is not installed or is already imported; a broken install is left
    for the feature that needs it to report."""
    if "bitsandbytes" in sys.modules or importlib.util.find_spec("bitsandbytes") is None:
        return
    try:
        import_bitsandbytes("preloading")
    except ConfigError:
        pass
