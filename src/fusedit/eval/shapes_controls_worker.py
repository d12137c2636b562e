"""Score the shapes suite's controls in a second process while the model samples.

The controls (:func:`fusedit.eval.shapes_report.run_controls`) do not depend on the model: they render and score
about fourteen images per sampled image with NumPy and PIL on one core. On a two-core machine whose second core is
idle during sampling (the demo after training: one torch thread, no data worker left), running them beside the
sampler instead of after it takes their time (about half of a full-suite evaluation) off the wall clock. The table is
the same as the one computed in the calling process: every control image is a function of the world, the prompt, the
seed and its index alone.

Usage::

    pending = ControlsInBackground.start(world, specs, seed)   # before sampling (or earlier: the demo starts them
    ...                                                           # while its tiny LLM trains)
    table = pending.result()                                      # the run_controls table; re-raises a failure

:func:`fusedit.eval.shapes_eval.evaluate_shapes` starts its own when ``controls_in_background`` is set, or takes one
started earlier for its own prompts and seed (``pending_controls``).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass

from fusedit.data.shapes import PromptSpec, ShapesWorld
from fusedit.eval.shapes_report import run_controls


def _controls_table(world: ShapesWorld, specs: list[PromptSpec], seed: int) -> dict[str, dict]:
    """The worker's job (a module-level function, so that a spawned process can import it)."""
    return run_controls(world, specs, seed=seed)


@dataclass
class ControlsInBackground:
    """The controls of one evaluation, being scored in a spawned process (see the module docstring)."""

    executor: ProcessPoolExecutor
    future: Future
    specs: tuple[PromptSpec, ...]
    seed: int

    @classmethod
    def start(cls, world: ShapesWorld, specs: Sequence[PromptSpec], seed: int) -> ControlsInBackground:
        """Start scoring every control on ``specs`` (one image per entry) with ``seed`` in a fresh process.

        ``spawn``, not ``fork``: the caller holds PyTorch's thread pools, which a forked child must not inherit.
        """
        executor = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        return cls(executor, executor.submit(_controls_table, world, list(specs), seed), tuple(specs), seed)

    def check_scores(self, specs: Sequence[PromptSpec], seed: int) -> None:
        """Raise ``ValueError`` unless these controls were started for ``specs`` (in order) and ``seed``: a table of
        other prompts would be reported next to the model's scores as if it were theirs."""
        if self.seed != seed or self.specs != tuple(specs):
            raise ValueError(
                f"the controls scored in the background were started for {len(self.specs)} prompts with seed "
                f"{self.seed}, but the evaluation scores {len(specs)} prompts with seed {seed}: start them with the "
                "evaluation's SamplingPlan.for_world(world, settings).expanded and settings.seed"
            )

    def result(self) -> dict[str, dict]:
        """The :func:`~fusedit.eval.shapes_report.run_controls` table (waits for it; a failure in the worker is
        raised here); the worker process is shut down either way."""
        try:
            return self.future.result()
        finally:
            self.executor.shutdown(wait=True)

    def cancel(self) -> None:
        """Stop waiting for the table (the caller failed before it needed it) and shut the worker down."""
        self.future.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)


def controls_for_evaluation(
    world: ShapesWorld,
    specs: Sequence[PromptSpec],
    seed: int,
    controls: bool,
    in_background: bool,
    given: ControlsInBackground | None,
) -> ControlsInBackground | None:
    """The controls being scored in the background for an evaluation of ``specs`` with ``seed``: ``given`` (checked
    against them; cancelled and refused with ``ValueError`` when they do not match, or when the evaluation has
    ``controls`` off), or started now when ``in_background``; None: scored inline (or not at all)."""
    if given is not None:
        try:
            if not controls:
                raise ValueError("controls were started in the background, but the evaluation has controls off")
            given.check_scores(specs, seed)
        except ValueError:
            given.cancel()
            raise
        return given
    if controls and in_background:
        return ControlsInBackground.start(world, specs, seed)
    return None
