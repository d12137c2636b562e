"""A run directory owned by one training process group at a time, whose config is written once.

* :mod:`~fusedit.rundir.lock`: the advisory lock (``run_dir/.fusedit.lock``, owner pid and host; a stale lock of a
  dead process is taken over with a message).
* :mod:`~fusedit.rundir.config_guard`: ``config.yaml`` written once; what a resume may change (and with which flag),
  and the record of changes (``config_changes.jsonl``).
* :mod:`~fusedit.rundir.opening`: opening a run for training: ``--no-resume`` moves the old run aside, stale
  temporaries of killed writers are removed.
"""
