"""fusedit: deep fusion of a frozen decoder-only LLM with a trainable diffusion transformer (FuseDiT),
side by side with the shallow-fusion baselines of arXiv 2505.10046.

``import fusedit`` stays light (no torch). ``fusedit.load_pipeline``, ``fusedit.FuseDiTPipeline`` and
``fusedit.FuseDiTTransformer2DModel`` import the diffusers classes on first use, which registers them with diffusers
(``DiffusionPipeline.from_pretrained`` of a saved fusedit folder then works; ``import fusedit.diffusers_native`` does
the same explicitly).
"""

from __future__ import annotations

import logging
from typing import Any

__version__ = "0.1.0"


class _UnusedKernelNotice(logging.Filter):
    """Drops bitsandbytes' warning that it could not fetch its optional 4-bit CPU kernel from the Hugging Face hub
    (printed on import on CPUs with AVX512-BF16, whoever imports it first: diffusers, peft or transformers).
    fusedit uses no 4-bit kernel, so the line only misleads; every other bitsandbytes message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_UnusedKernelNotice())

__all__ = ["FuseDiTPipeline", "FuseDiTTransformer2DModel", "__version__", "load_pipeline"]

_DIFFUSERS_CLASSES = ("FuseDiTPipeline", "FuseDiTPipelineOutput", "FuseDiTTransformer2DModel")


def load_pipeline(path: Any, **kwargs: Any) -> Any:
    """Load a sampling pipeline (a diffusers ``FuseDiTPipeline``) from a training run, an exported pipeline folder or
    a reference (fuse-dit) folder.

    See :func:`fusedit.sampling.loading.load_pipeline`. (Imported here on first use, so that ``import fusedit`` stays
    light.)
    """
    from fusedit.sampling.loading import load_pipeline as _load_pipeline

    return _load_pipeline(path, **kwargs)


def __getattr__(name: str) -> Any:
    """``fusedit.FuseDiTPipeline`` and the other diffusers classes, imported (and registered) on first use."""
    if name in _DIFFUSERS_CLASSES:
        import fusedit.diffusers_native as native

        return getattr(native, name)
    raise AttributeError(f"module 'fusedit' has no attribute {name!r}")
