"""What a curriculum run reports: the original's Table 1 (mean AUC and improvement per
schedule, here mean ± std over seeds with a paired test), per-finding AUC, and the plots."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from labelkit_ext.engine import format_table, mean_std, plus_minus
from labelkit_ext.engine.report import new_figure, save_figure

__all__ = [
    "paired_test",
    "summarise_runs",
    "schedule_table",
    "per_finding_table",
    "plot_auc_curves",
    "plot_per_finding_delta",
]


def paired_test(scores: Sequence[float], reference: Sequence[float]) -> dict[str, Any]:
    """Paired t-test (``scipy.stats.ttest_rel``, two-sided) of ``scores`` against
    ``reference``, paired by position (here: by seed, i.e. the same initial backbone and
    data). ``t`` and ``p`` are None when undefined (fewer than 2 pairs, or differences equal
    to within 1e-12)."""
    a, b = np.asarray(scores, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"scores and reference must be equally long 1-D sequences, got {a.shape}, {b.shape}"
        )
    diffs = a - b
    result: dict[str, Any] = {
        "n": len(diffs),
        "differences": diffs.tolist(),
        "mean_difference": float(diffs.mean()) if len(diffs) else None,
        "t": None,
        "p": None,
    }
    if len(diffs) >= 2 and np.ptp(diffs) > 1e-12:  # equal up to rounding: no variance to test
        # Imported here, not at the top: `labelkit run --help` would wait for it.
        from scipy.stats import ttest_rel

        test = ttest_rel(a, b)
        result["t"], result["p"] = float(test.statistic), float(test.pvalue)
    return result


def summarise_runs(
    runs: Sequence[dict], schedules: Sequence[str], reference: str, names: Sequence[str]
) -> dict[str, dict]:
    """Per schedule over its seeds: val / test mean AUC (mean, sample std), improvement over
    ``reference`` in AUC points x100, the paired test on test AUC by seed, and the mean test
    AUC per finding. ``runs`` hold ``schedule``, ``seed``, ``val`` / ``test`` metrics."""
    by = {
        s: sorted((r for r in runs if r["schedule"] == s), key=lambda r: r["seed"])
        for s in schedules
    }
    ref_runs = by[reference]
    ref_test = [r["test"]["auc"] for r in ref_runs]
    summary = {}
    for schedule, rs in by.items():
        if [r["seed"] for r in rs] != [r["seed"] for r in ref_runs]:
            raise ValueError(f"schedule {schedule} was run with other seeds than {reference}")
        test = [r["test"]["auc"] for r in rs]
        val = [r["val"]["auc"] for r in rs]
        per_finding = {}
        for name in names:
            values = [r["test"]["per_class_auc"][name] for r in rs]
            per_finding[name] = None if any(v is None for v in values) else float(np.mean(values))
        test_mean, test_std = mean_std(test)
        val_mean, val_std = mean_std(val)
        summary[schedule] = {
            "seeds": [r["seed"] for r in rs],
            "test_auc": test,
            "test_auc_mean": test_mean,
            "test_auc_std": test_std,
            "val_auc_mean": val_mean,
            "val_auc_std": val_std,
            "improvement_points": 100.0 * (test_mean - float(np.mean(ref_test))),
            "paired_vs_reference": None if schedule == reference else paired_test(test, ref_test),
            "per_finding_test_auc": per_finding,
        }
    return summary


def schedule_table(summary: dict[str, dict], schedules: dict[str, dict], reference: str) -> str:
    """The original's Table 1: per schedule its stages, steps per stage, val and test mean AUC
    (x100, mean ± std over seeds), the improvement over ``reference`` and the paired p."""
    rows = []
    for name, s in summary.items():
        paired = s["paired_vs_reference"]
        rows.append(
            [
                name,
                " > ".join(schedules[name]["stages"]),
                "/".join(str(n) for n in schedules[name]["steps"]),
                plus_minus(s["val_auc_mean"], s["val_auc_std"], 100.0),
                plus_minus(s["test_auc_mean"], s["test_auc_std"], 100.0),
                "-" if name == reference else f"{s['improvement_points']:+.2f}",
                "-" if paired is None or paired["p"] is None else f"{paired['p']:.3f}",
            ]
        )
    headers = ["schedule", "stages", "steps", "val mean AUC", "test mean AUC",
               f"vs {reference}", "paired p"]  # fmt: skip
    return format_table(rows, headers)


def per_finding_table(
    summary: dict[str, dict], names: Sequence[str], positives: Sequence[int]
) -> str:
    """Test AUC (x100, mean over seeds) per finding and schedule, with the test positives."""
    rows = [
        [name, int(n), *(_points(s["per_finding_test_auc"][name]) for s in summary.values())]
        for name, n in zip(names, positives, strict=True)
    ]
    rows.append(["mean", None, *(_points(s["test_auc_mean"]) for s in summary.values())])
    return format_table(rows, ["finding", "test positives", *summary])


def _points(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:.2f}"


def _curve(runs: Sequence[dict], schedule: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps, mean and std over seeds of the val target mean AUC (x100) of ``schedule``."""
    curves = [r["curve"] for r in runs if r["schedule"] == schedule]
    steps = np.array([p["step"] for p in curves[0]])
    values = np.array([[np.nan if p["val_target_auc"] is None else p["val_target_auc"] for p in c]
                       for c in curves], dtype=np.float64) * 100  # fmt: skip
    std = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(len(steps))
    return steps, values.mean(axis=0), std


