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

import argparse
import time
from dataclasses import replace
from typing import Any

from labelkit_ext.engine import TrainConfig
from labelkit_ext.methods.common import add_training_arguments, load_data, run_dir, train_config
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
    "run",
    "run_study",
    "summarize",
    "table1",
    "train_pretext",
    "train_scratch",
    "warp_views",
]

DEFAULTS = {
    "scratch_epochs": 15,  # --epochs: the supervised-from-scratch baseline
    "pretext_epochs": 8,
    "pretext_lr": 1e-3,
    "eval_epochs": 30,
    "eval_lr": 1e-3,
    "batch_size": 128,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_training_arguments(
        parser, epochs=DEFAULTS["scratch_epochs"], batch_size=DEFAULTS["batch_size"]
    )
    group = parser.add_argument_group(
        "pretext", "pretext training (Adam, cosine; --batch-size, --device etc. are shared)"
    )
    group.add_argument(
        "--task",
        default="all",
        choices=[*PRETEXT_TASKS, "all"],
        help="pretext task(s) to train and evaluate (default: %(default)s)",
    )
    group.add_argument("--pretext-epochs", type=int, default=DEFAULTS["pretext_epochs"],
                       help="default: %(default)s")  # fmt: skip
    group.add_argument("--pretext-lr", type=float, default=DEFAULTS["pretext_lr"],
                       help="default: %(default)s")  # fmt: skip
    group.add_argument(
        "--grid",
        type=int,
        default=3,
        help="jigsaw/context cells per side (odd for context; default 3)",
    )
    group.add_argument(
        "--tile-size",
        type=int,
        default=None,
        metavar="PX",
        help="jigsaw tile / context patch side (default: cell minus a quarter-cell gap, >= 2 px; "
        "7 px at 28 px, 64 px at 255 px)",
    )
    group.add_argument("--permutations", type=int, default=100,
                       help="jigsaw classes: maximal-Hamming permutations (default: %(default)s)")  # fmt: skip
    group.add_argument("--no-jitter", dest="jitter", action="store_false",
                       help="tiles centred in their cells instead of randomly placed")  # fmt: skip
    group.add_argument("--no-tile-normalize", dest="normalize_tiles", action="store_false",
                       help="no per-tile standardisation of jigsaw tiles / context patches")  # fmt: skip
    group.add_argument("--all-rotations", action="store_true",
                       help="rotation: each image at all 4 angles per batch (4x the cost)")  # fmt: skip
    group.add_argument("--temperature", type=float, default=0.5, help="NT-Xent temperature")
    group = parser.add_argument_group("linear evaluation")
    group.add_argument("--eval-epochs", type=int, default=DEFAULTS["eval_epochs"],
                       help="head epochs on the frozen backbone (default: %(default)s)")  # fmt: skip
    group.add_argument("--eval-lr", type=float, default=DEFAULTS["eval_lr"],
                       help="head learning rate, Adam (default: %(default)s)")  # fmt: skip
    group.add_argument("--hidden", type=int, default=256, help="hidden width of the heads")
    group.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        default=list(DEFAULT_FRACTIONS),
        metavar="F",
        help="shares of the training labels to evaluate with (default: 0.01 0.1 1)",
    )
    group.add_argument("--num-seeds", type=int, default=1,
                       help="seeds --seed, --seed+1, ...; tables give mean ± std (default: 1)")  # fmt: skip
    group.add_argument(
        "--min-steps",
        type=int,
        default=200,
        help="raise epochs so every head / scratch run takes at least this many steps",
    )
    group.add_argument("--no-balance", dest="balanced", action="store_false",
                       help="plain cross-entropy instead of class-balanced weights")  # fmt: skip
    group.add_argument("--no-random-baseline", dest="random_baseline", action="store_false")
    group.add_argument("--no-scratch-baseline", dest="scratch_baseline", action="store_false")


def _check_args(args: argparse.Namespace) -> None:
    for name in ("pretext_epochs", "eval_epochs", "num_seeds", "hidden"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.min_steps < 0:
        raise ValueError(f"--min-steps must be >= 0, got {args.min_steps}")
    for name in ("pretext_lr", "eval_lr"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")


def _settings(args: argparse.Namespace) -> PretextSettings:
    return PretextSettings(
        grid=args.grid,
        tile_size=args.tile_size,
        num_permutations=args.permutations,
        jitter=args.jitter,
        normalize_tiles=args.normalize_tiles,
        all_rotations=args.all_rotations,
        hidden=args.hidden,
        temperature=args.temperature,
    )


def _adam(config: TrainConfig, epochs: int, lr: float) -> TrainConfig:
    return replace(config, epochs=epochs, lr=lr, optimizer="adam", weight_decay=1e-4)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """``labelkit run pretext``: pretext training, linear evaluation over label fractions and
    seeds, baselines; writes results.json and plots and prints Table 1 and the fraction table."""
    tic = time.perf_counter()
    _check_args(args)
    settings = _settings(args)
    tasks = list(PRETEXT_TASKS) if args.task == "all" else [args.task]
    splits = load_data(args)
    if {"jigsaw", "context"} & set(tasks):
        settings.tile_for(splits.info.image_size)  # a clear error before any training
    out = run_dir(args, "pretext")
    config = train_config(args)
    fitted = run_study(
        splits,
        tasks=tasks,
        model=args.model,
        seeds=[args.seed + i for i in range(args.num_seeds)],
        fractions=args.fractions,
        pretext_config=_adam(config, args.pretext_epochs, args.pretext_lr),
        eval_config=_adam(config, args.eval_epochs, args.eval_lr),
        scratch_config=config,
        settings=settings,
        hidden=args.hidden,
        balanced=args.balanced,
        min_steps=args.min_steps,
        random_baseline=args.random_baseline,
        scratch_baseline=args.scratch_baseline,
        pretrained=args.pretrained,
        out_dir=out,
        resume=args.resume,
        quiet=args.quiet,
        cli_args=vars(args),
        data_seconds=time.perf_counter() - tic,
    )
    summary = fitted.results["summary"]
    fraction = summary["table1_fraction"]
    print(
        f"\npretext | {args.dataset} | {args.model} | pretext {args.pretext_epochs} epochs, "
        f"head {args.eval_epochs} epochs, scratch {args.epochs} epochs | "
        f"{args.num_seeds} seed(s), test split\n\n"
        f"linear evaluation with {fraction:.0%} of the labels (the original's Table 1)\n"
        f"{table1(summary)}\n\n"
        f"test AUC % by share of labels\n{fractions_table(summary, 'auc')}\n\n"
        f"test accuracy % by share of labels\n{fractions_table(summary, 'accuracy')}"
    )
    print(f"results: {out / 'results.json'}  plots: {', '.join(fitted.results.get('plots', []))}")
    return fitted.results


register_method(
    "pretext",
    run=run,
    add_arguments=add_arguments,
    help="self-supervised pretext tasks (rotation, jigsaw, context, contrastive) on unlabeled "
    "images, then linear evaluation of the frozen backbone over label fractions",
)
