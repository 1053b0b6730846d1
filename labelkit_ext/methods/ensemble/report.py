"""What an ensemble run reports: the per-cluster table (baseline vs sub-classifier within each
cluster, as the paper's Tables 3-5), text tables, and the plots."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from labelkit_ext.engine import format_table, topk_accuracy
from labelkit_ext.engine.report import new_figure, save_figure
from labelkit_ext.methods.ensemble.clustering import cluster_members
from labelkit_ext.methods.ensemble.routing import GridPoint, mask_to_clusters

__all__ = [
    "paired_comparison",
    "per_cluster_rows",
    "per_cluster_table",
    "overall_table",
    "grid_table",
    "plot_similarity",
    "plot_accuracy_vs_threshold",
    "plot_grid",
]


def _topk(scores: torch.Tensor, targets: torch.Tensor, k: int, classes: int) -> float | None:
    """Top-k accuracy, or None where it says nothing (k >= the classes competing)."""
    if k >= classes or len(targets) == 0:
        return None
    return topk_accuracy(scores.double().numpy(), targets.numpy(), k)


def per_cluster_rows(
    base_logits: torch.Tensor,
    sub_logits: torch.Tensor,
    clusters: torch.Tensor,
    targets: torch.Tensor,
    class_names: Sequence[str],
    fine_tuned: Sequence[bool],
) -> list[dict[str, Any]]:
    """For each cluster, on the samples whose true class is in it: top-1 / top-3 accuracy of
    the baseline over all C classes (what it answers), of the baseline restricted to the
    cluster's classes (an oracle router with no fine-tuning), and of the cluster's
    sub-classifier restricted to its classes. Top-k is None where k >= the classes competing."""
    num_classes = base_logits.shape[1]
    num_clusters = sub_logits.shape[0]
    base_masked = mask_to_clusters(base_logits.unsqueeze(0).expand_as(sub_logits), clusters)
    sub_masked = mask_to_clusters(sub_logits, clusters)
    rows = []
    for k, classes in enumerate(cluster_members(clusters, num_clusters)):
        mine = torch.isin(targets, torch.as_tensor(classes))
        y = targets[mine]
        size = len(classes)
        rows.append(
            {
                "cluster": k,
                "classes": classes,
                "class_names": [class_names[c] for c in classes],
                "n": int(mine.sum()),
                "fine_tuned": bool(fine_tuned[k]),
                "baseline_top1": _topk(base_logits[mine], y, 1, num_classes),
                "baseline_top3": _topk(base_logits[mine], y, 3, num_classes),
                "baseline_in_cluster_top1": _topk(base_masked[k][mine], y, 1, size),
                "baseline_in_cluster_top3": _topk(base_masked[k][mine], y, 3, size),
                "sub_top1": _topk(sub_masked[k][mine], y, 1, size),
                "sub_top3": _topk(sub_masked[k][mine], y, 3, size),
            }
        )
    return rows


def per_cluster_table(rows: Sequence[dict[str, Any]]) -> str:
    """The per-cluster rows as text; '-' where top-k is undefined (k >= the cluster's size)."""
    headers = ["cluster", "classes", "n", "base top1", "base top3", "base|k top1", "sub top1",
               "base|k top3", "sub top3"]  # fmt: skip
    body = [
        [
            r["cluster"],
            ", ".join(r["class_names"]),
            r["n"],
            r["baseline_top1"],
            r["baseline_top3"],
            r["baseline_in_cluster_top1"],
            r["sub_top1"],
            r["baseline_in_cluster_top3"],
            r["sub_top3"],
        ]
        for r in rows
    ]
    return format_table(body, headers)


def paired_comparison(
    baseline_prediction: torch.Tensor, prediction: torch.Tensor, targets: torch.Tensor
) -> dict[str, float | int]:
    """Samples an ensemble ``fixed`` (baseline wrong, ensemble right) and ``broke`` (the
    reverse), and the exact two-sided McNemar p-value of that split (binomial, p = 1/2): how
    surprising the accuracy difference is on these samples if both were equally good."""
    base_right = baseline_prediction.cpu() == targets.cpu()
    right = prediction.cpu() == targets.cpu()
    fixed, broke = int((right & ~base_right).sum()), int((~right & base_right).sum())
    n = fixed + broke  # no discordant pair: nothing to test, p = 1
    # Imported here, not at the top: `labelkit run --help` would wait for it.
    from scipy.stats import binomtest

    p_value = binomtest(fixed, n, 0.5).pvalue if n else 1.0
    return {"fixed": fixed, "broke": broke, "mcnemar_p": float(p_value)}


def overall_table(metrics: dict[str, dict[str, Any]], selected: dict[str, dict]) -> str:
    """Baseline / hard / soft: the (S, e) chosen on val, val and test accuracy, routed share,
    and the test samples each ensemble fixed / broke against the baseline (McNemar p)."""
    body = [["baseline", None, None, metrics["val"]["baseline"], metrics["test"]["baseline"],
             0.0, 0.0, None, None]]  # fmt: skip
    for mode in ("hard", "soft"):
        pick = selected[mode]
        paired = metrics["test"][f"{mode}_vs_baseline"]
        body.append(
            [
                f"{mode} ensemble",
                pick["num_clusters"],
                pick["threshold"],
                metrics["val"][mode],
                metrics["test"][mode],
                metrics["val"][f"{mode}_routed"],
                metrics["test"][f"{mode}_routed"],
                f"{paired['fixed']} / {paired['broke']}",
                paired["mcnemar_p"],
            ]
        )
    headers = ["model", "S", "e", "val acc", "test acc", "val routed", "test routed",
               "test fixed / broke", "McNemar p"]  # fmt: skip
    return format_table(body, headers)


def grid_table(grid: Sequence[GridPoint]) -> str:
    """Validation grid as a pivot: one row per (S, hard|soft) plus the routed share, one
    column per threshold."""
    thresholds = sorted({p.threshold for p in grid})
    sizes = sorted({p.num_clusters for p in grid})
    at = {(p.num_clusters, p.threshold): p for p in grid}
    body = [["routed share", *(at[(sizes[0], e)].routed_share for e in thresholds)]]
    for s in sizes:
        for mode in ("hard", "soft"):
            body.append(
                [f"S={s} {mode}", *(getattr(at[(s, e)], f"{mode}_accuracy") for e in thresholds)]
            )
    return format_table(body, ["val accuracy", *(f"e={e}" for e in distinct_labels(thresholds))])


def distinct_labels(values: Sequence[float], digits: int = 3) -> list[str]:
    """``values`` with ``digits`` significant digits, or as many more as keep them apart (two
    entropy quantiles can agree to three digits)."""
    for d in range(digits, 18):
        labels = [f"{v:.{d}g}" for v in values]
        if len(set(labels)) == len(set(values)):
            return labels
    return [repr(v) for v in values]


def plot_similarity(
    similarity: torch.Tensor,
    clusters: torch.Tensor,
    class_names: Sequence[str],
    path: str | os.PathLike,
    title: str = "",
) -> Path:
    """Cosine similarity of the label embeddings, classes ordered by cluster, cluster
    boundaries drawn; values written in the cells up to 20 classes."""
    members = cluster_members(clusters)
    order = [c for m in members for c in m]
    sim = similarity.double().numpy()[np.ix_(order, order)]
    n = len(order)
    side = min(3.0 + 0.45 * n, 18.0)
    fig = new_figure(side + 1.2, side)
    ax = fig.subplots()
    image = ax.imshow(sim, cmap="coolwarm", vmin=-1, vmax=1)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=7)
    edge = -0.5
    for m in members[:-1]:
        edge += len(m)
        ax.axhline(edge, color="black", lw=1.5)
        ax.axvline(edge, color="black", lw=1.5)
    names = [class_names[c] for c in order]
    fontsize = 8 if n <= 40 else 5
    ax.set_xticks(range(n), names, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(n), names, fontsize=fontsize)
    ax.set_title(title or "label-embedding cosine similarity")
    fig.colorbar(image, ax=ax, fraction=0.046, label="cosine similarity")
    return save_figure(fig, path)


