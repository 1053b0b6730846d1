"""``active``: pool-based active learning with uncertainty, similarity and combined strategies.

Initial random labels -> train -> score the pool on our ops -> query a batch -> the oracle
labels it -> repeat. Strategies (``strategies/``, one small class each): random; entropy,
margin, least confidence, variation ratio, mean std; MC-dropout BALD and greedy BatchBALD;
similarity to the labeled set; information density; core-set k-center; BADGE; Cluster-Margin;
a prototype (few-shot metric) probe. Oracles: simulated (the data set's labels) or file-based
(a person answers a CSV). The state is saved atomically after every answer; a killed run
resumes where it stopped. See docs/methods/active.md.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from labelkit_ext.engine import TrainConfig
from labelkit_ext.methods.active.experiment import run_experiment, run_folder
from labelkit_ext.methods.active.learners import (
    DROPOUT_MODELS,
    EmbeddingLearner,
    LabeledSubset,
    Learner,
    NetLearner,
    mc_dropout_modules,
)
from labelkit_ext.methods.active.loop import STEPS, ActiveConfig, ActiveLoop, initial_indices
from labelkit_ext.methods.active.oracles import (
    AwaitingAnswers,
    FileOracle,
    Oracle,
    SimulatedOracle,
    pool_image,
)
from labelkit_ext.methods.active.report import (
    area_under_curve,
    labels_to_reach,
    plot_learning_curves,
    summarize_strategy,
    summary_table,
)
from labelkit_ext.methods.active.state import ActiveState, StateError, load_state, save_state
from labelkit_ext.methods.active.strategies import (
    PoolScores,
    SelectionContext,
    Strategy,
    available_strategies,
    build_strategy,
    register_strategy,
    select,
)
from labelkit_ext.methods.common import (
    add_training_arguments,
    dataset_summary,
    load_data,
    run_dir,
    train_config,
)
from labelkit_ext.methods.registry import register_method

__all__ = [
    "DROPOUT_MODELS",
    "STEPS",
    "ActiveConfig",
    "ActiveLoop",
    "ActiveState",
    "AwaitingAnswers",
    "EmbeddingLearner",
    "FileOracle",
    "LabeledSubset",
    "Learner",
    "NetLearner",
    "Oracle",
    "PoolScores",
    "SelectionContext",
    "SimulatedOracle",
    "StateError",
    "Strategy",
    "area_under_curve",
    "available_strategies",
    "build_strategy",
    "initial_indices",
    "labels_to_reach",
    "load_embedding_pool",
    "load_state",
    "mc_dropout_modules",
    "plot_learning_curves",
    "pool_image",
    "register_strategy",
    "run",
    "run_experiment",
    "run_folder",
    "save_state",
    "select",
    "summarize_strategy",
    "summary_table",
]

DEFAULT_STRATEGIES = "random,entropy,coreset,badge,cluster-margin"
# Small defaults: digits with a small CNN finishes on 2 CPU cores in minutes.
DEFAULT_EPOCHS = 40
DEFAULT_BATCH_SIZE = 16
DEFAULT_DROPOUT = 0.25
# The digits are 8x8: 16 px inputs train 2-3x faster than the engine's 32 px, and as well.
DIGITS_IMAGE_SIZE = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_training_arguments(parser, epochs=DEFAULT_EPOCHS, batch_size=DEFAULT_BATCH_SIZE)
    group = parser.add_argument_group("active learning")
    group.add_argument(
        "--strategies",
        default=DEFAULT_STRATEGIES,
        help=f"comma-separated, from {', '.join(available_strategies())} (default: %(default)s)",
    )
    group.add_argument(
        "--num-seeds",
        type=int,
        default=2,
        help="seeds --seed, --seed+1, ... (default: %(default)s)",
    )
    group.add_argument(
        "--rounds", type=int, default=5, help="queries after the initial set (default: %(default)s)"
    )
    group.add_argument(
        "--query-size", type=int, default=20, help="labels per query (default: %(default)s)"
    )
    group.add_argument(
        "--initial-size", type=int, default=20, help="random initial labels (default: %(default)s)"
    )
    group.add_argument(
        "--mc-samples", type=int, default=20, help="MC-dropout passes (default: %(default)s)"
    )
    group.add_argument(
        "--dropout",
        type=float,
        default=None,
        help=f"dropout before the last layer, for MC dropout (default: {DEFAULT_DROPOUT} for "
        f"{', '.join(DROPOUT_MODELS)} and embedding pools, else 0)",
    )
    group.add_argument(
        "--target-accuracy",
        type=float,
        default=0.9,
        help="report the labels needed to reach it (default: %(default)s)",
    )
    group.add_argument("--oracle", choices=("simulated", "file"), default="simulated")
    group.add_argument(
        "--oracle-dir",
        default=None,
        metavar="DIR",
        help="file oracle folder (default: OUT/runs/<strategy>/seed_<k>/oracle)",
    )
    group.add_argument(
        "--oracle-wait", type=float, default=0.0, metavar="S",
        help="file oracle: seconds to wait for answers before stopping cleanly (default: %(default)s)",
    )  # fmt: skip
    group.add_argument(
        "--embeddings",
        default=None,
        metavar="FILE",
        help="pool-scale mode: a torch file with 'pool' (N, D), 'pool_targets' (N,), 'test' (T, D), "
        "'test_targets' (T,) embeddings; a linear head is trained on them instead of a network",
    )
    group.add_argument(
        "--head-steps", type=int, default=200, help="embedding mode: Adam steps per round"
    )
    strategy = parser.add_argument_group("strategy options")
    strategy.add_argument(
        "--beta", type=float, default=1.0, help="density: representativeness exponent"
    )
    strategy.add_argument(
        "--density-references", type=int, default=20_000, help="density: pool samples averaged over"
    )
    strategy.add_argument("--coreset-metric", choices=("euclidean", "cosine"), default="euclidean")
    strategy.add_argument(
        "--clusters",
        type=int,
        default=None,
        help="cluster-margin: clusters (default: the query size)",
    )
    strategy.add_argument(
        "--margin-multiple", type=float, default=10.0, help="cluster-margin: candidates per label"
    )
    strategy.add_argument(
        "--batchbald-candidates", type=int, default=1000, help="batchbald: top-BALD candidates"
    )
    strategy.add_argument(
        "--batchbald-configs", type=int, default=512, help="batchbald: sampled label configurations"
    )


def strategy_params(args: argparse.Namespace) -> dict[str, Any]:
    """The constructor keywords of every strategy from the options (each takes its own)."""
    return {
        "beta": args.beta,
        "max_references": args.density_references,
        "metric": args.coreset_metric,
        "num_clusters": args.clusters,
        "margin_multiple": args.margin_multiple,
        "candidates": args.batchbald_candidates,
        "num_configs": args.batchbald_configs,
    }


def load_embedding_pool(path: str) -> dict[str, torch.Tensor]:
    """The tensors of an ``--embeddings`` file (``weights_only``), checked."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--embeddings file {file} not found")
    data = torch.load(file, map_location="cpu", weights_only=True)
    needed = ("pool", "pool_targets", "test", "test_targets")
    if not isinstance(data, dict) or any(k not in data for k in needed):
        raise ValueError(f"{file} must hold a dict with the tensors {needed}")
    return data


