"""``stn-augment``: STN auto-augmentation with max-entropy and adversarial losses.

Stage 1 trains the classifier with cross-entropy. Stage 2 freezes it and trains a spatial
transformer (localisation net -> theta -> ``affine_grid_sample``) to produce warps the
classifier finds hard (maximising the max-entropy loss of its predictions), against a
discriminator that separates original from warped images. Stage 3 drops the discriminator
and fine-tunes the classifier on batches mixing originals and the augmenter's outputs.

Variants: the original (free theta + discriminator), theta regularisation (a penalty on
||theta - I|| beyond a radius, or a bounded rotation/scale/shear/translation
parameterisation), no discriminator, and two baselines with the same fine-tuning steps:
random affine warps over the same ranges, and no affine augmentation. Collapse is measured:
the distribution of ||theta - I|| and of the warped images' entropy during stage 2.
See docs/methods/stn-augment.md.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from typing import Any

from labelkit_ext.engine import current_dist
from labelkit_ext.methods.common import add_training_arguments, load_data, run_dir, train_config
from labelkit_ext.methods.registry import register_method
from labelkit_ext.methods.stn_augment.pipeline import (
    DEFAULT_FINETUNE_EPOCHS,
    DEFAULT_FINETUNE_LR,
    DEFAULT_MIX,
    StnAugmentFit,
    fit_stn_augment,
)
from labelkit_ext.methods.stn_augment.report import (
    COLLAPSE_DEVIATION,
    summary_rows,
    summary_table,
)
from labelkit_ext.methods.stn_augment.training import (
    AugmentConfig,
    AugmenterFit,
    frozen,
    probe_images,
    train_augmenter,
    warp_statistics,
)
from labelkit_ext.methods.stn_augment.variants import (
    DEFAULT_VARIANTS,
    VARIANTS,
    MixedAugmentation,
    Variant,
    build_augmenter,
    build_discriminator,
    check_variants,
)
from labelkit_ext.nn.stn import AffineBounds

__all__ = [
    "COLLAPSE_DEVIATION",
    "DEFAULT_VARIANTS",
    "VARIANTS",
    "AugmentConfig",
    "AugmenterFit",
    "MixedAugmentation",
    "StnAugmentFit",
    "Variant",
    "build_augmenter",
    "build_discriminator",
    "check_variants",
    "fit_stn_augment",
    "frozen",
    "probe_images",
    "run",
    "summary_rows",
    "summary_table",
    "train_augmenter",
    "warp_statistics",
]

DEFAULT_EPOCHS = 15
DEFAULT_NUM_SEEDS = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_training_arguments(parser, epochs=DEFAULT_EPOCHS)
    group = parser.add_argument_group("stn-augment")
    defaults = AugmentConfig()
    bounds = AffineBounds()
    group.add_argument(
        "--variants",
        nargs="+",
        default=list(DEFAULT_VARIANTS),
        choices=list(VARIANTS),
        metavar="NAME",
        help=f"variants to compare (default: all: {' '.join(DEFAULT_VARIANTS)})",
    )
    group.add_argument(
        "--num-seeds",
        type=int,
        default=DEFAULT_NUM_SEEDS,
        help="seeds --seed, --seed+1, ... (default: %(default)s); the table shows mean ± std",
    )
    group.add_argument("--aug-epochs", type=int, default=defaults.epochs,
                       help="stage-2 epochs (default: %(default)s)")  # fmt: skip
    group.add_argument("--aug-lr", type=float, default=defaults.lr,
                       help="stage-2 Adam learning rate of the augmenter (default: %(default)s)")  # fmt: skip
    group.add_argument("--disc-lr", type=float, default=defaults.disc_lr,
                       help="stage-2 Adam learning rate of the discriminator (default: %(default)s)")  # fmt: skip
    group.add_argument("--lambda-me", type=float, default=defaults.lambda_me,
                       help="weight of the max-entropy loss (default: %(default)s, the original's)")  # fmt: skip
    group.add_argument("--penalty-weight", type=float, default=defaults.penalty_weight,
                       help="stn-penalty: weight of relu(||theta - I|| - radius)^2 (default: %(default)s)")  # fmt: skip
    group.add_argument("--penalty-radius", type=float, default=defaults.penalty_radius,
                       help="stn-penalty: free radius around the identity (default: %(default)s)")  # fmt: skip
    group.add_argument("--finetune-epochs", type=int, default=DEFAULT_FINETUNE_EPOCHS,
                       help="stage-3 epochs, the same for every variant (default: %(default)s)")  # fmt: skip
    group.add_argument("--finetune-lr", type=float, default=DEFAULT_FINETUNE_LR,
                       help="stage-3 learning rate (default: %(default)s)")  # fmt: skip
    group.add_argument("--mix", type=float, default=DEFAULT_MIX,
                       help="share of each stage-3 batch replaced by augmented images (default: %(default)s)")  # fmt: skip
    group.add_argument("--probe-size", type=int, default=defaults.probe_size,
                       help="validation images whose warps are measured (default: %(default)s)")  # fmt: skip
    group.add_argument("--max-rotation", type=float, default=bounds.rotation,
                       help="bounds, degrees (default: %(default)s)")  # fmt: skip
    group.add_argument("--max-scale", type=float, default=bounds.scale,
                       help="bounds: scale factors in [1-s, 1+s] (default: %(default)s)")  # fmt: skip
    group.add_argument("--max-shear", type=float, default=bounds.shear,
                       help="bounds (default: %(default)s)")  # fmt: skip
    group.add_argument("--max-translation", type=float, default=bounds.translation,
                       help="bounds, normalised units, 2 = the full width (default: %(default)s)")  # fmt: skip


def _print_report(fitted: StnAugmentFit, args: argparse.Namespace) -> None:
    results = fitted.results
    seeds = results["config"]["seeds"]
    timings = results["timings"]
    print(
        "\n\n".join(
            [
                f"stn-augment | {args.dataset} | {args.model} | stage 1 {args.epochs} epochs, "
                f"stage 2 {args.aug_epochs} epochs, stage 3 {args.finetune_epochs} epochs | "
                f"seeds {seeds}",
                summary_table(results["table"]),
                f"collapsed: median ||theta - I|| of the final warps < {COLLAPSE_DEVIATION}; "
                f"total {timings.get('total_seconds', 0.0):.0f}s",
            ]
        )
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """``labelkit run stn-augment``: the three stages for every seed and variant; writes
    results.json and plots and prints the table."""
    tic = time.perf_counter()
    if args.num_seeds < 1:
        raise ValueError(f"--num-seeds must be >= 1, got {args.num_seeds}")
    if args.finetune_epochs < 1:
        raise ValueError(f"--finetune-epochs must be >= 1, got {args.finetune_epochs}")
    if args.finetune_lr <= 0:
        raise ValueError(f"--finetune-lr must be > 0, got {args.finetune_lr}")
    config = train_config(args)
    augment_config = AugmentConfig(
        epochs=args.aug_epochs,
        batch_size=args.batch_size,
        lr=args.aug_lr,
        disc_lr=args.disc_lr,
        lambda_me=args.lambda_me,
        penalty_weight=args.penalty_weight,
        penalty_radius=args.penalty_radius,
        device=args.device,
        amp=args.amp,
        probe_size=args.probe_size,
        quiet=args.quiet,
    )
    bounds = AffineBounds(args.max_rotation, args.max_scale, args.max_shear, args.max_translation)
    splits = load_data(args)
    out = run_dir(args, "stn-augment")
    fitted = fit_stn_augment(
        splits,
        model=args.model,
        config=config,
        finetune_config=replace(config, epochs=args.finetune_epochs, lr=args.finetune_lr),
        augment_config=augment_config,
        variants=args.variants,
        seeds=list(range(args.seed, args.seed + args.num_seeds)),
        bounds=bounds,
        mix=args.mix,
        pretrained=args.pretrained,
        out_dir=out,
        resume=args.resume,
        cli_args=vars(args),
        data_seconds=time.perf_counter() - tic,
    )
    if current_dist().is_main:
        _print_report(fitted, args)
        print(
            f"results: {out / 'results.json'}  plots: {', '.join(fitted.results.get('plots', []))}"
        )
    return fitted.results


register_method(
    "stn-augment",
    run=run,
    add_arguments=add_arguments,
    help="STN auto-augmentation: a spatial transformer trained to maximise the classifier's "
    "entropy (max-entropy + adversarial losses), then fine-tuning on its warps",
)
