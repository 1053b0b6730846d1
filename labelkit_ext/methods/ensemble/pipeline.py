"""``fit_ensemble``: the whole method, from a baseline to the validated (S, e) and its report."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from labelkit_ext.data import DataSplits
from labelkit_ext.engine import (
    Predictions,
    TrainConfig,
    classification_metrics,
    current_dist,
    plot_history,
    prediction_metrics,
    select_device,
)
from labelkit_ext.errors import UsageError
from labelkit_ext.methods.common import dataset_summary
from labelkit_ext.methods.ensemble.clustering import (
    AFFINITY,
    check_num_clusters,
    cluster_members,
    cosine_similarity,
    default_cluster_grid,
    label_embeddings,
    spectral_clusters,
)
from labelkit_ext.methods.ensemble.report import (
    paired_comparison,
    per_cluster_rows,
    plot_accuracy_vs_threshold,
    plot_grid,
    plot_similarity,
)
from labelkit_ext.methods.ensemble.routing import (
    DEFAULT_QUANTILES,
    ROUTING_MODES,
    GridPoint,
    LabelEmbeddingEnsemble,
    baseline_entropy,
    check_quantiles,
    route,
    search_grid,
    select_best,
    threshold_grid,
)
from labelkit_ext.methods.ensemble.training import (
    SubClassifier,
    fine_tune_subclassifiers,
    load_baseline,
    predict_logits,
    stack_sub_logits,
)
from labelkit_ext.methods.supervised import fit_supervised
from labelkit_ext.models import build_model

__all__ = [
    "DEFAULT_SUB_EPOCHS",
    "DEFAULT_SUB_LR",
    "EnsembleFit",
    "cluster_grid_for",
    "fit_ensemble",
]

DEFAULT_SUB_EPOCHS = 8
DEFAULT_SUB_LR = 0.01
SPLITS = ("val", "test")


@dataclass
class EnsembleFit:
    """What ``fit_ensemble`` returns: the results (as written to results.json), the baseline,
    the hard and soft ensembles at their validated (S, e), and every S's parts."""

    results: dict[str, Any]
    baseline: nn.Module
    hard: LabelEmbeddingEnsemble
    soft: LabelEmbeddingEnsemble
    similarity: torch.Tensor
    clusterings: dict[int, torch.Tensor]
    sub_classifiers: dict[int, list[SubClassifier]]


class _Stages:
    """Wall time per stage; each is printed as it ends (rank 0, unless quiet)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.seconds: dict[str, float] = {}

    def log(self, message: str) -> None:
        if not self.quiet and current_dist().is_main:
            print(f"[ensemble] {message}", flush=True)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.log(f"{name} ...")
        tic = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - tic
        self.log(f"{name}: {self.seconds[name]:.1f}s")


def cluster_grid_for(num_classes: int, sizes: Sequence[int] | None = None) -> list[int]:
    """The S values to search: ``sizes`` checked (each in [2, C - 1]), sorted and unique, or
    ``default_cluster_grid(C)`` when None."""
    if sizes is None:
        return default_cluster_grid(num_classes)
    if len(sizes) == 0:
        raise UsageError("cluster_grid must hold at least one S")
    for s in sizes:
        check_num_clusters(s, num_classes, name="clusters (--clusters)")
    return sorted({int(s) for s in sizes})


def _baseline(
    splits: DataSplits,
    model: str,
    config: TrainConfig,
    baseline: nn.Module | None,
    baseline_file: str | os.PathLike | None,
    pretrained: str | os.PathLike | None,
    out: Path | None,
    resume: bool,
) -> tuple[nn.Module, torch.device, list[dict], bool]:
    """(model, device, history, trained here): the given model, the file's, or a new one."""
    info = splits.info
    if baseline is None and baseline_file is None:
        fitted = fit_supervised(
            splits,
            model,
            config,
            pretrained=pretrained,
            out_dir=out / "baseline" if out is not None else None,
            resume=resume,
        )
        return fitted.model, fitted.device, fitted.history, True
    if baseline is None:
        net = build_model(model, info.num_classes, info.in_channels, info.image_size)
        shape = (info.in_channels, info.image_size, info.image_size)
        baseline = load_baseline(net, baseline_file, shape)
    if not hasattr(baseline, "label_embeddings"):
        raise UsageError("baseline must expose label_embeddings (a labelkit Classifier)")
    device = select_device(config.device, current_dist().local_rank)
    return baseline.to(device), device, [], False