def plot_auc_curves(
    runs: Sequence[dict],
    schedules: dict[str, dict],
    reference: str,
    path: str | os.PathLike,
    title: str = "",
) -> Path:
    """One panel per schedule: validation mean AUC of the target findings over optimisation
    steps (mean ± std over seeds), scored through each stage's own head; stage boundaries as
    vertical lines with the stage's task written above; the reference schedule dashed."""
    names = list(schedules)
    cols = min(len(names), 2)
    rows = -(-len(names) // cols)
    fig = new_figure(6.0 * cols, 3.8 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, sharey=True)).ravel()
    ref_steps, ref_mean, _ = _curve(runs, reference)
    for ax, name in zip(axes, names, strict=False):
        steps, mean, std = _curve(runs, name)
        if name != reference:
            ax.plot(ref_steps, ref_mean, ls="--", color="gray", lw=1.2, label=reference)
        ax.plot(steps, mean, marker="o", ms=3, color="C0", label=name)
        ax.fill_between(steps, mean - std, mean + std, color="C0", alpha=0.2)
        start = 0
        for j, (task, n) in enumerate(
            zip(schedules[name]["stages"], schedules[name]["steps"], strict=True)
        ):
            if j % 2:
                ax.axvspan(start, start + n, color="gray", alpha=0.08, lw=0)
            if start:
                ax.axvline(start, color="black", lw=1, ls=":")
            ax.text(start + n / 2, 0.98, task, transform=ax.get_xaxis_transform(),
                    ha="center", va="top", fontsize=8)  # fmt: skip
            start += n
        ax.set_xlim(0, start)
        ax.set(xlabel="optimisation step", ylabel="val mean AUC (x100)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_per_finding_delta(
    summary: dict[str, dict],
    names: Sequence[str],
    reference: str,
    path: str | os.PathLike,
    title: str = "",
) -> Path:
    """Test AUC difference to ``reference`` (points x100, mean over seeds) per finding, one bar
    per other schedule."""
    others = [s for s in summary if s != reference]
    fig = new_figure(max(6.0, 0.6 * len(names) * max(1, len(others)) / 1.5), 4.0)
    ax = fig.subplots()
    width = 0.8 / max(1, len(others))
    x = np.arange(len(names))
    ref = summary[reference]["per_finding_test_auc"]
    for j, schedule in enumerate(others):
        own = summary[schedule]["per_finding_test_auc"]
        delta = [
            np.nan if own[n] is None or ref[n] is None else 100 * (own[n] - ref[n]) for n in names
        ]
        ax.bar(x + (j - (len(others) - 1) / 2) * width, delta, width, label=schedule)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(
        x, names, rotation=45 if len(names) > 10 else 0, ha="right" if len(names) > 10 else "center"
    )
    ax.set(ylabel=f"test AUC - {reference} (points)", title=title or "per-finding AUC change")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return save_figure(fig, path)
