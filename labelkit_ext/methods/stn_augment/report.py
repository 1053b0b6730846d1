"""What an stn-augment run reports: the accuracy table over seeds (the original's Table 1) with
the collapse measurements, the stage-2 loss curves (Fig. 2), the warp distributions, and the
input-vs-warped image grid (Fig. 3)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from labelkit_ext.engine import format_table, mean_std, plus_minus
from labelkit_ext.engine.report import new_figure, save_figure

__all__ = [
    "COLLAPSE_DEVIATION",
    "STAGE1_ROW",
    "summary_rows",
    "summary_table",
    "plot_losses",
    "plot_warp_distributions",
    "plot_warp_grid",
    "plot_accuracy",
]

#: A learnt augmenter has collapsed when the median ||theta - I|| of its final warps is below
#: this: e.g. a 2-degree rotation (0.05) or a shift of 2.5 % of the width.
COLLAPSE_DEVIATION = 0.05
STAGE1_ROW = "stage 1 only"


def _accuracy_stats(metrics: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    row = {}
    for split in ("val", "test"):
        mean, std = mean_std([m[split]["accuracy"] for m in metrics])
        row[f"{split}_accuracy_mean"], row[f"{split}_accuracy_std"] = mean, std
    return row


def summary_rows(runs: Mapping[str, Mapping[str, Any]], variants: Sequence[str]) -> list[dict]:
    """One row for the stage-1 classifier and one per variant, over the seeds of ``runs``:
    val/test accuracy mean and std, the paired test gain over ``no-affine`` (same seed), and
    the final warps: median ||theta - I|| and entropies (seed means of the probe medians),
    and in how many seeds a learnt augmenter collapsed (median deviation < COLLAPSE_DEVIATION)."""
    seeds = list(runs)
    rows = [
        {
            "variant": STAGE1_ROW,
            "seeds": len(seeds),
            **_accuracy_stats([runs[s]["stage1"]["metrics"] for s in seeds]),
        }
    ]
    for name in variants:
        records = [runs[s]["variants"][name] for s in seeds]
        row: dict[str, Any] = {
            "variant": name,
            "seeds": len(seeds),
            **_accuracy_stats([r["metrics"] for r in records]),
        }
        if "no-affine" in variants:
            gains = [
                r["metrics"]["test"]["accuracy"]
                - runs[s]["variants"]["no-affine"]["metrics"]["test"]["accuracy"]
                for s, r in zip(seeds, records, strict=True)
            ]
            row["test_gain_mean"], row["test_gain_std"] = mean_std(gains)
        warps = [r["warp"] for r in records if r["warp"] is not None]
        if warps:
            for key in ("theta_deviation", "warped_entropy", "original_entropy"):
                row[f"{key}_median"] = float(np.mean([w[key]["q50"] for w in warps]))
        if records[0]["stage2"] is not None:
            row["collapsed_seeds"] = sum(
                w["theta_deviation"]["q50"] < COLLAPSE_DEVIATION for w in warps
            )
        rows.append(row)
    return rows


def summary_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as text: accuracies in %, the paired gain in points, warp medians."""
    body = [
        [
            r["variant"],
            plus_minus(r["val_accuracy_mean"], r["val_accuracy_std"], 100),
            plus_minus(r["test_accuracy_mean"], r["test_accuracy_std"], 100),
            plus_minus(r.get("test_gain_mean"), r.get("test_gain_std"), 100),
            r.get("theta_deviation_median"),
            r.get("warped_entropy_median"),
            r.get("original_entropy_median"),
            None if "collapsed_seeds" not in r else f"{r['collapsed_seeds']}/{r['seeds']}",
        ]
        for r in rows
    ]
    headers = ["variant", "val acc %", "test acc %", "vs no-affine (pts)", "|theta-I| med",
               "H warped (bits)", "H original", "collapsed"]  # fmt: skip
    return format_table(body, headers)


def _smooth(values: Sequence[float], window: int) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(v) < window:
        return v
    kernel = np.ones(window) / window
    return np.convolve(v, kernel, mode="valid")


