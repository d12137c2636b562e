"""Statistics of shapes-benchmark scores: per-category accuracies, GenEval's overall, bootstrap confidence intervals.

Overall is GenEval's: the mean of the per-category accuracies (every category weighs the same, whatever its number
of images). Confidence intervals are percentile bootstrap intervals: images are resampled with replacement within
each category (a stratified bootstrap), ``resamples`` times with a fixed seed, and the 2.5 % / 97.5 % quantiles of
the resampled statistic are reported. Images of one prompt are not independent, so where a category has few prompts
the interval says how precisely *these* prompts were measured, not how a model does on other prompts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fusedit.data.shapes import CATEGORIES

#: A category with fewer images than this is refused (unless allowed explicitly): its accuracy is too uncertain.
MIN_IMAGES_PER_CATEGORY = 50


def per_category(correct: Sequence[bool], categories: Sequence[str]) -> dict[str, np.ndarray]:
    """``{category: bool array of its images' correctness}`` in :data:`CATEGORIES` order (present ones only)."""
    if len(correct) != len(categories):
        raise ValueError(f"got {len(correct)} results but {len(categories)} categories")
    flags = np.asarray(correct, dtype=bool)
    names = np.asarray(categories)
    return {c: flags[names == c] for c in CATEGORIES if (names == c).any()}


def bootstrap_ci(
    groups: Mapping[str, np.ndarray], resamples: int = 2000, seed: int = 0
) -> tuple[dict[str, tuple[float, float]], tuple[float, float]]:
    """95 % percentile-bootstrap intervals of each category's accuracy and of the overall (mean over categories).

    Args:
        groups: ``{category: bool array}`` from :func:`per_category`.

    Returns:
        ``({category: (lo, hi)}, (lo, hi) of the overall)``.
    """
    rng = np.random.default_rng(seed)
    means = {}
    for name, flags in groups.items():
        picks = rng.integers(0, len(flags), size=(resamples, len(flags)))
        means[name] = flags[picks].mean(axis=1)
    overall = np.mean(np.stack(list(means.values())), axis=0)
    interval = lambda v: (float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975)))  # noqa: E731
    return {name: interval(v) for name, v in means.items()}, interval(overall)


def summarize(correct: Sequence[bool], categories: Sequence[str], resamples: int = 2000, seed: int = 0) -> dict:
    """``{"overall", "ci95", "categories": {name: {"accuracy", "n", "correct", "ci95"}}}`` of per-image results."""
    groups = per_category(correct, categories)
    if not groups:
        raise ValueError("no images to summarise")
    cis, overall_ci = bootstrap_ci(groups, resamples, seed)
    table = {
        name: {
            "accuracy": float(flags.mean()),
            "n": int(len(flags)),
            "correct": int(flags.sum()),
            "ci95": list(cis[name]),
        }
        for name, flags in groups.items()
    }
    return {
        "overall": float(np.mean([v["accuracy"] for v in table.values()])),
        "ci95": list(overall_ci),
        "categories": table,
    }


def check_category_sizes(counts: Mapping[str, int], allow_small: bool, minimum: int = MIN_IMAGES_PER_CATEGORY) -> None:
    """Refuse categories with fewer than ``minimum`` images unless ``allow_small``.

    Raises:
        ValueError: naming the small categories and the two ways out.
    """
    small = {c: n for c, n in counts.items() if n < minimum}
    if small and not allow_small:
        listed = ", ".join(f"{c} ({n})" for c, n in small.items())
        raise ValueError(
            f"too few images for a trustworthy accuracy in {listed}: every category needs at least "
            f"{minimum} images; sample more (e.g. --min-per-category {minimum}) or pass --allow-small "
            "to score them anyway (their confidence intervals will be wide)"
        )
