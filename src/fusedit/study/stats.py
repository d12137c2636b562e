"""Confidence intervals of a study's scores over training seeds *and* evaluation images.

A variant's shapes score is a mean over its training seeds of the per-run ``overall`` (the mean of the six category
accuracies). Two things make it uncertain: which seeds were drawn (training noise) and which images each run was
scored on (evaluation noise). The hierarchical bootstrap below resamples both, in that order:

1. draw ``S`` runs with replacement from the variant's ``S`` seeds;
2. for every drawn run, resample its images *within each category* with replacement and recompute each category's
   accuracy, then the run's overall (mean over categories);
3. average the drawn runs' overalls.

The 2.5 and 97.5 percentiles of many such draws are the 95 % CI of the variant's mean. The CI of a difference
between two variants resamples each variant independently and subtracts.

How far to trust them, measured by simulation (3 seeds, 6 categories of 127 images, true rate 0.3, 300 repeated
experiments; ``tests/study/test_stats.py`` checks the first case):

* seeds that differ only through their images: the bootstrap covers the true mean 99 % of the time (conservative: the
  seed level re-counts image noise that the image level already counts);
* seed effects of std 0.05 / 0.1 on top: 85 % / 79 % (three seeds give the seed level only 10 distinct multisets);
* resampling the seeds' scores alone: 73–79 %, too narrow in every case;
* Student's t over the seeds' scores (:func:`seed_t_interval`, ``mean ± t(0.975, S−1) · std / √S``) is exact when
  the per-seed scores are normal (measured: 94–95 % in all three cases), and wide with three seeds (t = 4.30).

So the report shows the bootstrap next to the t interval and mean ± std, not instead of them.

Inputs: for every run, ``{category: bool array of per-image correctness}`` (``scores.json``'s ``per_prompt``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats as scipy_stats

#: Bootstrap draws (enough for stable 2.5/97.5 percentiles at the third decimal).
DRAWS = 4000

RunCorrectness = Mapping[str, Sequence[bool]]


def correctness_by_category(per_prompt: Sequence[Mapping]) -> dict[str, np.ndarray]:
    """``scores.json``'s ``per_prompt`` list (``{"category", "correct": [bool]}``) → ``{category: bool array}``."""
    grouped: dict[str, list[bool]] = {}
    for entry in per_prompt:
        grouped.setdefault(entry["category"], []).extend(bool(c) for c in entry["correct"])
    return {category: np.asarray(values, dtype=bool) for category, values in grouped.items()}


def _check_runs(runs: Sequence[RunCorrectness]) -> list[str]:
    if not runs:
        raise ValueError("bootstrap: no runs")
    categories = sorted(runs[0])
    for run in runs:
        if sorted(run) != categories:
            raise ValueError(f"bootstrap: runs scored on different categories ({sorted(run)} vs {categories})")
        if any(len(run[c]) == 0 for c in categories):
            raise ValueError("bootstrap: a category has no images")
    return categories


def overall_draws(runs: Sequence[RunCorrectness], draws: int = DRAWS, seed: int = 0) -> np.ndarray:
    """``(draws,)`` bootstrap replicates of the mean over runs of the per-run overall (see the module docstring)."""
    categories = _check_runs(runs)
    rng = np.random.default_rng(seed)
    num_runs = len(runs)
    # Per run and category: the accuracy of `draws` image resamples (binomial draws of the observed rate are the
    # same distribution as resampling the images one by one, and far cheaper).
    accuracy = np.empty((num_runs, len(categories), draws))
    for r, run in enumerate(runs):
        for c, category in enumerate(categories):
            values = np.asarray(run[category], dtype=bool)
            accuracy[r, c] = rng.binomial(len(values), values.mean(), size=draws) / len(values)
    per_run_overall = accuracy.mean(axis=1)  # (runs, draws)
    picks = rng.integers(0, num_runs, size=(draws, num_runs))  # which runs each draw takes
    return per_run_overall[picks, np.arange(draws)[:, None]].mean(axis=1)


def percentile_ci(samples: np.ndarray) -> tuple[float, float]:
    """The 2.5 and 97.5 percentiles."""
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return float(lo), float(hi)


def overall_ci(runs: Sequence[RunCorrectness], draws: int = DRAWS, seed: int = 0) -> tuple[float, float]:
    """95 % CI of a variant's mean overall over its seeds and images."""
    return percentile_ci(overall_draws(runs, draws, seed))


def difference_ci(
    first: Sequence[RunCorrectness], second: Sequence[RunCorrectness], draws: int = DRAWS, seed: int = 0
) -> tuple[float, float, float]:
    """95 % CI of ``mean overall(first) − mean overall(second)``, and the fraction of draws at or below zero (a
    one-sided bootstrap p-value of "first is better")."""
    difference = overall_draws(first, draws, seed) - overall_draws(second, draws, seed + 1)
    lo, hi = percentile_ci(difference)
    return lo, hi, float((difference <= 0).mean())


def seed_t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Student's t interval of the mean of ``values`` (``nan`` bounds for fewer than two values)."""
    array = np.asarray(values, dtype=float)
    if array.size < 2:
        return float("nan"), float("nan")
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, array.size - 1) * array.std(ddof=1) / np.sqrt(array.size))
    return float(array.mean() - half), float(array.mean() + half)


def seed_mean_ci(values: Sequence[float], draws: int = DRAWS, seed: int = 0) -> tuple[float, float]:
    """95 % CI of a mean over seeds by resampling the seeds alone (for metrics without per-image outcomes)."""
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        raise ValueError("bootstrap: no values")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, array.size, size=(draws, array.size))
    return percentile_ci(array[picks].mean(axis=1))
