"""What a run leaves behind: results.json, PNG plots (matplotlib's Agg canvas) and text tables.

matplotlib, scikit-learn and torchvision are imported where they are used: together they take
seconds, and every method imports this module when ``labelkit run <method> --help`` builds its
options (python_tests/test_cli.py)."""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from labelkit_ext.engine.checkpoint import temp_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "versions",
    "to_jsonable",
    "write_json",
    "format_table",
    "mean_std",
    "plus_minus",
    "plot_history",
    "plot_confusion_matrix",
    "plot_roc",
    "new_figure",
    "save_figure",
    "unit_range",
]


def versions() -> dict[str, Any]:
    """Versions of Python, the libraries and labelkit_ext (with its extension state)."""
    import matplotlib
    import sklearn
    import torchvision

    import labelkit_ext

    return {
        "labelkit_ext": labelkit_ext.__version__,
        "extension_loaded": labelkit_ext.HAS_OPS,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
        "matplotlib": matplotlib.__version__,
        "platform": platform.platform(),
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def to_jsonable(obj: Any) -> Any:
    """Plain JSON values: tensors and arrays to lists, paths to str, NaN/inf to None."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (os.PathLike, torch.device)):
        return str(obj)
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``to_jsonable(obj)`` as indented JSON, atomically (temp file + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n"
    tmp = temp_path(path)
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """A plain-text table; floats to 4 decimals, None as '-'; numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [
        all(isinstance(row[i], (int, float)) or row[i] is None for row in rows)
        for i in range(len(headers))
    ]

    def line(row: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(row, widths, numeric, strict=True)
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof = 1) of the values that are not None: every
    method's "mean ± std over seeds". The std of fewer than two values is None (undefined, not 0:
    one seed measures no spread); both are None when no value is defined."""
    defined = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if len(defined) == 0:
        return None, None
    return float(defined.mean()), float(defined.std(ddof=1)) if len(defined) > 1 else None


def plus_minus(mean: float | None, std: float | None, scale: float = 1.0, digits: int = 2) -> str:
    """``mean ± std`` (times ``scale``) for a table: the mean alone when the std is undefined,
    '-' when the mean is."""
    if mean is None:
        return "-"
    if std is None:
        return f"{scale * mean:.{digits}f}"
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def unit_range(values: torch.Tensor) -> torch.Tensor:
    """``values`` stretched from their own min..max to [0, 1] in float64 (a constant: zeros),
    to show an image whatever its dtype or normalisation."""
    x = values.detach().cpu().double()
    low, high = x.min(), x.max()
    return (x - low) / (high - low) if high > low else torch.zeros_like(x)


def new_figure(width: float, height: float) -> Figure:
    """A figure for a PNG report."""
    from matplotlib.figure import Figure

    # A bare Figure renders PNGs with the Agg canvas and leaves pyplot's global state alone.
    return Figure(figsize=(width, height), layout="tight")


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` to ``path`` (parents created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_history(history: Sequence[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Loss (train, val) and accuracy / AUC curves over epochs."""
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in history]
    fig = new_figure(10, 4)
    ax_loss, ax_score = fig.subplots(1, 2)
    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        values = [r.get(key) for r in history]
        if any(v is not None for v in values):
            ax_loss.plot(epochs, values, marker="o", label=label)
    for key, label in (
        ("train_accuracy", "train accuracy"),
        ("val_accuracy", "val accuracy"),
        ("val_auc", "val AUC"),
    ):
        values = [r.get(key) for r in history]
        if any(v is not None for v in values):
            ax_score.plot(
                epochs, [np.nan if v is None else v for v in values], marker="o", label=label
            )
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_score.set(xlabel="epoch", ylabel="score", title="accuracy / AUC", ylim=(0, 1.02))
    for ax in (ax_loss, ax_score):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_confusion_matrix(
    matrix: Sequence[Sequence[int]],
    class_names: Sequence[str],
    path: str | os.PathLike,
    title: str = "",
) -> Path:
    """Row-normalised confusion matrix (rows: true class), with counts in the cells."""
    cm = np.asarray(matrix, dtype=np.float64)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    k = len(class_names)
    fig = new_figure(1.0 + 0.55 * k, 0.8 + 0.5 * k)
    ax = fig.subplots()
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    int(cm[i, j]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix")
    fig.colorbar(image, ax=ax, fraction=0.046)
    return save_figure(fig, path)


def plot_roc(
    scores: np.ndarray | torch.Tensor,
    targets: np.ndarray | torch.Tensor,
    task: str,
    class_names: Sequence[str],
    path: str | os.PathLike,
    title: str = "",
) -> Path:
    """ROC curves: the positive class of a binary task, else one-vs-rest for each class."""
    from sklearn.metrics import roc_curve

    scores, targets = np.asarray(scores), np.asarray(targets)
    k = scores.shape[1]
    positives = (
        np.eye(k, dtype=np.int64)[targets.reshape(-1)]
        if task == "multiclass"
        else targets.astype(np.int64)
    )
    classes = [k - 1] if task == "multiclass" and k == 2 else range(k)
    fig = new_figure(5.5, 5)
    ax = fig.subplots()
    for c in classes:
        y = positives[:, c]
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, scores[:, c])
            ax.plot(fpr, tpr, lw=1.2, label=class_names[c])
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title or "ROC")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
