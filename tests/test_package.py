"""``import fusedit``: light (no torch), and it keeps bitsandbytes' notice about a 4-bit kernel it cannot fetch off
the Python API's output, whichever library imports bitsandbytes first."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys

import pytest

import fusedit

NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ..."


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)


def test_import_fusedit_does_not_import_torch():
    assert run_python("import sys, fusedit; print('torch' in sys.modules)").stdout.strip() == "False"


def test_the_kernel_notice_alone_is_filtered():
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    record = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, NOTICE, ("untrusted",), None)
    other = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, "something else went wrong", (), None)
    assert not logger.filter(record) and logger.filter(other)
    assert any(isinstance(f, fusedit._UnusedKernelNotice) for f in logger.filters)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_importing_bitsandbytes_after_fusedit_prints_no_kernel_notice():
    """Where bitsandbytes tries the kernel (CPUs with AVX512-BF16, like this project's machine) its warning would
    reach stderr through logging's last-resort handler; elsewhere this passes trivially."""
    result = run_python("import fusedit, bitsandbytes")
    assert "gemm_4bit_forward" not in result.stderr, result.stderr
