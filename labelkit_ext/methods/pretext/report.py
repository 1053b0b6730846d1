"""What a pretext run reports: mean ± std over seeds (Table 1 of the original: linear-eval
accuracy and AUC per pretext and as % of the supervised baseline; the label-fraction table),
and the plots: label-fraction curves, pretext training curves, a jigsaw batch, a context pair."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from labelkit_ext.data import DataSplits
from labelkit_ext.engine import format_table, mean_std, plus_minus
from labelkit_ext.engine.report import new_figure, save_figure, unit_range
from labelkit_ext.methods.pretext.tasks import PretextSettings, jigsaw_permutations
from labelkit_ext.ops.pretext import context_pair, jigsaw_tiles

__all__ = [
    "CONTEXT_POSITIONS",
    "fractions_table",
    "mean_and_std",
    "percent",
    "plot_context_pair",
    "plot_jigsaw_batch",
    "plot_label_fractions",
    "plot_pretext_curves",
    "summarize",
    "table1",
    "write_plots",
]

# The context task's 8 classes: the neighbours of the center cell, row-major.
CONTEXT_POSITIONS = (
    "top-left", "top", "top-right", "left", "right", "bottom-left", "bottom", "bottom-right",
)  # fmt: skip
METRICS = ("accuracy", "auc")


def percent(fraction: float) -> str:
    """A label fraction as a percentage with the digits it needs (50%, 2.5%, 0.001%)."""
    return f"{100 * float(fraction):.3g}%"


def mean_and_std(values: Sequence[float | None]) -> dict[str, float | None]:
    """``engine.mean_std`` as {"mean", "std"}: the sample std, None for one seed."""
    mean, std = mean_std(values)
    return {"mean": mean, "std": std}


def _final_pretext_accuracy(pretext: dict, task: str) -> dict[str, float | None]:
    finals = [seed["history"][-1].get("val_accuracy") for seed in pretext.get(task, {}).values()
              if seed["history"]]  # fmt: skip
    return mean_and_std(finals)


def summarize(
    runs: Sequence[dict], pretext: dict, backbones: Sequence[str], fractions: Sequence[float]
) -> dict[str, Any]:
    """Test metrics per (backbone, fraction) as mean ± std over seeds, each also as % of the
    supervised-from-scratch mean at the same fraction; ``table1`` is the largest fraction."""
    by_fraction: dict[str, dict[str, dict]] = {}
    for f in fractions:
        cells: dict[str, dict] = {}
        for b in backbones:
            mine = [r for r in runs if r["backbone"] == b and r["fraction"] == f]
            if not mine:
                continue
            cells[b] = {m: mean_and_std([r["metrics"]["test"][m] for r in mine]) for m in METRICS}
            cells[b]["seeds"] = len(mine)
            cells[b]["train_size"] = mine[0]["train_size"]
        reference = cells.get("supervised")
        for cell in cells.values():
            cell["pct_of_supervised"] = {
                m: (100 * cell[m]["mean"] / reference[m]["mean"])
                if reference and cell[m]["mean"] is not None and reference[m]["mean"]
                else None
                for m in METRICS
            }
        by_fraction[f"{f:g}"] = cells
    top = by_fraction[f"{max(fractions):g}"]
    table = [
        {"backbone": b, **top[b], "pretext_val_accuracy": _final_pretext_accuracy(pretext, b)}
        for b in backbones
        if b in top
    ]
    return {"by_fraction": by_fraction, "table1": table, "table1_fraction": max(fractions)}


def _pm(stat: dict[str, float | None]) -> str:
    return plus_minus(stat["mean"], stat["std"], scale=100.0)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def table1(summary: dict) -> str:
    """The original's Table 1: linear-eval test accuracy and AUC (%, mean ± std over seeds)
    per backbone, as % of supervised-from-scratch, and the final pretext val accuracy."""
    rows = [
        [r["backbone"], _pm(r["accuracy"]), _pm(r["auc"]), _pct(r["pct_of_supervised"]["accuracy"]),
         _pct(r["pct_of_supervised"]["auc"]), _pm(r["pretext_val_accuracy"]), r["seeds"]]
        for r in summary["table1"]
    ]  # fmt: skip
    headers = ["backbone", "accuracy %", "AUC %", "acc % of sup.", "AUC % of sup.",
               "pretext val acc %", "seeds"]  # fmt: skip
    return format_table(rows, headers)


def fractions_table(summary: dict, metric: str = "auc") -> str:
    """Test ``metric`` (%, mean ± std) per backbone (rows) and label fraction (columns)."""
    fractions = list(summary["by_fraction"])
    backbones = list(dict.fromkeys(b for f in fractions for b in summary["by_fraction"][f]))
    rows = [
        [b, *(_pm(summary["by_fraction"][f][b][metric]) if b in summary["by_fraction"][f] else "-"
              for f in fractions)]
        for b in backbones
    ]  # fmt: skip
    sizes = [next(iter(summary["by_fraction"][f].values()))["train_size"] for f in fractions]
    headers = [
        "backbone",
        *(f"{percent(f)} ({n} labels)" for f, n in zip(fractions, sizes, strict=True)),
    ]
    return format_table(rows, headers)


# ---- plots ------------------------------------------------------------------------------------


def plot_label_fractions(summary: dict, path: str | os.PathLike, title: str = "") -> Path:
    """Test accuracy and AUC against the share of labels (log axis), mean ± std per backbone."""
    fractions = [float(f) for f in summary["by_fraction"]]
    keys = list(summary["by_fraction"])
    backbones = list(dict.fromkeys(b for k in keys for b in summary["by_fraction"][k]))
    fig = new_figure(11, 4.2)
    for ax, metric in zip(fig.subplots(1, 2), METRICS, strict=True):
        for b in backbones:
            stats = [summary["by_fraction"][k].get(b, {}).get(metric, {"mean": None, "std": None})
                     for k in keys]  # fmt: skip
            mean = [np.nan if s["mean"] is None else s["mean"] for s in stats]
            std = [0.0 if s["std"] is None else s["std"] for s in stats]
            style = "--" if b in ("supervised", "random init") else "-"
            ax.errorbar(fractions, mean, yerr=std, marker="o", capsize=3, ls=style, label=b)
        ax.set_xscale("log")
        ax.set_xticks(fractions, [percent(f) for f in fractions])
        ax.set(
            xlabel="share of training labels",
            ylabel=f"test {metric}",
            title=f"linear eval: {metric}",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_pretext_curves(pretext: dict, path: str | os.PathLike, title: str = "") -> Path:
    """Per task: pretext accuracy (top) and loss (bottom) over epochs, train dashed and
    validation solid, one colour per seed."""
    tasks = [t for t in pretext if pretext[t]]
    fig = new_figure(3.6 * max(len(tasks), 1), 6)
    axes = np.asarray(fig.subplots(2, max(len(tasks), 1), squeeze=False))
    for col, task in enumerate(tasks):
        for i, (seed, run) in enumerate(pretext[task].items()):
            epochs = [r["epoch"] for r in run["history"]]
            for row, metric in enumerate(("accuracy", "loss")):
                ax = axes[row, col]
                for split, ls in (("train", "--"), ("val", "-")):
                    values = [r.get(f"{split}_{metric}") for r in run["history"]]
                    if any(v is not None for v in values):
                        ax.plot(epochs, values, ls=ls, color=f"C{i}", marker=".",
                                label=f"seed {seed} {split}")  # fmt: skip
        axes[0, col].set(title=f"{task}", ylabel="pretext accuracy", ylim=(0, 1.02))
        axes[1, col].set(xlabel="epoch", ylabel="pretext loss")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
        axes[0, col].legend(fontsize=6)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def _display(image: torch.Tensor) -> np.ndarray:
    """(C, h, w) -> (h, w) or (h, w, 3) in [0, 1] (min-max over the whole picture)."""
    x = unit_range(image)
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()


def _mosaic(tiles: torch.Tensor, grid: int, gap: int = 1) -> torch.Tensor:
    """(grid^2, C, t, t) tiles -> (C, H, W) picture in slot order, tiles ``gap`` px apart (the
    gaps take the tiles' minimum value)."""
    k, c, t, _ = tiles.shape
    side = grid * t + (grid - 1) * gap
    out = torch.full((c, side, side), float(tiles.min()))
    for s in range(k):
        r, q = divmod(s, grid)
        out[:, r * (t + gap) : r * (t + gap) + t, q * (t + gap) : q * (t + gap) + t] = tiles[s]
    return out


def _offsets(n: int, slots: int, room: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(room + 1, (n, slots, 2), generator=generator)


def _box(ax, top: int, left: int, size: int, color: str) -> None:
    from matplotlib.patches import Rectangle

    ax.add_patch(Rectangle((left - 0.5, top - 0.5), size, size, fill=False, ec=color, lw=1.5))


def plot_jigsaw_batch(
    images: torch.Tensor, settings: PretextSettings, path: str | os.PathLike, seed: int = 0
) -> Path:
    """For each image (rows): the image with its grid cells and jittered tiles, the tiles in
    the shuffled slot order the network sees (with the permutation's class), and the tiles put
    back by the inverse permutation."""
    n, _, size, _ = images.shape
    grid, tile = settings.grid, settings.tile_for(size)
    cell = size // grid
    generator = torch.Generator().manual_seed(seed)
    perms = jigsaw_permutations(settings)
    labels = torch.randint(len(perms), (n,), generator=generator)
    offsets = _offsets(n, grid * grid, cell - tile, generator)
    tiles = jigsaw_tiles(images, labels, perms, grid, tile, offsets)
    fig = new_figure(7.5, 2.5 * n)
    axes = np.asarray(fig.subplots(n, 3, squeeze=False))
    for i in range(n):
        perm = perms[labels[i]]
        axes[i, 0].imshow(_display(images[i]), cmap="gray")
        for c in range(grid * grid):
            dy, dx = offsets[i, c].tolist()
            _box(axes[i, 0], (c // grid) * cell + dy, (c % grid) * cell + dx, tile, "tab:orange")
        axes[i, 1].imshow(_display(_mosaic(tiles[i], grid)), cmap="gray")
        axes[i, 2].imshow(_display(_mosaic(tiles[i][perm.argsort()], grid)), cmap="gray")
        axes[i, 0].set_title("image, tiles" if i == 0 else "")
        axes[i, 1].set_title(f"shuffled: class {int(labels[i])}\n{perm.tolist()}", fontsize=7)
        axes[i, 2].set_title("inverse permutation" if i == 0 else "")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return save_figure(fig, path)


def plot_context_pair(
    images: torch.Tensor, settings: PretextSettings, path: str | os.PathLike, seed: int = 0
) -> Path:
    """For each image (rows): the image with the center patch (blue) and the neighbour patch
    (red), then the two patches as the siamese network sees them, titled with the class."""
    n, _, size, _ = images.shape
    grid, patch = settings.grid, settings.tile_for(size)
    cell, mid = size // grid, settings.grid // 2
    generator = torch.Generator().manual_seed(seed)
    positions = torch.randint(8, (n,), generator=generator)
    offsets = _offsets(n, 2, cell - patch, generator)
    center, neighbour = context_pair(images, positions, grid, patch, offsets)
    fig = new_figure(7.5, 2.5 * n)
    axes = np.asarray(fig.subplots(n, 3, squeeze=False))
    for i in range(n):
        p = int(positions[i])
        dr, dc = divmod(
            p + (p >= 4), 3
        )  # position -> (row, col) in the 3x3 block, skipping the center
        cells = ((mid, mid), (mid + dr - 1, mid + dc - 1))
        axes[i, 0].imshow(_display(images[i]), cmap="gray")
        for (r, c), (dy, dx), color in zip(
            cells, offsets[i].tolist(), ("tab:blue", "tab:red"), strict=True
        ):
            _box(axes[i, 0], r * cell + dy, c * cell + dx, patch, color)
        axes[i, 1].imshow(_display(center[i]), cmap="gray")
        axes[i, 2].imshow(_display(neighbour[i]), cmap="gray")
        axes[i, 0].set_title("image" if i == 0 else "")
        axes[i, 1].set_title("center" if i == 0 else "")
        axes[i, 2].set_title(f"neighbour: class {p} ({CONTEXT_POSITIONS[p]})", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return save_figure(fig, path)


def write_plots(
    results: dict, splits: DataSplits, settings: PretextSettings, out: Path, examples: int = 4
) -> list[str]:
    """label_fractions.png, pretext_curves.png, and jigsaw_batch.png / context_pair.png (test
    images) when those tasks ran; returns the file names."""
    name = splits.info.name
    summary, tasks = results["summary"], results["config"]["tasks"]
    paths = [plot_label_fractions(summary, out / "label_fractions.png", f"pretext: {name}")]
    if tasks:
        paths.append(plot_pretext_curves(results["pretext"], out / "pretext_curves.png", name))
    images = torch.stack([splits.test[i][0] for i in range(min(examples, len(splits.test)))])
    if "jigsaw" in tasks:
        paths.append(plot_jigsaw_batch(images, settings, out / "jigsaw_batch.png"))
    if "context" in tasks:
        paths.append(plot_context_pair(images, settings, out / "context_pair.png"))
    return [p.name for p in paths]
