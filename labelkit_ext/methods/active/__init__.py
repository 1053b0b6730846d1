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

import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from labelkit_ext.checks import check_fields
from labelkit_ext.engine import TrainConfig, current_dist, option
from labelkit_ext.errors import MissingFileError, UsageError, reading
from labelkit_ext.methods.active.experiment import run_experiment, run_folder
from labelkit_ext.methods.active.learners import (
    DROPOUT_MODELS,
    EmbeddingLearner,
    LabeledSubset,
    Learner,
    NetLearner,
    mc_dropout_modules,
)
from labelkit_ext.methods.active.loop import (
    STEPS,
    ActiveConfig,
    ActiveLoop,
    check_pool,
    initial_indices,
)
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
    DataConfig,
    check_run_config,
    dataset_summary,
    load_data,
    prepare_run_dir,
)
from labelkit_ext.methods.registry import register_method
from labelkit_ext.models import available_models

__all__ = [
    "DROPOUT_MODELS",
    "STEPS",
    "ActiveConfig",
    "ActiveLoop",
    "ActiveRunConfig",
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
    "run_active",
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


@dataclass
class ActiveRunConfig:
    """``labelkit run active``: its options are these fields."""

    data: DataConfig = option(
        factory=DataConfig,
        help="data",
        helps={
            "image_size": f"model input size (default: the data set's own; digits "
            f"{DIGITS_IMAGE_SIZE} here, its 8x8 scans upsampled)"
        },
    )
    model: str = option("small-cnn", "network", choices=available_models)
    pretrained: str | None = option(None, "initial weights from a local file", metavar="FILE")
    train: TrainConfig = option(
        factory=lambda: TrainConfig(epochs=DEFAULT_EPOCHS, batch_size=DEFAULT_BATCH_SIZE),
        help="training of the learner every round",
    )
    strategies: str = option(
        DEFAULT_STRATEGIES,
        f"comma- or space-separated, from {', '.join(available_strategies())}",
        join=",",
    )
    num_seeds: int = option(2, "seeds seed, seed+1, ...")
    rounds: int = option(5, "queries after the initial set")
    query_size: int = option(20, "labels per query")
    initial_size: int = option(20, "random initial labels")
    mc_samples: int = option(20, "MC-dropout passes")
    dropout: float | None = option(
        None,
        f"dropout before the last layer, for MC dropout (default: {DEFAULT_DROPOUT} for "
        f"{', '.join(DROPOUT_MODELS)} and embedding pools, else 0)",
    )
    target_accuracy: float = option(0.9, "report the labels needed to reach it")
    oracle: str = option("simulated", "who answers the queries", choices=("simulated", "file"))
    oracle_dir: str | None = option(
        None, "file oracle folder (default: OUT/runs/<strategy>/seed_<k>/oracle)", metavar="DIR"
    )
    oracle_wait: float = option(
        0.0, "file oracle: seconds to wait for answers before stopping cleanly", metavar="S"
    )
    embeddings: str | None = option(
        None,
        "pool-scale mode: a torch file with 'pool' (N, D), 'pool_targets' (N,), 'test' (T, D), "
        "'test_targets' (T,) embeddings; a linear head is trained on them instead of a network",
        metavar="FILE",
    )
    head_steps: int = option(200, "embedding mode: Adam steps per round")
    beta: float = option(1.0, "density: representativeness exponent")
    density_references: int = option(20_000, "density: pool samples averaged over")
    coreset_metric: str = option("euclidean", "core-set distance", choices=("euclidean", "cosine"))
    clusters: int | None = option(None, "cluster-margin: clusters (default: the query size)")
    margin_multiple: float = option(10.0, "cluster-margin: candidates per label")
    batchbald_candidates: int = option(1000, "batchbald: top-BALD candidates")
    batchbald_configs: int = option(512, "batchbald: sampled label configurations")

    def __post_init__(self) -> None:
        check_fields(self)
        check_run_config(self, self.data_config().image_size)
        # The strategies check their parameters too, under their own names (num_clusters,
        # max_references...): check the options first, by the names the user typed.
        for name in ("num_seeds", "query_size", "initial_size", "mc_samples", "head_steps",
                     "density_references", "batchbald_candidates", "batchbald_configs"):  # fmt: skip
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.clusters is not None and self.clusters < 1:
            raise UsageError(f"clusters must be >= 1, got {self.clusters}")
        if self.rounds < 0:
            raise UsageError(f"rounds must be >= 0, got {self.rounds}")
        if self.beta < 0:
            raise UsageError(f"beta must be >= 0, got {self.beta}")
        if self.margin_multiple < 1:
            raise UsageError(f"margin_multiple must be >= 1, got {self.margin_multiple}")
        if not 0 < self.target_accuracy <= 1:
            raise UsageError(f"target_accuracy must be in (0, 1], got {self.target_accuracy}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise UsageError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.oracle_wait < 0:
            raise UsageError(f"oracle_wait must be >= 0, got {self.oracle_wait}")
        if self.oracle == "file" and self.embeddings:
            raise UsageError(
                "oracle 'file' needs images for its thumbnails; it does not work with embeddings"
            )
        self.strategy_names()

    def data_config(self) -> DataConfig:
        """``data`` with this method's own default input size (digits: 16 px)."""
        return self.data.sized({"digits": DIGITS_IMAGE_SIZE})

    def strategy_names(self) -> list[str]:
        names = [s.strip() for s in self.strategies.split(",") if s.strip()]
        unknown = [s for s in names if s not in available_strategies()]
        if not names or unknown:
            raise UsageError(
                f"strategies must name strategies among {available_strategies()}, "
                f"got {self.strategies!r}"
            )
        if len(set(names)) != len(names):
            raise UsageError(f"strategies lists a strategy twice: {self.strategies!r}")
        return names

    def strategy_params(self) -> dict[str, Any]:
        """The constructor keywords of every strategy (each takes its own)."""
        return {
            "beta": self.beta,
            "max_references": self.density_references,
            "metric": self.coreset_metric,
            "num_clusters": self.clusters,
            "margin_multiple": self.margin_multiple,
            "candidates": self.batchbald_candidates,
            "num_configs": self.batchbald_configs,
        }


def load_embedding_pool(path: str) -> dict[str, torch.Tensor]:
    """The tensors of an ``--embeddings`` file (``weights_only``), checked."""
    file = Path(path)
    if not file.is_file():
        raise MissingFileError(f"embeddings file {file} not found")
    with reading(
        file, "embeddings: a torch file with 'pool', 'pool_targets', 'test', 'test_targets'"
    ):
        data = torch.load(file, map_location="cpu", weights_only=True)
    needed = ("pool", "pool_targets", "test", "test_targets")
    if not isinstance(data, dict) or any(k not in data for k in needed):
        raise UsageError(f"{file} must hold a dict with the tensors {needed}")
    for name in needed:
        if not isinstance(data[name], torch.Tensor):
            raise UsageError(f"{file}: {name!r} must be a tensor, got {type(data[name]).__name__}")
    for rows, targets in (("pool", "pool_targets"), ("test", "test_targets")):
        _check_targets(file, data[rows], data[targets], rows, targets)
    return data


def _check_targets(
    file: Path, rows: torch.Tensor, targets: torch.Tensor, rows_name: str, targets_name: str
) -> None:
    """One integer class >= 0 per embedding row (the oracle answers with them by row index)."""
    if targets.ndim != 1 or targets.is_floating_point() or targets.is_complex():
        raise UsageError(
            f"{file}: {targets_name!r} must be a 1-D integer tensor, got {targets.dtype} "
            f"of shape {tuple(targets.shape)}"
        )
    if rows.ndim < 1 or len(targets) != len(rows):
        raise UsageError(
            f"{file}: {len(rows) if rows.ndim else 0} {rows_name} embeddings but "
            f"{len(targets)} {targets_name}: one class per row"
        )
    if len(targets) and int(targets.min()) < 0:
        raise UsageError(f"{file}: {targets_name!r} holds a negative class ({int(targets.min())})")


def _fingerprint(config: ActiveRunConfig, data: DataConfig, dropout: float) -> dict[str, Any]:
    t = config.train
    train = {k: getattr(t, k) for k in ("epochs", "batch_size", "lr", "optimizer", "momentum",
                                        "weight_decay", "scheduler")}  # fmt: skip
    fields = (
        {"embeddings": str(Path(config.embeddings).resolve()), "head_steps": config.head_steps}
        if config.embeddings
        else {
            "dataset": data.dataset,
            "split_seed": data.split_seed,
            "image_size": data.image_size,
            "model": config.model,
            "pretrained": config.pretrained,
            **train,
            **_changed_defaults(data, ("val_fraction", "augment")),
            # each worker draws its own augmentation: another count trains other rounds
            **_changed_defaults(t, ("num_workers",)),
        }  # fmt: skip
    )
    return {**fields, "dropout": dropout, "oracle": config.oracle}


def _changed_defaults(config: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """The fields ``names`` of ``config`` that are not their defaults: part of the fingerprint
    (a resume with others is refused) without changing the fingerprint of states saved before
    they were recorded, which then resume as before."""
    defaults = type(config)()
    return {k: getattr(config, k) for k in names if getattr(config, k) != getattr(defaults, k)}


def run_active(
    config: ActiveRunConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    resume: bool = False,
) -> dict[str, Any]:
    """Every strategy x seed, the learning-curve table and plot (``out_dir`` default
    ``runs/active-<dataset>``); a file oracle without answers yet stops cleanly."""
    started = time.perf_counter()
    config = config or ActiveRunConfig()
    strategies = config.strategy_names()
    train = replace(config.train, quiet=True)  # one line per round instead of per epoch
    seeds = list(range(config.train.seed, config.train.seed + config.num_seeds))
    active = ActiveConfig(config.rounds, config.query_size, config.initial_size,
                          config.train.seed, config.mc_samples)  # fmt: skip
    data_config = config.data_config()
    out = prepare_run_dir("active", data_config, out_dir)
    extra: dict[str, Any]
    if config.embeddings:
        data = load_embedding_pool(config.embeddings)
        num_classes = int(max(data["pool_targets"].max(), data["test_targets"].max())) + 1
        dropout = DEFAULT_DROPOUT if config.dropout is None else config.dropout

        def make_learner(seed: int, folder: Path) -> Learner:
            return EmbeddingLearner(data["pool"], data["test"], data["test_targets"], num_classes,
                                    device=train.device, steps=config.head_steps, lr=train.lr,
                                    dropout=dropout, seed=seed)  # fmt: skip

        targets, class_names, images = (
            data["pool_targets"],
            [str(c) for c in range(num_classes)],
            None,
        )
        extra = {"dataset": {"embeddings": config.embeddings, "pool": list(data["pool"].shape)}}
    else:
        splits = load_data(data_config)
        default = DEFAULT_DROPOUT if config.model in DROPOUT_MODELS else 0.0
        dropout = default if config.dropout is None else config.dropout

        def make_learner(seed: int, folder: Path) -> Learner:
            return NetLearner(splits, config.model, replace(train, seed=seed),
                              workdir=folder / "train", dropout=dropout,
                              pretrained=config.pretrained)  # fmt: skip

        targets, class_names = splits.train_eval.targets, splits.info.class_names
        images = splits.train_eval
        extra = {"dataset": dataset_summary(splits)}

    check_pool(active, len(targets))  # now that the pool is known, before any training
    if "cluster-margin" in strategies and (config.clusters or 0) > len(targets):
        raise UsageError(
            f"clusters ({config.clusters:,}) is more than the pool ({len(targets):,} images): "
            "cluster-margin clusters the pool; lower --clusters"
        )

    def make_oracle(seed: int, folder: Path) -> Oracle:
        if config.oracle == "simulated":
            return SimulatedOracle(targets)
        where = Path(config.oracle_dir) if config.oracle_dir else folder / "oracle"
        return FileOracle(where, lambda i: pool_image(images, i), class_names,
                          wait_seconds=config.oracle_wait)  # fmt: skip

    name = config.embeddings or data_config.dataset
    extra |= {"run_config": asdict(config), "data_seconds": time.perf_counter() - started}
    try:
        results = run_experiment(
            make_learner, make_oracle, strategies, seeds, active, out,
            strategy_params=config.strategy_params(),
            fingerprint=_fingerprint(config, data_config, dropout),
            target_accuracy=config.target_accuracy, resume=resume, quiet=config.train.quiet,
            extra_results=extra, title=f"active learning: {name}",
        )  # fmt: skip
    except AwaitingAnswers as waiting:
        if current_dist().is_main:
            print(f"labelkit: stopped cleanly: {waiting}")
        return {"status": "awaiting_answers", "missing": waiting.missing}
    if current_dist().is_main:
        print(f"active | {name} | {len(seeds)} seed(s) | "
              f"{config.initial_size} + {config.rounds} x {config.query_size} labels")  # fmt: skip
        print(results["table"])
        print(f"results: {out / 'results.json'}  plots: {', '.join(results['plots'])}")
    return results


register_method(
    "active",
    config=ActiveRunConfig,
    run=run_active,
    help="pool-based active learning: uncertainty / similarity / combined strategies on our "
    "scoring ops, simulated or file oracle, resumable; learning curves over seeds",
)