def plot_accuracy_vs_threshold(
    grids: dict[str, Sequence[GridPoint]],
    num_clusters: int,
    baseline: dict[str, float],
    path: str | os.PathLike,
    title: str = "",
) -> Path:
    """Baseline / hard / soft accuracy against the threshold e for one S, one panel per split
    in ``grids`` (split -> grid), with the routed share on a second axis."""
    fig = new_figure(5.5 * len(grids), 4.2)
    axes = np.atleast_1d(fig.subplots(1, len(grids)))
    for ax, (split, grid) in zip(axes, grids.items(), strict=True):
        points = sorted(
            (p for p in grid if p.num_clusters == num_clusters), key=lambda p: p.threshold
        )
        e = [p.threshold for p in points]
        ax.axhline(baseline[split], color="gray", ls="--", label="baseline")
        ax.plot(e, [p.hard_accuracy for p in points], marker="o", label="hard routing")
        ax.plot(e, [p.soft_accuracy for p in points], marker="s", label="soft routing")
        share = ax.twinx()
        share.plot(e, [p.routed_share for p in points], color="black", ls=":", lw=1)
        share.set(ylim=(0, 1.02), ylabel="routed share (dotted)")
        ax.set(
            xlabel="entropy threshold e (nats)",
            ylabel="accuracy",
            title=f"{split}, S={num_clusters}",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_grid(grid: Sequence[GridPoint], path: str | os.PathLike, title: str = "") -> Path:
    """Heatmaps of the validation accuracy over S (rows) and e (columns), hard and soft."""
    thresholds = sorted({p.threshold for p in grid})
    sizes = sorted({p.num_clusters for p in grid})
    at = {(p.num_clusters, p.threshold): p for p in grid}
    fig = new_figure(2.5 + 0.75 * len(thresholds), 1.6 + 1.4 * len(sizes))
    axes = fig.subplots(2, 1)
    values = {
        mode: np.array(
            [[getattr(at[(s, e)], f"{mode}_accuracy") for e in thresholds] for s in sizes]
        )
        for mode in ("hard", "soft")
    }
    low = min(v.min() for v in values.values())
    high = max(v.max() for v in values.values())
    for ax, (mode, v) in zip(axes, values.items(), strict=True):
        image = ax.imshow(v, cmap="viridis", vmin=low, vmax=high, aspect="auto")
        bright = (v - low) > 0.6 * (high - low)  # dark text on viridis' light end
        for i in range(len(sizes)):
            for j in range(len(thresholds)):
                color = "black" if bright[i, j] else "white"
                ax.text(j, i, f"{v[i, j]:.3f}", ha="center", va="center", fontsize=7, color=color)
        ax.set_xticks(range(len(thresholds)), [f"{e:.3g}" for e in thresholds], fontsize=8)
        ax.set_yticks(range(len(sizes)), [f"S={s}" for s in sizes])
        ax.set(xlabel="entropy threshold e (nats)", title=f"{mode} routing: val accuracy")
        fig.colorbar(image, ax=ax, fraction=0.03)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
