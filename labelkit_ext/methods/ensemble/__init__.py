"""``ensemble``: label-embedding stacking ensemble with entropy-gated routing.

A baseline classifier's final-layer weight rows are label embeddings; spectral clustering of
their cosine similarity groups easily confused classes into S clusters; per cluster a copy of
the baseline is fine-tuned on that cluster's samples. At inference ``entropy_gate`` keeps the
baseline's answer where its entropy is below e, and otherwise asks the most probable
cluster's sub-classifier (hard routing) or mixes every sub-classifier by cluster probability
(soft routing). S and e are chosen on validation. See docs/methods/ensemble.md.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from typing import Any

from labelkit_ext.engine import current_dist
from labelkit_ext.methods.common import add_training_arguments, load_data, run_dir, train_config
from labelkit_ext.methods.ensemble.clustering import (
    AFFINITY,
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
    train_baseline,
)
from labelkit_ext.methods.registry import register_method

__all__ = [
    "AFFINITY",
    "DEFAULT_QUANTILES",
    "ClusterRestricted",
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
    "run",
    "search_grid",
    "select_best",
    "similarity_to_affinity",
    "soft_route",
    "spectral_clusters",
    "threshold_grid",
    "train_baseline",
]

DEFAULT_EPOCHS = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_training_arguments(parser, epochs=DEFAULT_EPOCHS)
    group = parser.add_argument_group("ensemble")
    group.add_argument(
        "--baseline",
        default=None,
        metavar="FILE",
        help="a trained baseline (e.g. OUT/checkpoint_last.pt of `labelkit run supervised`) "
        "instead of training one",
    )
    group.add_argument(
        "--sub-epochs",
        type=int,
        default=DEFAULT_SUB_EPOCHS,
        help="fine-tuning epochs per sub-classifier (default: %(default)s)",
    )
    group.add_argument(
        "--sub-lr",
        type=float,
        default=DEFAULT_SUB_LR,
        help="fine-tuning learning rate (default: %(default)s)",
    )
    group.add_argument(
        "--clusters",
        type=int,
        nargs="+",
        default=None,
        metavar="S",
        help="numbers of clusters to search (default: about sqrt(C) x 0.6, 0.9, 1.2; "
        "10 classes: 2 3 4, 100 classes: 6 9 12)",
    )
    group.add_argument(
        "--quantiles",
        type=float,
        nargs="+",
        default=list(DEFAULT_QUANTILES),
        metavar="Q",
        help="thresholds to search, as quantiles of the baseline's val entropy "
        "(0 and route-nothing are always added)",
    )


def _print_report(fitted: EnsembleFit, args: argparse.Namespace) -> None:
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
                f"ensemble | {args.dataset} | {args.model} | baseline {args.epochs} epochs, "
                f"sub-classifiers {args.sub_epochs} epochs",
                *per_cluster,
                overall_table(results["metrics"], selected),
                grid_table([GridPoint(**p) for p in results["grid"]["val"]]),
                f"timings: {timings}",
            ]
        )
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """``labelkit run ensemble``: baseline, clustering, sub-classifiers, validation grid over
    (S, e), test report; writes results.json and plots and prints the tables."""
    tic = time.perf_counter()
    if args.sub_epochs < 1:
        raise ValueError(f"--sub-epochs must be >= 1, got {args.sub_epochs}")
    if args.sub_lr <= 0:
        raise ValueError(f"--sub-lr must be > 0, got {args.sub_lr}")
    splits = load_data(args)
    out = run_dir(args, "ensemble")
    config = train_config(args)
    fitted = fit_ensemble(
        splits,
        model=args.model,
        config=config,
        sub_config=replace(config, epochs=args.sub_epochs, lr=args.sub_lr),
        cluster_grid=args.clusters,
        quantiles=args.quantiles,
        baseline_file=args.baseline,
        pretrained=args.pretrained,
        out_dir=out,
        resume=args.resume,
        cli_args=vars(args),
        data_seconds=time.perf_counter() - tic,
    )
    if current_dist().is_main:
        _print_report(fitted, args)
        plots = ", ".join(fitted.results.get("plots", []))
        print(f"results: {out / 'results.json'}  plots: {plots}")
    return fitted.results


register_method(
    "ensemble",
    run=run,
    add_arguments=add_arguments,
    help="label-embedding stacking ensemble: cluster confused classes, fine-tune a "
    "sub-classifier per cluster, route uncertain samples by entropy",
)