def plot_losses(
    variants: Mapping[str, Mapping[str, Any]], path: str | os.PathLike, title: str = ""
) -> Path | None:
    """Stage-2 curves per learnt variant (moving averages over steps): discriminator loss,
    the generator's adversarial term log(1 - D(I')), the max-entropy loss L_ME, and the
    total generator loss. None when no variant trained an augmenter."""
    learnt = {n: r["stage2"]["steps"] for n, r in variants.items() if r["stage2"] is not None}
    if not learnt:
        return None
    fig = new_figure(4.2 * len(learnt), 3.8)
    axes = np.atleast_1d(fig.subplots(1, len(learnt), sharey=True))
    for ax, (name, steps) in zip(axes, learnt.items(), strict=True):
        window = max(1, len(steps) // 25)
        for color, (key, label) in enumerate(
            (
                ("d_loss", "discriminator"),
                ("g_adversarial", "generator log(1-D(I'))"),
                ("max_entropy", "L_ME"),
                ("g_loss", "generator total"),
            )
        ):
            values = [s[key] for s in steps if key in s]
            if values:
                x = np.arange(len(values))[len(values) - len(_smooth(values, window)) :] + 1
                ax.plot(x, _smooth(values, window), label=label, lw=1.2, color=f"C{color}")
        ax.set(title=name, xlabel="stage-2 step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel(f"loss (moving average over {max(1, len(steps) // 25)} steps)")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_warp_distributions(
    runs: Mapping[str, Mapping[str, Any]], path: str | os.PathLike, title: str = ""
) -> Path | None:
    """Over stage-2 epochs, per learnt variant: median (line) and interquartile range (band)
    of ||theta - I|| and of the classifier's entropy on the warped probe images, averaged over
    seeds; random-affine's values (dashed), the originals' entropy (dotted) and the collapse
    threshold for reference."""
    first = next(iter(runs.values()))["variants"]
    learnt = [n for n, r in first.items() if r["stage2"] is not None]
    if not learnt:
        return None
    fig = new_figure(11, 4.2)
    axes = fig.subplots(1, 2)
    colors = {n: f"C{i}" for i, n in enumerate(first)}
    for ax, key, label in (
        (axes[0], "theta_deviation", "||theta - I|| (Frobenius)"),
        (axes[1], "warped_entropy", "entropy on warped images (bits)"),
    ):
        for name in learnt:
            per_seed = [run["variants"][name]["stage2"]["epochs"] for run in runs.values()]
            epochs = [e["epoch"] for e in per_seed[0]]

            def band(q: str, per_seed=per_seed, key=key) -> np.ndarray:
                return np.mean([[e[key][q] for e in seed] for seed in per_seed], axis=0)

            ax.plot(epochs, band("q50"), marker="o", color=colors[name], label=name)
            ax.fill_between(epochs, band("q25"), band("q75"), color=colors[name], alpha=0.2)
        random = [run["variants"].get("random-affine") for run in runs.values()]
        if random[0] is not None:
            level = np.mean([r["warp"][key]["q50"] for r in random])
            ax.axhline(level, color=colors["random-affine"], ls="--", label="random-affine")
        if key == "theta_deviation":
            ax.axhline(COLLAPSE_DEVIATION, color="gray", ls=":", lw=1, label="collapse threshold")
        else:
            original = np.mean(
                [
                    run["variants"][learnt[0]]["stage2"]["epochs"][0]["original_entropy"]["q50"]
                    for run in runs.values()
                ]  # fmt: skip
            )
            ax.axhline(original, color="black", ls=":", lw=1, label="original images")
        ax.set(xlabel="stage-2 epoch (0 = before training)", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def _to_display(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised (N, C, H, W) images -> (N, H, W, C) in [0, 1]."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (images.float() * s + m).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def plot_warp_grid(
    inputs: torch.Tensor,
    warped: Mapping[str, torch.Tensor],
    mean: Sequence[float],
    std: Sequence[float],
    path: str | os.PathLike,
    title: str = "",
) -> Path:
    """A row of input images, then one row of their warps per variant."""
    rows = {"input": inputs, **warped}
    n = len(inputs)
    fig = new_figure(1.1 * n + 1.6, 1.15 * len(rows) + 0.6)
    axes = np.atleast_2d(fig.subplots(len(rows), n))
    for r, (name, images) in enumerate(rows.items()):
        shown = _to_display(images, mean, std)
        for c in range(n):
            ax = axes[r, c]
            image = shown[c]
            if image.shape[-1] == 1:
                ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def plot_accuracy(
    rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str = ""
) -> Path:
    """Test accuracy (mean ± std over seeds) per variant."""
    names = [r["variant"] for r in rows]
    means = [100 * r["test_accuracy_mean"] for r in rows]
    stds = [100 * (r["test_accuracy_std"] or 0.0) for r in rows]
    fig = new_figure(1.2 * len(rows) + 2, 4)
    ax = fig.subplots()
    ax.bar(range(len(rows)), means, yerr=stds, capsize=4, color=[f"C{i}" for i in range(len(rows))])
    low = min(m - s for m, s in zip(means, stds, strict=True))
    high = max(m + s for m, s in zip(means, stds, strict=True))
    ax.set_ylim(max(0.0, low - 2), min(100.0, high + 1))
    ax.set_xticks(range(len(rows)), names, rotation=30, ha="right")
    ax.set(ylabel="test accuracy % (mean ± std over seeds)", title=title or "test accuracy")
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)
