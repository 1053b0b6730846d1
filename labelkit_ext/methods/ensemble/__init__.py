"""``ensemble``: label-embedding stacking ensemble with entropy-gated routing.

A baseline classifier's final-layer weight rows are label embeddings; spectral clustering of
their cosine similarity groups easily confused classes into S clusters; per cluster a copy of
the baseline is fine-tuned on that cluster's samples. At inference ``entropy_gate`` keeps the
baseline's answer where its entropy is below e, and otherwise asks the most probable
cluster's sub-classifier (hard routing) or mixes every sub-classifier by cluster probability
(soft routing). S and e are chosen on validation. See docs/methods/ensemble.md.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from labelkit_ext.checks import check_fields
from labelkit_ext.engine import TrainConfig, current_dist, option
from labelkit_ext.errors import UsageError
from labelkit_ext.methods.common import (
    DataConfig,
    check_run_config,
    load_data,
    prepare_run_dir,
    write_results,
)
from labelkit_ext.methods.ensemble.clustering import (
    AFFINITY,
    check_num_clusters,
    cluster_members,
    cosine_similarity,
    default_cluster_grid,
    label_embeddings,
    similarity_to_affinity,
    spectral_clusters,
)
from labelkit_ext.methods.ensemble.pipeline import (
    DEFAULT_SUB_EPOCHS,
    DEFAULT_SUB_LR,
    EnsembleFit,
    cluster_grid_for,
    fit_ensemble,
)
from labelkit_ext.methods.ensemble.report import (
    grid_table,
    overall_table,
    paired_comparison,
    per_cluster_rows,
    per_cluster_table,
)
from labelkit_ext.methods.ensemble.routing import (
    DEFAULT_QUANTILES,
    GridPoint,
    LabelEmbeddingEnsemble,
    Routing,
    baseline_entropy,
    check_quantiles,
    hard_route,
    mask_to_clusters,
    mix_subclassifiers,
    route,
    route_nothing_threshold,
    search_grid,
    select_best,
    soft_route,
    threshold_grid,
)
from labelkit_ext.methods.ensemble.training import (
    ClusterRestricted,
    SubClassifier,
    cluster_subset,
    fine_tune_subclassifiers,
    load_baseline,
)
from labelkit_ext.methods.registry import register_method
from labelkit_ext.models import available_models

__all__ = [
    "AFFINITY",
    "DEFAULT_QUANTILES",
    "ClusterRestricted",
    "EnsembleRunConfig",
    "EnsembleFit",
    "GridPoint",
    "LabelEmbeddingEnsemble",
    "Routing",
    "SubClassifier",
    "baseline_entropy",
    "cluster_grid_for",
    "cluster_members",
    "cluster_subset",
    "cosine_similarity",
    "default_cluster_grid",
    "fine_tune_subclassifiers",
    "fit_ensemble",
    "hard_route",
    "label_embeddings",
    "load_baseline",
    "mask_to_clusters",
    "mix_subclassifiers",
    "paired_comparison",
    "per_cluster_rows",
    "route",
    "route_nothing_threshold",
    "run_ensemble",
    "search_grid",
    "select_best",
    "similarity_to_affinity",
    "soft_route",
    "spectral_clusters",
    "threshold_grid",
]


@dataclass
class EnsembleRunConfig:
    """``labelkit run ensemble``: its options are these fields."""

    data: DataConfig = option(factory=DataConfig, help="data")
    model: str = option("small-cnn", "network", choices=available_models)
    pretrained: str | None = option(
        None, "initial weights of a baseline trained here, from a local file", metavar="FILE"
    )
    train: TrainConfig = option(factory=lambda: TrainConfig(epochs=20), help="baseline training")
    baseline: str | None = option(
        None,
        "a trained baseline (e.g. OUT/checkpoint_last.pt of `labelkit run supervised`) instead "
        "of training one",
        metavar="FILE",
    )
    sub_epochs: int = option(DEFAULT_SUB_EPOCHS, "fine-tuning epochs per sub-classifier")
    sub_lr: float = option(DEFAULT_SUB_LR, "fine-tuning learning rate")
    clusters: list[int] | None = option(
        None,
        "numbers of clusters to search (default: about sqrt(C) x 0.6, 0.9, 1.2; 10 classes: "
        "2 3 4, 100 classes: 6 9 12)",
        metavar="S",
    )
    quantiles: tuple[float, ...] = option(
        DEFAULT_QUANTILES,
        "thresholds to search, as quantiles of the baseline's val entropy (0 and route-nothing "
        "are always added)",
        metavar="Q",
    )

    def __post_init__(self) -> None:
        check_fields(self)
        check_run_config(self)
        if self.baseline is not None and self.pretrained is not None:
            raise UsageError(
                "give --baseline (a trained baseline, used as is) or --pretrained (initial "
                "weights of a baseline trained here), not both"
            )
        if self.clusters is not None:
            if not self.clusters:
                raise UsageError("clusters must hold at least one number of clusters")
            for s in self.clusters:  # the upper bound (< classes) needs the data
                check_num_clusters(s, name="clusters")
        if self.sub_epochs < 1:
            raise UsageError(f"sub_epochs must be >= 1, got {self.sub_epochs}")
        if self.sub_lr <= 0:
            raise UsageError(f"sub_lr must be > 0, got {self.sub_lr}")
        check_quantiles(self.quantiles)

    @property
    def sub_train(self) -> TrainConfig:
        """The sub-classifiers' training: the baseline's, with their own epochs and LR."""
        return replace(self.train, epochs=self.sub_epochs, lr=self.sub_lr)


def _print_report(fitted: EnsembleFit, config: EnsembleRunConfig) -> None:
    results = fitted.results
    selected = results["selected"]
    per_cluster = []
    for s in sorted({point["num_clusters"] for point in selected.values()}):
        modes = " and ".join(m for m, point in selected.items() if point["num_clusters"] == s)
        per_cluster.append(
            f"per cluster, test, S={s} (chosen on val for {modes} routing): top-1 / top-3 of the "
            "baseline over all classes (base), the baseline restricted to the cluster (base|k), "
            "the sub-classifier (sub)\n"
            + per_cluster_table(results["clusterings"][str(s)]["per_cluster"]["test"])
        )
    timings = ", ".join(
        f"{k.removesuffix('_seconds')} {v:.1f}s" for k, v in results["timings"].items()
    )
    print(
        "\n\n".join(
            [
                f"ensemble | {config.data.dataset} | {config.model} | baseline "
                f"{config.baseline or f'{config.train.epochs} epochs'}, sub-classifiers "
                f"{config.sub_epochs} epochs",
                *per_cluster,
                overall_table(results["metrics"], selected),
                grid_table([GridPoint(**p) for p in results["grid"]["val"]]),
                f"timings: {timings}",
            ]
        )
    )


def run_ensemble(
    config: EnsembleRunConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    resume: bool = False,
) -> dict[str, Any]:
    """Baseline, clustering, sub-classifiers, validation grid over (S, e), test report; writes
    results.json and plots into ``out_dir`` (default ``runs/ensemble-<dataset>``) and prints
    the tables."""
    started = time.perf_counter()
    config = config or EnsembleRunConfig()
    out = prepare_run_dir("ensemble", config.data, out_dir)
    splits = load_data(config.data)
    data_seconds = time.perf_counter() - started
    fitted = fit_ensemble(
        splits,
        model=config.model,
        config=config.train,
        sub_config=config.sub_train,
        cluster_grid=config.clusters,
        quantiles=config.quantiles,
        baseline_file=config.baseline,
        pretrained=config.pretrained,
        out_dir=out,
        resume=resume,
    )
    results = fitted.results
    results["config"]["run"] = asdict(config)
    results["timings"]["data_seconds"] = data_seconds
    write_results(out, results, started)
    if current_dist().is_main:
        _print_report(fitted, config)
        print(f"results: {out / 'results.json'}  plots: {', '.join(results.get('plots', []))}")
    return results


register_method(
    "ensemble",
    config=EnsembleRunConfig,
    run=run_ensemble,
    help="label-embedding stacking ensemble: cluster confused classes, fine-tune a "
    "sub-classifier per cluster, route uncertain samples by entropy",
)
