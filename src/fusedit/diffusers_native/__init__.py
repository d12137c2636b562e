"""fusedit models in diffusers' own format.

* :class:`~fusedit.diffusers_native.transformer.FuseDiTTransformer2DModel`: the DiT (deep fusion or a shallow
  baseline) as a ``ModelMixin``/``ConfigMixin`` model;
* :class:`~fusedit.diffusers_native.pipeline.FuseDiTPipeline`: a ``DiffusionPipeline`` (transformer, scheduler,
  text encoder and tokenizer, VAE when there is one);
* :mod:`~fusedit.diffusers_native.convert`: runs and reference folders into that format (``fusedit export``).

Importing this package registers both classes in the ``diffusers`` namespace, which is where
``DiffusionPipeline.from_pretrained`` looks a folder's ``_class_name`` up, and makes their modules known to its
component loader; no remote code (``trust_remote_code``) is involved::

    import fusedit.diffusers_native  # noqa: F401  (registers FuseDiTPipeline with diffusers)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained("my-pipeline")
"""

from __future__ import annotations

import diffusers

from fusedit.diffusers_native.pipeline import FuseDiTPipeline, FuseDiTPipelineOutput
from fusedit.diffusers_native.transformer import FuseDiTTransformer2DModel

__all__ = ["FuseDiTPipeline", "FuseDiTPipelineOutput", "FuseDiTTransformer2DModel", "register"]


def register() -> None:
    """Make ``diffusers.FuseDiTPipeline`` and ``diffusers.FuseDiTTransformer2DModel`` name fusedit's classes (done at
    import; idempotent)."""
    for cls in (FuseDiTPipeline, FuseDiTTransformer2DModel):
        setattr(diffusers, cls.__name__, cls)


register()
