"""What an active-learning experiment reports: learning curves (test accuracy against the
number of labels) per strategy over seeds, their normalised area (AULC), the labels needed to
reach a target accuracy, the time spent scoring and selecting per round, a table and a plot."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from labelkit_ext.engine import format_table, mean_std, plus_minus
from labelkit_ext.engine.report import new_figure, save_figure

__all__ = [
    "area_under_curve",
    "labels_to_reach",
    "plot_learning_curves",
    "summarize_strategy",
    "summary_table",
]


def area_under_curve(labels: Sequence[float], accuracy: Sequence[float]) -> float | None:
    """Trapezoidal area under accuracy(labels), divided by the label range: the mean accuracy
    over the budget, in [0, 1]; None for fewer than two points."""
    x, y = np.asarray(labels, dtype=np.float64), np.asarray(accuracy, dtype=np.float64)
    if len(x) < 2 or x[-1] <= x[0]:
        return None
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)) / (x[-1] - x[0]))


def labels_to_reach(labels: Sequence[int], accuracy: Sequence[float], target: float) -> int | None:
    """The fewest labels at which ``accuracy`` first reaches ``target``; None if it never does."""
    for n, acc in zip(labels, accuracy, strict=True):
        if acc >= target:
            return int(n)
    return None


def summarize_strategy(
    records_by_seed: Mapping[int, Sequence[Mapping[str, Any]]], target: float | None
) -> dict[str, Any]:
    """Aggregate the per-round records of one strategy's runs (seed -> records).

    Curves are averaged over the seeds at each round (every seed labels the same number per
    round); AULC and labels-to-target are computed per seed, then averaged. Stds are sample
    stds over the seeds (``mean_std``): None for one seed.
    """
    seeds = sorted(records_by_seed)
    rounds = min(len(records_by_seed[s]) for s in seeds)
    labels = [int(records_by_seed[seeds[0]][r]["labels"]) for r in range(rounds)]
    acc = np.array([[records_by_seed[s][r]["accuracy"] for r in range(rounds)] for s in seeds])
    aulc = [area_under_curve(labels, row) for row in acc]
    reach = [labels_to_reach(labels, row, target) for row in acc] if target is not None else []
    timing = {
        key: [r[key] for s in seeds for r in records_by_seed[s][:rounds] if r.get(key) is not None]
        for key in ("scoring_seconds", "selection_seconds", "train_seconds")
    }
    aulc_mean, aulc_std = mean_std(aulc)
    final_mean, final_std = mean_std(acc[:, -1].tolist())
    reached = [r for r in reach if r is not None]
    return {
        "seeds": seeds,
        "labels": labels,
        "accuracy_mean": acc.mean(axis=0).tolist(),
        "accuracy_std": acc.std(axis=0, ddof=1).tolist() if len(seeds) > 1 else None,
        "accuracy_per_seed": acc.tolist(),
        "final_accuracy_mean": final_mean,
        "final_accuracy_std": final_std,
        "aulc_per_seed": aulc,
        "aulc_mean": aulc_mean,
        "aulc_std": aulc_std,
        "target_accuracy": target,
        "labels_to_target_per_seed": reach,
        "labels_to_target_mean": float(np.mean(reached)) if reached else None,
        "seeds_reaching_target": len(reached),
        **{f"mean_{k}": (float(np.mean(v)) if v else None) for k, v in timing.items()},
    }


def summary_table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per strategy: final accuracy and AULC (mean ± std over seeds), labels to the
    target (mean over the seeds reaching it, and how many did), seconds per round."""
    rows = []
    for name, s in summaries.items():
        reach = s["labels_to_target_mean"]
        reach_text = (
            "-"
            if reach is None
            else f"{reach:.0f} ({s['seeds_reaching_target']}/{len(s['seeds'])})"
        )
        rows.append(
            [
                name,
                s["labels"][-1],
                plus_minus(s["final_accuracy_mean"], s["final_accuracy_std"], digits=4),
                plus_minus(s["aulc_mean"], s["aulc_std"], digits=4),
                reach_text,
                s["mean_scoring_seconds"],
                s["mean_selection_seconds"],
                s["mean_train_seconds"],
            ]
        )
    target = next(iter(summaries.values()))["target_accuracy"] if summaries else None
    headers = ["strategy", "labels", "final acc", "AULC",
               f"labels to {target:.0%}" if target is not None else "labels to target",
               "score s/round", "select s/round", "train s/round"]  # fmt: skip
    return format_table(rows, headers)


def plot_learning_curves(
    summaries: Mapping[str, Mapping[str, Any]],
    path: str | os.PathLike,
    title: str = "",
    target: float | None = None,
) -> Path:
    """Test accuracy against labels per strategy: the mean over seeds with a ±1 std band (none
    for one seed)."""
    fig = new_figure(7.5, 5)
    ax = fig.subplots()
    for name, s in summaries.items():
        x = np.asarray(s["labels"])
        mean = np.asarray(s["accuracy_mean"])
        (line,) = ax.plot(x, mean, marker="o", ms=3, label=f"{name} (AULC {s['aulc_mean']:.3f})"
                          if s["aulc_mean"] is not None else name)  # fmt: skip
        if s["accuracy_std"] is not None:
            std = np.asarray(s["accuracy_std"])
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    if target is not None:
        ax.axhline(target, color="gray", ls="--", lw=1, label=f"target {target:.0%}")
    seeds = max((len(s["seeds"]) for s in summaries.values()), default=0)
    ax.set(
        xlabel="labels",
        ylabel="test accuracy",
        title=title or f"learning curves (mean ± std over {seeds} seeds)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return save_figure(fig, path)