def _check_sources(
    baseline: nn.Module | None,
    baseline_file: str | os.PathLike | None,
    pretrained: str | os.PathLike | None,
) -> None:
    given = [name for name, v in (("baseline", baseline), ("baseline_file", baseline_file),
             ("pretrained", pretrained)) if v is not None]  # fmt: skip
    if len(given) > 1:
        raise UsageError(f"give at most one of baseline, baseline_file, pretrained; got {given}")


def _at(grid: Sequence[GridPoint], point: GridPoint) -> GridPoint:
    """The point of ``grid`` (another split's) with the same (S, e) as ``point``."""
    return next(
        p for p in grid if p.num_clusters == point.num_clusters and p.threshold == point.threshold
    )


def _summary_metrics(
    base: Mapping[str, Predictions],
    grids: Mapping[str, Sequence[GridPoint]],
    selected: Mapping[str, GridPoint],
) -> dict[str, dict[str, Any]]:
    """Per split: baseline, hard and soft accuracy at their validated (S, e), routed shares."""
    metrics = {}
    for split in SPLITS:
        pred = base[split]
        row = {"baseline": float((pred.logits.argmax(1) == pred.targets).double().mean())}
        for mode in ROUTING_MODES:
            point = _at(grids[split], selected[mode])
            row[mode] = getattr(point, f"{mode}_accuracy")
            row[f"{mode}_routed"] = point.routed_share
        metrics[split] = row
    return metrics


def _fit_subclassifiers(
    net: nn.Module,
    splits: DataSplits,
    clusterings: Mapping[int, torch.Tensor],
    sub_config: TrainConfig,
    base: Mapping[str, Predictions],
    device: torch.device,
    out: Path | None,
    resume: bool,
    stages: _Stages,
) -> tuple[dict[int, list[SubClassifier]], dict[str, dict[int, torch.Tensor]]]:
    """Every S's sub-classifiers, and their ``(S, N, C)`` logits on val and test."""
    subs: dict[int, list[SubClassifier]] = {}
    shared: dict[tuple[int, ...], SubClassifier] = {}  # a cluster found for several S trains once
    sub_logits: dict[str, dict[int, torch.Tensor]] = {split: {} for split in SPLITS}
    for s, clusters in clusterings.items():
        with stages(f"sub-classifiers S={s}"):
            subs[s] = fine_tune_subclassifiers(
                net,
                splits.train,
                splits.val,
                clusters,
                sub_config,
                out_dir=out / "subclassifiers" / f"S{s}" if out is not None else None,
                resume=resume,
                cache=shared,
                log=stages.log,
            )
            for split in SPLITS:
                sub_logits[split][s] = stack_sub_logits(
                    subs[s], base[split].logits, getattr(splits, split), device, sub_config
                )
    return subs, sub_logits


def _routed_metrics(
    base: Mapping[str, Predictions],
    sub_logits: Mapping[str, Mapping[int, torch.Tensor]],
    clusterings: Mapping[int, torch.Tensor],
    selected: Mapping[str, GridPoint],
    class_names: Sequence[str],
    metrics: dict[str, dict[str, Any]],
) -> dict[str, dict[str, dict]]:
    """Full classification metrics of each ensemble at its (S, e); adds to ``metrics`` the
    samples each fixed and broke against the baseline."""
    full: dict[str, dict[str, dict]] = {}
    for mode, point in selected.items():
        full[mode] = {}
        for split in SPLITS:
            pred = base[split]
            routed = route(
                mode,
                pred.logits,
                sub_logits[split][point.num_clusters],
                clusterings[point.num_clusters],
                point.threshold,
            )
            full[mode][split] = classification_metrics(
                routed.scores, pred.targets, "multiclass", class_names
            )
            metrics[split][f"{mode}_vs_baseline"] = paired_comparison(
                pred.logits.argmax(1), routed.prediction, pred.targets
            )
    return full


