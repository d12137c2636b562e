"""Training checkpoints and trained weights: one interface (:class:`~fusedit.checkpoint.checkpointer.Checkpointer`,
``save(step, state)`` / ``load(path) -> state``) over two on-disk formats, a single-process one
(:mod:`~fusedit.checkpoint.single`) and a sharded one for distributed runs (:mod:`~fusedit.checkpoint.sharded`); a
checkpoint of either format resumes under either. :mod:`~fusedit.checkpoint.weights` reads the trained weights of
any run (for sampling and export) and copies weights into parameters.
"""
