"""Sampling: the denoising loop (:mod:`~fusedit.sampling.denoise`), the text conditioning of each step
(:mod:`~fusedit.sampling.text`), the diffusers-style pipeline (:mod:`~fusedit.sampling.pipeline`), loading a
pipeline from a run, an export or a reference folder (:mod:`~fusedit.sampling.loading`) and exporting a run
(:mod:`~fusedit.sampling.export`)."""
