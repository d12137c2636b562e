"""Study plots (matplotlib, Agg backend): loss curves per run and scores per variant with error bars."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(results: Sequence[dict], variants: Sequence[str], path: Path, smooth: int = 5) -> Path:
    """Training loss against step for every run (one color per variant, one line per seed; moving average).

    ``results``: dicts with ``variant``, ``seed`` and ``loss_curve`` (``[[step, loss], ...]``).
    """
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, variant in enumerate(variants):
        color = colors[index % len(colors)]
        for n, result in enumerate(r for r in results if r["variant"] == variant):
            curve = result["loss_curve"]
            if not curve:
                continue
            steps = [s for s, _ in curve]
            losses = [loss for _, loss in curve]
            window = max(1, min(smooth, len(losses)))
            smoothed = [
                sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
                for i in range(len(losses))
            ]
            ax.plot(steps, smoothed, color=color, alpha=0.8, linewidth=1.2, label=variant if n == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (moving average of {smooth} logs)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("training loss (one line per seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


#: The accuracy metrics of the left panel of :func:`plot_scores`, in order.
ACCURACY_METRICS = (
    "overall",
    "acc_images",
    "acc/single_object",
    "acc/two_object",
    "acc/counting",
    "acc/colors",
    "acc/position",
    "acc/color_attr",
    "color_recall",
    "color_precision",
)


def _accuracy_panel(ax: Any, summary: dict[str, dict[str, dict]], accuracy: list[str]) -> None:
    variants = list(summary)
    width = 0.8 / max(1, len(variants))
    for v, variant in enumerate(variants):
        xs = [i + (v - (len(variants) - 1) / 2) * width for i in range(len(accuracy))]
        means = [summary[variant].get(m, {}).get("mean", float("nan")) for m in accuracy]
        stds = [summary[variant].get(m, {}).get("std", 0.0) for m in accuracy]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=variant, alpha=0.85)
        for x, m in zip(xs, accuracy, strict=True):
            values = summary[variant].get(m, {}).get("values", [])
            ax.scatter([x] * len(values), values, color="black", s=8, zorder=3)
    ax.set_xticks(range(len(accuracy)))
    ax.set_xticklabels(
        [m.replace("acc/", "").replace("acc_images", "all images") for m in accuracy], rotation=25, ha="right"
    )
    ax.set_ylabel("held-out prompts: accuracy / color recall, precision")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()


def _fd_panel(ax: Any, summary: dict[str, dict[str, dict]], colors: list[str]) -> None:
    variants = list(summary)
    for v, variant in enumerate(variants):
        stats = summary[variant].get("fd_pixels")
        if stats:
            ax.bar([v], [stats["mean"]], yerr=[stats["std"]], capsize=3, alpha=0.85, color=colors[v % 10])
            ax.scatter([v] * len(stats["values"]), stats["values"], color="black", s=8, zorder=3)
    ax.set_xticks(range(len(variants)))
    ax.set_xticklabels(variants, rotation=20)
    ax.set_ylabel("pixel FD (lower is better)")
    ax.grid(axis="y", alpha=0.3)


def plot_scores(summary: dict[str, dict[str, dict]], path: Path) -> Path:
    """Bar charts of every accuracy metric (left) and pixel FD (right): mean over seeds, error bars = std, dots =
    the individual seeds."""
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    accuracy = [m for m in ACCURACY_METRICS if any(m in s for s in summary.values())]
    has_fd = any("fd_pixels" in s for s in summary.values())
    fig, axes = plt.subplots(
        1,
        2 if has_fd else 1,
        figsize=(13 if has_fd else 10, 4.8),
        gridspec_kw={"width_ratios": [4, 1]} if has_fd else None,
        squeeze=False,
    )
    _accuracy_panel(axes[0][0], summary, accuracy)
    if has_fd:
        _fd_panel(axes[0][1], summary, plt.rcParams["axes.prop_cycle"].by_key()["color"])
    fig.suptitle("mean over seeds, error bars: std, dots: seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
