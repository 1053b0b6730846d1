"""Classification metrics for multi-class and multi-label outputs (scikit-learn ROC AUC).

scikit-learn is imported where it is used: it takes a second, and every method imports this
module when ``labelkit run <method> --help`` builds its options (python_tests/test_cli.py)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from labelkit_ext.errors import UsageError

__all__ = ["scores_from_logits", "topk_accuracy", "roc_auc_per_class", "classification_metrics"]


def scores_from_logits(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Probabilities: softmax over classes (multi-class) or per-label sigmoid (multi-label)."""
    logits = logits.float()
    return logits.softmax(dim=1) if task == "multiclass" else logits.sigmoid()


def topk_accuracy(scores: np.ndarray, targets: np.ndarray, k: int) -> float:
    """Share of rows whose true class is among the ``k`` highest scores (ties: the lower
    class index ranks first).

    Not ``sklearn.metrics.top_k_accuracy_score``: with two score columns it switches to its
    binary path and thresholds a 1-D score instead of ranking the columns, which breaks the
    ensemble's two-class clusters; for three or more classes the two agree (tested).
    """
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((top == targets[:, None]).any(axis=1).mean())


def roc_auc_per_class(scores: np.ndarray, positives: np.ndarray) -> list[float | None]:
    """One-vs-rest ROC AUC per column of ``positives`` (N, K) 0/1; None where a column has
    only one value (the AUC is undefined)."""
    from sklearn.metrics import roc_auc_score

    aucs: list[float | None] = []
    for k in range(positives.shape[1]):
        y = positives[:, k]
        aucs.append(float(roc_auc_score(y, scores[:, k])) if 0 < y.sum() < len(y) else None)
    return aucs


def _mean(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def classification_metrics(
    scores: np.ndarray | torch.Tensor,
    targets: np.ndarray | torch.Tensor,
    task: str,
    class_names: Sequence[str] | None = None,
    topk: Sequence[int] = (5,),
) -> dict:
    """Metrics from probabilities ``scores`` (N, K) and ``targets``.

    multiclass (targets (N,) class indices): accuracy, top-k accuracy for each k < K,
    per-class accuracy (recall), confusion matrix, one-vs-rest per-class and mean AUC (for two
    classes both AUCs equal the usual binary AUC).
    multilabel (targets (N, K) 0/1): accuracy (per label at 0.5, as MedMNIST), exact match,
    per-class and mean AUC. Undefined AUCs are None and left out of the mean.
    """
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (N, K), got shape {scores.shape}")
    n, k = scores.shape
    bad = int((~np.isfinite(scores)).any(axis=1).sum())
    if bad:
        raise UsageError(
            f"scores hold NaN/inf in {bad} of {n} rows: the model's outputs are not finite "
            f"(training diverged, or the weights are corrupt)"
        )
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"class_names has {len(names)} names for {k} score columns")
    if task == "multiclass":
        from sklearn.metrics import confusion_matrix

        targets = targets.astype(np.int64).reshape(-1)
        positives = np.eye(k, dtype=np.int64)[targets]
        pred = scores.argmax(axis=1)
        cm = confusion_matrix(targets, pred, labels=list(range(k)))
        recall = [float(cm[i, i] / cm[i].sum()) if cm[i].sum() else None for i in range(k)]
        metrics = {
            "accuracy": float((pred == targets).mean()),
            **{f"top{t}_accuracy": topk_accuracy(scores, targets, t) for t in topk if t < k},
            "per_class_accuracy": dict(zip(names, recall, strict=True)),
            "confusion_matrix": cm.tolist(),
        }
    elif task == "multilabel":
        positives = targets.astype(np.int64)
        if positives.shape != scores.shape:
            raise ValueError(f"multilabel targets must be {scores.shape}, got {positives.shape}")
        pred = (scores >= 0.5).astype(np.int64)
        metrics = {
            "accuracy": float((pred == positives).mean()),
            "exact_match": float((pred == positives).all(axis=1).mean()),
        }
    else:
        raise ValueError(f"task must be 'multiclass' or 'multilabel', got {task!r}")
    aucs = roc_auc_per_class(scores, positives)
    metrics["per_class_auc"] = dict(zip(names, aucs, strict=True))
    metrics["auc"] = _mean(aucs)
    metrics["n"] = n
    return metrics
