"""``pretext``: self-supervised pretext tasks on (chest X-ray) images, with linear evaluation.

Rotation (0/90/180/270), jigsaw (9 shuffled tiles, which of N maximal-Hamming permutations),
context (which of the 8 neighbours a patch is, relative to the center patch; siamese) and a
contrastive task (SimCLR's NT-Xent over two augmented views) each train a backbone on the
training images without labels; batches are built on the device by ``make_pretext_batch``.
Each backbone is then frozen and a two-dense-layer head is trained on 1 % / 10 % / 100 % of the
labels, against a randomly initialised backbone and the network trained from scratch on the same
labels. See docs/methods/pretext.md.
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
from labelkit_ext.methods.pretext.evaluation import (
    EvalResult,
    balanced_loss,
    epochs_for,
    extract_features,
    label_fraction_indices,
    linear_eval,
    train_scratch,
)
from labelkit_ext.methods.pretext.networks import (
    Backbone,
    FrozenBackbone,
    LinearEvalModel,
    PretextNet,
    build_backbone,
    eval_head,
)
from labelkit_ext.methods.pretext.pipeline import (
    BACKBONE_FILE,
    DEFAULT_FRACTIONS,
    PRETRAINED,
    RANDOM,
    SUPERVISED,
    StudyFit,
    run_study,
)
from labelkit_ext.methods.pretext.report import (
    fractions_table,
    percent,
    plot_context_pair,
    plot_jigsaw_batch,
    summarize,
    table1,
)
from labelkit_ext.methods.pretext.tasks import (
    PRETEXT_TASKS,
    PretextSettings,
    build_pretext_net,
    contrastive_views,
    default_tile_size,
    jigsaw_permutations,
    make_batch,
    nt_xent,
    pretext_step,
    warp_views,
)
from labelkit_ext.methods.pretext.training import PretextFit, evaluate_pretext, train_pretext
from labelkit_ext.methods.registry import register_method
from labelkit_ext.models import MODELS, available_models

__all__ = [
    "BACKBONE_FILE",
    "DEFAULT_FRACTIONS",
    "PRETEXT_TASKS",
    "PRETRAINED",
    "RANDOM",
    "SUPERVISED",
    "Backbone",
    "EvalResult",
    "FrozenBackbone",
    "LinearEvalModel",
    "PretextFit",
    "PretextNet",
    "PretextSettings",
    "StudyFit",
    "balanced_loss",
    "build_backbone",
    "build_pretext_net",
    "contrastive_views",
    "default_tile_size",
    "epochs_for",
    "eval_head",
    "evaluate_pretext",
    "extract_features",
    "jigsaw_permutations",
    "fractions_table",
    "label_fraction_indices",
    "linear_eval",
    "make_batch",
    "nt_xent",
    "plot_context_pair",
    "plot_jigsaw_batch",
    "pretext_step",
    "run_pretext",
    "run_study",
    "summarize",
    "table1",
    "train_pretext",
    "train_scratch",
    "warp_views",
]


@dataclass
class PretextRunConfig:
    """``labelkit run pretext``: its options are these fields. ``train`` is the supervised-
    from-scratch baseline's training; its batch size, device etc. are shared by every stage."""

    data: DataConfig = option(factory=lambda: DataConfig(dataset="pneumoniamnist"), help="data")
    model: str = option("small-cnn", "backbone network", choices=available_models)
    pretrained: str | None = option(
        None, "also evaluate a backbone with these weights (e.g. ImageNet), from a local file",
        metavar="FILE",
    )  # fmt: skip
    train: TrainConfig = option(
        factory=lambda: TrainConfig(epochs=15, batch_size=128),
        help="training (epochs: the supervised-from-scratch baseline)",
    )
    task: str = option(
        "all", "pretext task(s) to train and evaluate", choices=[*PRETEXT_TASKS, "all"]
    )
    pretext_epochs: int = option(8, "pretext training epochs (Adam, cosine)")
    pretext_lr: float = option(1e-3, "pretext learning rate (Adam)")
    grid: int = option(3, "jigsaw/context cells per side (odd for context)")
    tile_size: int | None = option(
        None,
        "jigsaw tile / context patch side, >= 1 and at most a cell (image size // grid) "
        "(default: cell minus a quarter-cell gap, >= 2 px; 7 px at 28 px, 64 px at 255 px)",
        metavar="PX",
    )
    permutations: int = option(
        100,
        "jigsaw classes: maximal-Hamming permutations, at most (grid^2)! (362,880 for grid 3; "
        "100,000 from grid 4)",
    )
    jitter: bool = option(True, "tiles placed randomly in their cells (else centred)")
    tile_normalize: bool = option(
        True, "per-tile standardisation of jigsaw tiles / context patches"
    )
    all_rotations: bool = option(
        False, "rotation: each image at all 4 angles per batch (4x the cost)"
    )
    temperature: float = option(0.5, "NT-Xent temperature")
    eval_epochs: int = option(30, "linear evaluation: head epochs on the frozen backbone")
    eval_lr: float = option(1e-3, "linear evaluation: head learning rate (Adam)")
    hidden: int = option(256, "hidden width of the heads")
    fractions: tuple[float, ...] = option(
        tuple(DEFAULT_FRACTIONS), "shares of the training labels to evaluate with", metavar="F"
    )
    num_seeds: int = option(1, "seeds seed, seed+1, ...; tables give mean ± std")
    min_steps: int = option(200, "raise epochs so every head / scratch run takes this many steps")
    balance: bool = option(True, "class-balanced cross-entropy weights")
    random_baseline: bool = option(True, "evaluate a randomly initialised backbone")
    scratch_baseline: bool = option(True, "train the supervised-from-scratch baseline")

    def __post_init__(self) -> None:
        check_fields(self)
        check_run_config(self)
        for name in ("pretext_epochs", "eval_epochs", "num_seeds", "hidden"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.min_steps < 0:
            raise UsageError(f"min_steps must be >= 0, got {self.min_steps}")
        for name in ("pretext_lr", "eval_lr"):
            if getattr(self, name) <= 0:
                raise UsageError(f"{name} must be > 0, got {getattr(self, name)}")
        for f in self.fractions:
            if not 0 < f <= 1:
                raise UsageError(f"fractions must be in (0, 1], got {f}")
        settings = self.settings()  # its own checks, before any data is loaded
        if "context" in self.tasks() and self.grid % 2 == 0:
            raise UsageError(f"the context task needs an odd --grid, got {self.grid}")
        if self.data.image_size is not None:
            self.check_tiles(settings, self.data.image_size)

    def check_tiles(self, settings: PretextSettings, image_size: int) -> None:
        """The jigsaw / context tiles fit the grid on ``image_size`` px images, and the
        backbone takes tiles that small; nothing to check for the other tasks."""
        if not {"jigsaw", "context"} & set(self.tasks()):
            return
        tile = settings.tile_for(image_size)
        least = MODELS[self.model].min_image_size
        if tile < least:
            raise UsageError(
                f"the jigsaw/context tiles are {tile} px, but model {self.model!r} needs inputs "
                f"of at least {least} px: raise --tile-size / --image-size, lower --grid, or "
                "choose another --model or --task"
            )

    def settings(self) -> PretextSettings:
        return PretextSettings(
            grid=self.grid,
            tile_size=self.tile_size,
            num_permutations=self.permutations,
            jitter=self.jitter,
            normalize_tiles=self.tile_normalize,
            all_rotations=self.all_rotations,
            hidden=self.hidden,
            temperature=self.temperature,
        )

    def tasks(self) -> list[str]:
        return list(PRETEXT_TASKS) if self.task == "all" else [self.task]


def _adam(config: TrainConfig, epochs: int, lr: float) -> TrainConfig:
    return replace(config, epochs=epochs, lr=lr, optimizer="adam", weight_decay=1e-4)


def run_pretext(
    config: PretextRunConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    resume: bool = False,
) -> dict[str, Any]:
    """Pretext training, linear evaluation over label fractions and seeds, baselines;
    results.json, plots, Table 1 and the fraction table (``out_dir`` default
    ``runs/pretext-<dataset>``)."""
    started = time.perf_counter()
    config = config or PretextRunConfig()
    settings, tasks, train = config.settings(), config.tasks(), config.train
    out = prepare_run_dir("pretext", config.data, out_dir)
    splits = load_data(config.data)
    config.check_tiles(settings, splits.info.image_size)  # a clear error before any training
    data_seconds = time.perf_counter() - started
    fitted = run_study(
        splits,
        tasks=tasks,
        model=config.model,
        seeds=[train.seed + i for i in range(config.num_seeds)],
        fractions=config.fractions,
        pretext_config=_adam(train, config.pretext_epochs, config.pretext_lr),
        eval_config=_adam(train, config.eval_epochs, config.eval_lr),
        scratch_config=train,
        settings=settings,
        hidden=config.hidden,
        balanced=config.balance,
        min_steps=config.min_steps,
        random_baseline=config.random_baseline,
        scratch_baseline=config.scratch_baseline,
        pretrained=config.pretrained,
        out_dir=out,
        resume=resume,
        quiet=train.quiet,
    )
    results = fitted.results
    results["config"]["run"] = asdict(config)
    results["timings"]["data_seconds"] = data_seconds
    write_results(out, results, started)  # adds the run's settings and data time
    summary = results["summary"]
    fraction = summary["table1_fraction"]
    if current_dist().is_main:
        print(
            f"\npretext | {config.data.dataset} | {config.model} | pretext "
            f"{config.pretext_epochs} epochs, head {config.eval_epochs} epochs, scratch "
            f"{train.epochs} epochs | {config.num_seeds} seed(s), test split\n\n"
            f"linear evaluation with {percent(fraction)} of the labels (the original's Table 1)\n"
            f"{table1(summary)}\n\n"
            f"test AUC % by share of labels\n{fractions_table(summary, 'auc')}\n\n"
            f"test accuracy % by share of labels\n{fractions_table(summary, 'accuracy')}"
        )
        print(f"results: {out / 'results.json'}  plots: {', '.join(results.get('plots', []))}")
    return results


register_method(
    "pretext",
    config=PretextRunConfig,
    run=run_pretext,
    help="self-supervised pretext tasks (rotation, jigsaw, context, contrastive) on unlabeled "
    "images, then linear evaluation of the frozen backbone over label fractions",
)
