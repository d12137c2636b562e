"""fusedit: deep fusion of a frozen decoder-only LLM with a trainable diffusion transformer (FuseDiT),
side by side with the shallow-fusion baselines of arXiv 2505.10046."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_pipeline"]


def load_pipeline(path: Any, **kwargs: Any) -> Any:
    """Load a sampling pipeline from a training run, an exported pipeline folder or a reference (fuse-dit) folder.

    See :func:`fusedit.sampling.loading.load_pipeline`. (Imported here on first use, so that ``import fusedit`` stays
    light.)
    """
    from fusedit.sampling.loading import load_pipeline as _load_pipeline

    return _load_pipeline(path, **kwargs)
