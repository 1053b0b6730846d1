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
    probe_entropy,
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
from labelkit_ext.models import available_models
from labelkit_ext.nn.stn import AffineBounds, check_bound_limits

__all__ = [
    "COLLAPSE_DEVIATION",
    "DEFAULT_VARIANTS",
    "VARIANTS",
    "AugmentConfig",
    "AugmenterFit",
    "MixedAugmentation",
    "StnAugmentFit",
    "StnAugmentRunConfig",
    "Variant",
    "build_augmenter",
    "build_discriminator",
    "check_variants",
    "fit_stn_augment",
    "frozen",
    "probe_images",
    "run_stn_augment",
    "summary_rows",
    "summary_table",
    "train_augmenter",
    "probe_entropy",
    "warp_statistics",
]

DEFAULT_EPOCHS = 15
DEFAULT_NUM_SEEDS = 3


_AUGMENT = AugmentConfig()
_BOUNDS = AffineBounds()
_BOUND_OPTIONS = ("max_rotation", "max_scale", "max_shear", "max_translation")


@dataclass
class StnAugmentRunConfig:
    """``labelkit run stn-augment``: its options are these fields."""

    data: DataConfig = option(factory=DataConfig, help="data")
    model: str = option("small-cnn", "network", choices=available_models)
    pretrained: str | None = option(None, "initial weights from a local file", metavar="FILE")
    train: TrainConfig = option(
        factory=lambda: TrainConfig(epochs=DEFAULT_EPOCHS), help="stage 1 training"
    )
    variants: tuple[str, ...] = option(
        DEFAULT_VARIANTS, "variants to compare", choices=list(VARIANTS), metavar="NAME"
    )
    num_seeds: int = option(
        DEFAULT_NUM_SEEDS, "seeds seed, seed+1, ...; the table shows mean ± std"
    )
    aug_epochs: int = option(_AUGMENT.epochs, "stage-2 epochs")
    aug_lr: float = option(_AUGMENT.lr, "stage-2 Adam learning rate of the augmenter")
    disc_lr: float = option(_AUGMENT.disc_lr, "stage-2 Adam learning rate of the discriminator")
    lambda_me: float = option(_AUGMENT.lambda_me, "weight of the max-entropy loss (the original's)")
    penalty_weight: float = option(
        _AUGMENT.penalty_weight, "stn-penalty: weight of relu(||theta - I|| - radius)^2"
    )
    penalty_radius: float = option(
        _AUGMENT.penalty_radius, "stn-penalty: free radius around the identity"
    )
    finetune_epochs: int = option(
        DEFAULT_FINETUNE_EPOCHS, "stage-3 epochs, the same for every variant"
    )
    finetune_lr: float = option(DEFAULT_FINETUNE_LR, "stage-3 learning rate")
    mix: float = option(DEFAULT_MIX, "share of each stage-3 batch replaced by augmented images")
    probe_size: int = option(_AUGMENT.probe_size, "validation images whose warps are measured")
    max_rotation: float = option(_BOUNDS.rotation, "bounds, degrees")
    max_scale: float = option(_BOUNDS.scale, "bounds: scale factors in [1-s, 1+s]")
    max_shear: float = option(_BOUNDS.shear, "bounds: shear")
    max_translation: float = option(
        _BOUNDS.translation, "bounds, normalised units, 2 = the full width"
    )

    def __post_init__(self) -> None:
        check_fields(self)
        check_run_config(self)
        # AugmentConfig and AffineBounds check these too, but under their own field names
        # (epochs, lr, rotation...): check the options here first, by the names the user typed.
        for name in ("num_seeds", "aug_epochs", "finetune_epochs", "probe_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("aug_lr", "disc_lr", "finetune_lr"):
            if getattr(self, name) <= 0:
                raise UsageError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("lambda_me", "penalty_weight", "penalty_radius", *_BOUND_OPTIONS):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} must be >= 0, got {getattr(self, name)}")
        check_bound_limits(
            lambda name: f"max_{name}", self.max_rotation, self.max_scale, self.max_shear,
            self.max_translation,
        )  # fmt: skip
        if not 0 < self.mix <= 1:
            raise UsageError(f"mix must be in (0, 1], got {self.mix}")
        check_variants(self.variants)
        self.augment_config()  # its own checks, before any data is loaded
        self.bounds()

    def augment_config(self) -> AugmentConfig:
        """Stage 2's settings (batch size, device, AMP, workers and verbosity from
        ``train``)."""
        t = self.train
        return AugmentConfig(
            epochs=self.aug_epochs, batch_size=t.batch_size, lr=self.aug_lr,
            disc_lr=self.disc_lr, lambda_me=self.lambda_me, penalty_weight=self.penalty_weight,
            penalty_radius=self.penalty_radius, device=t.device, amp=t.amp,
            probe_size=self.probe_size, quiet=t.quiet, num_workers=t.num_workers,
        )  # fmt: skip

    def bounds(self) -> AffineBounds:
        return AffineBounds(self.max_rotation, self.max_scale, self.max_shear, self.max_translation)


def _print_report(fitted: StnAugmentFit, config: StnAugmentRunConfig) -> None:
    results = fitted.results
    seeds = results["config"]["seeds"]
    timings = results["timings"]
    print(
        "\n\n".join(
            [
                f"stn-augment | {config.data.dataset} | {config.model} | stage 1 "
                f"{config.train.epochs} epochs, stage 2 {config.aug_epochs} epochs, stage 3 "
                f"{config.finetune_epochs} epochs | seeds {seeds}",
                summary_table(results["table"]),
                f"collapsed: median ||theta - I|| of the final warps < {COLLAPSE_DEVIATION}; "
                f"total {timings.get('total_seconds', 0.0):.0f}s",
            ]
        )
    )


def run_stn_augment(
    config: StnAugmentRunConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    resume: bool = False,
) -> dict[str, Any]:
    """The three stages for every seed and variant; results.json, plots and the table
    (``out_dir`` default ``runs/stn-augment-<dataset>``)."""
    started = time.perf_counter()
    config = config or StnAugmentRunConfig()
    out = prepare_run_dir("stn-augment", config.data, out_dir)
    splits = load_data(config.data)
    data_seconds = time.perf_counter() - started
    seed = config.train.seed
    fitted = fit_stn_augment(
        splits,
        model=config.model,
        config=config.train,
        finetune_config=replace(config.train, epochs=config.finetune_epochs, lr=config.finetune_lr),
        augment_config=config.augment_config(),
        variants=config.variants,
        seeds=list(range(seed, seed + config.num_seeds)),
        bounds=config.bounds(),
        mix=config.mix,
        pretrained=config.pretrained,
        out_dir=out,
        resume=resume,
    )
    results = fitted.results
    results["config"]["run"] = asdict(config)
    results["timings"]["data_seconds"] = data_seconds
    write_results(out, results, started)  # adds the run's settings and data time
    if current_dist().is_main:
        _print_report(fitted, config)
        print(f"results: {out / 'results.json'}  plots: {', '.join(results.get('plots', []))}")
    return results


register_method(
    "stn-augment",
    config=StnAugmentRunConfig,
    run=run_stn_augment,
    help="STN auto-augmentation: a spatial transformer trained to maximise the classifier's "
    "entropy (max-entropy + adversarial losses), then fine-tuning on its warps",
)
