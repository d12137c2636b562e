"""``fusedit study GRID.yaml``: train and evaluate a grid of variants × seeds with one budget, then report.

A grid file (YAML)::

    name: deep-vs-shallow
    base: ../demo.yaml            # experiment config (relative to the grid file, or a shipped config name)
    tiny_llm: {}                  # optional: pretrain the shapes-world tiny LLM (TinyLLMConfig fields) and use it
    overrides: [data.shapes.size=20000]   # optional, applied to every run
    budget:                       # the same for every variant; variants may not override these keys
      train.max_steps: 500
      train.batch_size: 32
    seeds: [0, 1, 2]              # each becomes train.seed=<seed>
    variants:                     # name -> list of key=value overrides
      deep: [model.fusion=deep]
      shallow-self: [model.fusion=shallow, model.attention=self]
      llama: [tiny_llm.family=llama]   # tiny_llm.<field>=...: this variant's own tiny LLM (OUT/tiny-llm-<hash>)
    eval: {per_prompt: 2, seed: 1234, steps: 20, cfg: 4.0}   # the shapes suite (ShapesEvalSettings)

Every (variant, seed) trains with :func:`fusedit.train.launch.train_run` in ``OUT/runs/<variant>/seed-<seed>`` and is
evaluated with the shapes suite into ``.../eval-shapes/``. Resumable: a run with ``final/`` and ``scores.json`` is
reused; a run with ``final/`` only is evaluated; a partial run resumes from its latest checkpoint (``train_run``);
a run evaluated with other sampling settings than the grid's ``eval`` is evaluated again (not retrained).
A run whose saved ``config.yaml`` differs from what the grid asks for is an error (never silently reused).

The study pretrains one tiny LLM per distinct ``TinyLLMConfig`` (the grid's ``tiny_llm:`` plus a variant's
``tiny_llm.*`` overrides) and points each variant's ``text.llm`` at it; finished ones are reused on resume.

``OUT`` gets ``report.md`` (mean ± std over seeds per metric and variant, Welch t-tests against the first variant,
configs and commands to reproduce), ``results.json``, ``plots/loss.png``, ``plots/scores.png`` and
``grids/<variant>-<category>.png`` (the first seed's evaluation grids).

Modules: :mod:`~fusedit.study.grid` (grid files and the plan), :mod:`~fusedit.study.runner` (training, evaluating,
collecting), :mod:`~fusedit.study.workers` (``--jobs N``: N runs at a time in a pool of N worker processes),
:mod:`~fusedit.study.timing` (the wall time of every run and of every call),
:mod:`~fusedit.study.report` (statistics and ``report.md``). The package sits above
:mod:`fusedit.train` and :mod:`fusedit.eval`: it trains runs and evaluates them.
"""