def _clustering_record(
    clusters: torch.Tensor,
    subs: Sequence[SubClassifier],
    base: Mapping[str, Predictions],
    sub_logits: Mapping[str, Mapping[int, torch.Tensor]],
    num_clusters: int,
    class_names: Sequence[str],
) -> dict[str, Any]:
    """One S for results.json: cluster ids, per-cluster tables, the sub-classifiers."""
    fine_tuned = [sub.fine_tuned for sub in subs]
    return {
        "clusters": clusters,
        "per_cluster": {
            split: per_cluster_rows(
                base[split].logits,
                sub_logits[split][num_clusters],
                clusters,
                base[split].targets,
                class_names,
                fine_tuned,
            )
            for split in SPLITS
        },
        "sub_classifiers": [
            {
                "cluster": sub.cluster,
                "classes": sub.classes,
                "class_names": [class_names[c] for c in sub.classes],
                "fine_tuned": sub.fine_tuned,
                "shared": sub.shared,
                "train_size": sub.train_size,
                "train_seconds": sub.seconds,
                "history": sub.history,
            }
            for sub in subs
        ],
    }


def _plots(
    out: Path,
    splits: DataSplits,
    history: list[dict],
    similarity: torch.Tensor,
    clusters: torch.Tensor,
    grids: Mapping[str, Sequence[GridPoint]],
    num_clusters: int,
    metrics: Mapping[str, Mapping[str, float]],
) -> list[str]:
    """The run's PNGs (clusters and threshold curve at the S chosen for hard routing)."""
    info = splits.info
    title = f"ensemble: {info.name}"
    paths = [
        plot_similarity(
            similarity,
            clusters,
            info.class_names,
            out / "embedding_similarity.png",
            f"{title}: label-embedding cosine similarity, S={num_clusters}",
        ),
        plot_accuracy_vs_threshold(
            dict(grids),
            num_clusters,
            {split: metrics[split]["baseline"] for split in SPLITS},
            out / "accuracy_vs_threshold.png",
            f"{title}: accuracy vs entropy threshold (S chosen for hard routing)",
        ),
        plot_grid(grids["val"], out / "grid_search.png", f"{title}: validation grid"),
    ]
    if history:
        paths.append(plot_history(history, out / "baseline_history.png", f"{title}: baseline"))
    return [p.name for p in paths]