def _parse_strategies(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in available_strategies()]
    if not names or unknown:
        raise ValueError(
            f"--strategies must name strategies among {available_strategies()}, got {text!r}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"--strategies lists a strategy twice: {text!r}")
    return names


def _fingerprint(args: argparse.Namespace, config: TrainConfig, dropout: float) -> dict[str, Any]:
    train = {k: getattr(config, k) for k in ("epochs", "batch_size", "lr", "optimizer", "momentum",
                                             "weight_decay", "scheduler")}  # fmt: skip
    data = (
        {"embeddings": str(Path(args.embeddings).resolve()), "head_steps": args.head_steps}
        if args.embeddings
        else {
            "dataset": args.dataset,
            "split_seed": args.split_seed,
            "image_size": args.image_size,
            "model": args.model,
            "pretrained": args.pretrained,
            **train,
        }  # fmt: skip
    )
    return {**data, "dropout": dropout, "oracle": args.oracle}


def _check_args(args: argparse.Namespace) -> None:
    if args.num_seeds < 1:
        raise ValueError(f"--num-seeds must be >= 1, got {args.num_seeds}")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.oracle_wait < 0:
        raise ValueError(f"--oracle-wait must be >= 0, got {args.oracle_wait}")
    if args.oracle == "file" and args.embeddings:
        raise ValueError(
            "--oracle file needs images for its thumbnails; it does not work with --embeddings"
        )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """``labelkit run active``: every strategy x seed, the learning-curve table and plot."""
    tic = time.perf_counter()
    _check_args(args)
    strategies = _parse_strategies(args.strategies)
    config = replace(train_config(args), quiet=True)  # one line per round instead of per epoch
    seeds = list(range(args.seed, args.seed + args.num_seeds))
    active = ActiveConfig(
        args.rounds, args.query_size, args.initial_size, args.seed, args.mc_samples
    )
    out = run_dir(args, "active")
    extra: dict[str, Any]
    if args.embeddings:
        data = load_embedding_pool(args.embeddings)
        num_classes = int(max(data["pool_targets"].max(), data["test_targets"].max())) + 1
        dropout = DEFAULT_DROPOUT if args.dropout is None else args.dropout

        def make_learner(seed: int, folder: Path) -> Learner:
            return EmbeddingLearner(data["pool"], data["test"], data["test_targets"], num_classes,
                                    device=args.device, steps=args.head_steps, lr=args.lr,
                                    dropout=dropout, seed=seed)  # fmt: skip

        targets, class_names, images = (
            data["pool_targets"],
            [str(c) for c in range(num_classes)],
            None,
        )
        extra = {"dataset": {"embeddings": args.embeddings, "pool": list(data["pool"].shape)}}
    else:
        if args.dataset == "digits" and args.image_size is None:
            args.image_size = DIGITS_IMAGE_SIZE
        splits = load_data(args)
        default = DEFAULT_DROPOUT if args.model in DROPOUT_MODELS else 0.0
        dropout = default if args.dropout is None else args.dropout

        def make_learner(seed: int, folder: Path) -> Learner:
            return NetLearner(splits, args.model, replace(config, seed=seed), workdir=folder / "train",
                              dropout=dropout, pretrained=args.pretrained)  # fmt: skip

        targets, class_names = splits.train_eval.targets, splits.info.class_names
        images = splits.train_eval
        extra = {"dataset": dataset_summary(splits)}

    def make_oracle(seed: int, folder: Path) -> Oracle:
        if args.oracle == "simulated":
            return SimulatedOracle(targets)
        where = Path(args.oracle_dir) if args.oracle_dir else folder / "oracle"
        return FileOracle(
            where, lambda i: pool_image(images, i), class_names, wait_seconds=args.oracle_wait
        )

    title = f"active learning: {args.embeddings or args.dataset}"
    try:
        results = run_experiment(
            make_learner, make_oracle, strategies, seeds, active, out,
            strategy_params=strategy_params(args), fingerprint=_fingerprint(args, config, dropout),
            target_accuracy=args.target_accuracy, resume=args.resume, quiet=args.quiet,
            extra_results={**extra, "cli": vars(args), "data_seconds": time.perf_counter() - tic},
            title=title,
        )  # fmt: skip
    except AwaitingAnswers as waiting:
        print(f"labelkit: stopped cleanly: {waiting}")
        return {"status": "awaiting_answers", "missing": waiting.missing}
    print(f"active | {args.embeddings or args.dataset} | {len(seeds)} seed(s) | "
          f"{args.initial_size} + {args.rounds} x {args.query_size} labels")  # fmt: skip
    print(results["table"])
    print(f"results: {out / 'results.json'}  plots: {', '.join(results['plots'])}")
    return results


register_method(
    "active",
    run=run,
    add_arguments=add_arguments,
    help="pool-based active learning: uncertainty / similarity / combined strategies on our "
    "scoring ops, simulated or file oracle, resumable; learning curves over seeds",
)