def fit_ensemble(
    splits: DataSplits,
    *,
    model: str = "small-cnn",
    config: TrainConfig | None = None,
    sub_config: TrainConfig | None = None,
    cluster_grid: Sequence[int] | None = None,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    baseline: nn.Module | None = None,
    baseline_file: str | os.PathLike | None = None,
    pretrained: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
) -> EnsembleFit:
    """The label-embedding stacking ensemble with entropy-gated routing, end to end.

    1. Baseline: ``baseline`` (a trained Classifier), or loaded from ``baseline_file``, or
       trained here with ``config`` (from ``pretrained`` weights when given).
    2. Its label embeddings (final-layer weight rows) -> cosine similarity -> spectral
       clustering into S groups for every S of ``cluster_grid`` (default
       ``default_cluster_grid(C)``), seeded by ``config.seed``.
    3. Per S and cluster: a copy of the baseline fine-tuned with ``sub_config`` (default:
       ``config`` with ``DEFAULT_SUB_EPOCHS`` epochs at ``DEFAULT_SUB_LR``) on that cluster's
       training samples.
    4. Grid over S and e (0, the ``quantiles`` of the baseline's validation entropy, and a
       threshold that routes nothing); hard and soft routing each take their best (S, e) on
       val (ties: larger e, then smaller S); test is reported, never used to choose.

    With ``out_dir``: checkpoints (``baseline/``, ``subclassifiers/S<s>/cluster<k>/``; ``resume``
    continues them) and plots (``run_ensemble`` also writes results.json there).
    """
    started = time.perf_counter()
    config = config or TrainConfig()
    sub_config = sub_config or replace(config, epochs=DEFAULT_SUB_EPOCHS, lr=DEFAULT_SUB_LR)
    info = splits.info
    if info.task != "multiclass":
        raise UsageError(f"dataset must be multi-class, {info.name} is {info.task}")
    sizes = cluster_grid_for(info.num_classes, cluster_grid)
    check_quantiles(quantiles)  # every argument is checked before hours of training
    _check_sources(baseline, baseline_file, pretrained)
    out = Path(out_dir) if out_dir is not None else None
    stages = _Stages(config.quiet)

    with stages("baseline"):
        net, device, history, trained = _baseline(
            splits, model, config, baseline, baseline_file, pretrained, out, resume
        )
    with stages("baseline predictions"):
        base = {s: predict_logits(net, getattr(splits, s), device, config) for s in SPLITS}
    with stages("label embeddings and clustering"):
        embeddings = label_embeddings(net)
        similarity = cosine_similarity(embeddings)
        clusterings = {s: spectral_clusters(similarity, s, config.seed) for s in sizes}
    for s in sizes:
        names = [[info.class_names[c] for c in m] for m in cluster_members(clusterings[s])]
        stages.log(f"S={s}: {names}")

    subs, sub_logits = _fit_subclassifiers(
        net, splits, clusterings, sub_config, base, device, out, resume, stages
    )
    with stages("grid search"):
        thresholds = threshold_grid(
            baseline_entropy(base["val"].logits), info.num_classes, quantiles
        )
        grids = {
            split: search_grid(
                base[split].logits, sub_logits[split], clusterings, base[split].targets, thresholds
            )
            for split in SPLITS
        }
        selected = {mode: select_best(grids["val"], mode) for mode in ROUTING_MODES}
        metrics = _summary_metrics(base, grids, selected)
        ensemble_metrics = _routed_metrics(
            base, sub_logits, clusterings, selected, info.class_names, metrics
        )

    records = {
        s: _clustering_record(clusterings[s], subs[s], base, sub_logits, s, info.class_names)
        for s in sizes
    }
    chosen = selected["hard"].num_clusters
    results: dict[str, Any] = {
        "method": "ensemble",
        "config": {
            # a baseline module given: its class (``model`` built nothing here)
            "model": model if baseline is None else type(baseline).__name__,
            "pretrained": pretrained,
            "baseline_file": baseline_file,
            "train": config.to_dict(),
            "sub_train": sub_config.to_dict(),
            "cluster_grid": sizes,
            "quantiles": list(quantiles),
            "thresholds": thresholds,
            "affinity": AFFINITY,
        },
        "dataset": dataset_summary(splits),
        "device": str(device),
        "baseline": {
            "trained_here": trained,
            "history": history,
            "metrics": {
                s: prediction_metrics(base[s], info.task, info.class_names) for s in SPLITS
            },
        },
        "label_embeddings": {"shape": list(embeddings.shape), "cosine_similarity": similarity},
        "clusterings": {str(s): record for s, record in records.items()},
        # Test points are reported for the plots only; (S, e) is chosen on val.
        "grid": {split: [asdict(p) for p in grids[split]] for split in SPLITS},
        "selected": {mode: asdict(point) for mode, point in selected.items()},
        "metrics": metrics,
        "ensemble_metrics": ensemble_metrics,
        "per_cluster": {"num_clusters": chosen, **records[chosen]["per_cluster"]},
        "clusters": [
            {"cluster": k, "classes": m, "class_names": [info.class_names[c] for c in m]}
            for k, m in enumerate(cluster_members(clusterings[chosen]))
        ],
        "timings": {**stages.seconds, "total_seconds": time.perf_counter() - started},
    }
    if out is not None and current_dist().is_main:
        results["plots"] = _plots(
            out, splits, history, similarity, clusterings[chosen], grids, chosen, metrics
        )
    hard, soft = (
        LabelEmbeddingEnsemble(
            net,
            [sub.model for sub in subs[selected[mode].num_clusters]],
            clusterings[selected[mode].num_clusters],
            selected[mode].threshold,
            mode,
        )
        for mode in ROUTING_MODES
    )
    return EnsembleFit(results, net, hard, soft, similarity, clusterings, subs)
