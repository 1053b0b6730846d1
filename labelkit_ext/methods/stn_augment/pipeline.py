"""``fit_stn_augment``: the three stages for every seed and variant, and the run's report."""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from labelkit_ext.checks import check_seeds
from labelkit_ext.data import DataSplits
from labelkit_ext.engine import (
    TrainConfig,
    current_dist,
    derive_seed,
    fit,
    load_checkpoint,
    predict,
    prediction_metrics,
    save_checkpoint,
    seed_everything,
    select_device,
)
from labelkit_ext.errors import UsageError
from labelkit_ext.fingerprint import module_digest
from labelkit_ext.methods.common import dataset_summary, write_results
from labelkit_ext.methods.stn_augment.report import (
    plot_accuracy,
    plot_losses,
    plot_warp_distributions,
    plot_warp_grid,
    summary_rows,
)
from labelkit_ext.methods.stn_augment.training import (
    AugmentConfig,
    AugmenterFit,
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
from labelkit_ext.methods.supervised import fit_supervised
from labelkit_ext.nn.stn import AffineBounds

__all__ = [
    "DEFAULT_FINETUNE_EPOCHS",
    "DEFAULT_FINETUNE_LR",
    "DEFAULT_MIX",
    "GRID_IMAGES",
    "StnAugmentFit",
    "fit_stn_augment",
]

DEFAULT_FINETUNE_EPOCHS = 5
DEFAULT_FINETUNE_LR = 0.01
DEFAULT_MIX = 0.5  # share of each fine-tuning batch replaced by augmented images
GRID_IMAGES = 8  # test images shown per variant in warp_grid.png
AUGMENTER_FILE = "augmenter.pt"
SPLITS = ("val", "test")


@dataclass
class StnAugmentFit:
    """What ``fit_stn_augment`` returns: the results (as in results.json) and, per seed and
    variant, the fine-tuned classifier and the augmenter (None for ``no-affine``)."""

    results: dict[str, Any]
    classifiers: dict[int, dict[str, nn.Module]] = field(default_factory=dict)
    augmenters: dict[int, dict[str, nn.Module | None]] = field(default_factory=dict)


def _log(message: str, quiet: bool) -> None:
    if not quiet and current_dist().is_main:
        print(f"[stn-augment] {message}", flush=True)


def _evaluate(model: nn.Module, splits: DataSplits, device: torch.device, config: TrainConfig):
    info = splits.info
    return {
        split: prediction_metrics(
            predict(
                model,
                getattr(splits, split),
                device,
                batch_size=config.eval_batch_size,
                amp=config.amp,
                num_workers=config.num_workers,
            ),
            info.task,
            info.class_names,
        )
        for split in SPLITS
    }


def _stage2(
    variant: Variant,
    classifier: nn.Module,
    augmenter: nn.Module,
    splits: DataSplits,
    probe: torch.Tensor,
    config: AugmentConfig,
    folder: Path | None,
    resume: bool,
) -> tuple[AugmenterFit, bool]:
    """Train the variant's augmenter, or load it from ``folder`` when resuming a finished one
    trained with the same settings; also whether it was loaded."""
    file = folder / AUGMENTER_FILE if folder is not None else None
    if resume and file is not None and file.is_file():
        state = load_checkpoint(file)
        if _same_stage2_settings(state["config"], config):
            augmenter.load_state_dict(state["augmenter"])
            augmenter.eval()
            _log(f"{variant.name}: augmenter loaded from {file}", config.quiet)
            return AugmenterFit(**state["stage2"]), True
        _log(f"{variant.name}: {file} was trained with other settings; retraining", config.quiet)
    discriminator = build_discriminator(variant, splits.info.in_channels)
    fitted = train_augmenter(
        classifier,
        augmenter,
        splits.train,
        probe,
        config,
        discriminator=discriminator,
        penalty=variant.penalty,
        log=lambda m: _log(f"{variant.name}: {m}", config.quiet),
    )
    if file is not None and current_dist().is_main:
        save_checkpoint(
            file,
            {
                "augmenter": augmenter.state_dict(),
                "discriminator": discriminator.state_dict() if discriminator is not None else {},
                "stage2": {
                    "steps": fitted.steps,
                    "epochs": fitted.epochs,
                    "seconds": fitted.seconds,
                },
                "config": config.to_dict(),
                "variant": variant.name,
            },
        )
    return fitted, False


def _same_stage2_settings(saved: dict, config: AugmentConfig) -> bool:
    # A field added since the augmenter was saved had its default then (num_workers: 0).
    return {**AugmentConfig().to_dict(), **saved} == config.to_dict()


@torch.no_grad()
def _warped_examples(augmenter: nn.Module | None, images: torch.Tensor, seed: int) -> torch.Tensor:
    if augmenter is None:
        return images.clone()
    seed_everything(seed)  # the random-affine draws of the figure
    params = list(augmenter.parameters())
    device = params[0].device if params else images.device
    return augmenter.eval()(images.to(device)).image.cpu()


def _run_variant(
    variant: Variant,
    seed: int,
    stage1: nn.Module,
    splits: DataSplits,
    probe: torch.Tensor,
    finetune_config: TrainConfig,
    augment_config: AugmentConfig,
    bounds: AffineBounds,
    mix: float,
    folder: Path | None,
    resume: bool,
) -> tuple[dict[str, Any], MixedAugmentation]:
    """Stage 2 (learnt variants) and stage 3 of one variant from the stage-1 classifier."""
    info = splits.info
    index = list(VARIANTS).index(variant.name)  # a variant's seed ignores which others run
    seed_everything(derive_seed(seed, index))
    augmenter = build_augmenter(variant, info.in_channels, bounds)
    record: dict[str, Any] = {"stage2": None, "warp": None}
    stage2_loaded = True
    if variant.learnt:
        stage2, stage2_loaded = _stage2(
            variant,
            stage1,
            augmenter,
            splits,
            probe,
            replace(augment_config, seed=derive_seed(seed, index, 2)),
            folder,
            resume,
        )
        record["stage2"] = {
            "steps": stage2.steps,
            "epochs": stage2.epochs,
            "seconds": stage2.seconds,
        }
        record["warp"] = {k: v for k, v in stage2.epochs[-1].items() if k != "epoch"}
    elif augmenter is not None:
        seed_everything(derive_seed(seed, index, 2))
        augmenter.to(next(stage1.parameters()).device)
        record["warp"] = warp_statistics(stage1, augmenter, probe)
    net = MixedAugmentation(copy.deepcopy(stage1), augmenter, mix)
    fitted = fit(
        net,
        splits.train,
        splits.val,
        info.task,
        replace(finetune_config, seed=seed),  # same data order and mixing draws for every variant
        out_dir=folder / "finetune" if folder is not None else None,
        # A stage 3 saved with the augmenter that stage 2 has just replaced starts again.
        resume=resume and stage2_loaded,
        class_names=info.class_names,
        # Its checkpoint holds the augmenter's weights too: a changed one is refused, as --mix.
        identity={"mix": mix, "augmenter": module_digest(augmenter)},
        setting_names={"epochs": "finetune_epochs", "lr": "finetune_lr"},
    )
    record["stage3"] = {
        "history": fitted.history,
        "train_steps": int(net.train_steps),
        "augmented_images": int(net.augmented_images),
        "resumed_from_epoch": fitted.resumed_from,
        "seconds": fitted.train_seconds,
    }
    record["metrics"] = _evaluate(net.classifier, splits, fitted.device, finetune_config)
    return record, net


def _check_arguments(
    seeds: Sequence[int], mix: float, splits: DataSplits
) -> tuple[list[int], float]:
    seeds = check_seeds(seeds)
    if not 0.0 < mix <= 1.0:
        raise UsageError(f"mix must be in (0, 1], got {mix}")
    if splits.info.task != "multiclass":
        raise UsageError(f"dataset must be multi-class, {splits.info.name} is {splits.info.task}")
    return seeds, float(mix)  # mix is recorded in checkpoints read with weights_only: no NumPy


def _check_same_device(config: TrainConfig, augment_config: AugmentConfig) -> None:
    """Stage 2 trains against the stage-1 classifier where it is: an ``AugmentConfig`` of your
    own (its device defaults to 'auto') must resolve to the same device as ``config``."""
    stage1, stage2 = select_device(config.device), select_device(augment_config.device)
    if stage1 != stage2:
        raise UsageError(
            f"augment_config.device={augment_config.device!r} ({stage2}) is not config.device="
            f"{config.device!r} ({stage1}): stage 2 trains against the stage-1 classifier on its "
            "device; give both the same device"
        )


def fit_stn_augment(
    splits: DataSplits,
    *,
    model: str = "small-cnn",
    config: TrainConfig | None = None,
    finetune_config: TrainConfig | None = None,
    augment_config: AugmentConfig | None = None,
    variants: Sequence[str] = DEFAULT_VARIANTS,
    seeds: Sequence[int] = (0,),
    bounds: AffineBounds | None = None,
    mix: float = DEFAULT_MIX,
    pretrained: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
) -> StnAugmentFit:
    """STN auto-augmentation, for every seed of ``seeds`` and every variant of ``variants``:

    1. train the classifier with cross-entropy (``config``, the supervised recipe);
    2. for the learnt variants, freeze it and train an ``STNAugmenter`` to maximise the
       max-entropy loss of its predictions on the warped images (``augment_config``), against
       a ``WarpDiscriminator`` where the variant has one;
    3. fine-tune a copy of the stage-1 classifier (``finetune_config``: default ``config``
       with ``DEFAULT_FINETUNE_EPOCHS`` epochs at ``DEFAULT_FINETUNE_LR``) on batches whose
       ``mix`` share is replaced by the variant's augmented images. Every variant runs the
       same steps on the same batches; ``no-affine`` replaces nothing.

    The warps of the learnt variants (and of ``random-affine``) are measured on the first
    ``augment_config.probe_size`` validation images. With ``out_dir``: checkpoints
    (``seed<s>/stage1``, ``seed<s>/<variant>/augmenter.pt`` and ``finetune``; ``resume``
    continues them), plots and results.json.
    """
    started = time.perf_counter()
    config = config or TrainConfig()
    finetune_config = finetune_config or replace(
        config, epochs=DEFAULT_FINETUNE_EPOCHS, lr=DEFAULT_FINETUNE_LR
    )
    if augment_config is not None:
        _check_same_device(config, augment_config)
    augment_config = augment_config or AugmentConfig(
        batch_size=config.batch_size, device=config.device, amp=config.amp, quiet=config.quiet,
        num_workers=config.num_workers,
    )  # fmt: skip
    names = check_variants(variants)
    seeds, mix = _check_arguments(seeds, mix, splits)
    bounds = bounds or AffineBounds()
    out = Path(out_dir) if out_dir is not None else None
    info = splits.info
    probe = probe_images(splits.val, augment_config.probe_size)
    grid_inputs = probe_images(splits.test, GRID_IMAGES)
    fitted = StnAugmentFit({})
    runs: dict[str, Any] = {}
    examples: dict[str, torch.Tensor] = {}
    timings: dict[str, float] = {}
    device = None
    for seed in seeds:
        seed_dir = out / f"seed{seed}" if out is not None else None
        tic = time.perf_counter()
        _log(f"seed {seed}: stage 1 ({config.epochs} epochs)", config.quiet)
        stage1 = fit_supervised(
            splits,
            model,
            replace(config, seed=seed),
            pretrained=pretrained,
            out_dir=seed_dir / "stage1" if seed_dir is not None else None,
            resume=resume,
        )
        device = stage1.device
        run = {
            "stage1": {
                "history": stage1.history,
                "metrics": _evaluate(stage1.model, splits, device, config),
                "seconds": stage1.train_seconds,
            },
            "variants": {},
        }
        timings[f"seed{seed}_stage1_seconds"] = time.perf_counter() - tic
        fitted.classifiers[seed], fitted.augmenters[seed] = {}, {}
        for name in names:
            tic = time.perf_counter()
            _log(f"seed {seed}: {name}", config.quiet)
            record, net = _run_variant(
                VARIANTS[name],
                seed,
                stage1.model,
                splits,
                probe,
                finetune_config,
                augment_config,
                bounds,
                mix,
                seed_dir / name if seed_dir is not None else None,
                resume,
            )
            run["variants"][name] = record
            fitted.classifiers[seed][name] = net.classifier
            fitted.augmenters[seed][name] = net.augmenter
            if seed == seeds[0]:
                examples[name] = _warped_examples(net.augmenter, grid_inputs, seed)
            timings[f"seed{seed}_{name}_seconds"] = time.perf_counter() - tic
            acc = record["metrics"]["test"]["accuracy"]
            _log(f"seed {seed}: {name} test accuracy {acc:.4f}", config.quiet)
        runs[str(seed)] = run

    results: dict[str, Any] = {
        "method": "stn-augment",
        "config": {
            "model": model,
            "pretrained": pretrained,
            "seeds": seeds,
            "variants": names,
            "variant_definitions": {n: VARIANTS[n].__dict__ for n in names},
            "bounds": bounds.__dict__,
            "mix": mix,
            "train": config.to_dict(),
            "finetune": finetune_config.to_dict(),
            "augment": augment_config.to_dict(),
        },
        "dataset": dataset_summary(splits),
        "device": str(device),
        "table": summary_rows(runs, names),
        "runs": runs,
        "timings": timings,
    }
    if out is not None:
        if current_dist().is_main:
            title = f"stn-augment: {info.name}, {model}"
            first = runs[str(seeds[0])]["variants"]
            results["plots"] = [
                p.name
                for p in (
                    plot_losses(first, out / "stage2_losses.png", f"{title}, seed {seeds[0]}"),
                    plot_warp_distributions(
                        runs, out / "warp_distributions.png", f"{title}: stage 2 warps"
                    ),
                    plot_warp_grid(
                        grid_inputs,
                        examples,
                        info.mean,
                        info.std,
                        out / "warp_grid.png",
                        f"{title}: test images and their warps, seed {seeds[0]}",
                    ),  # fmt: skip
                    plot_accuracy(results["table"], out / "accuracy.png", title),
                )
                if p is not None
            ]
        write_results(out, results, started)
    fitted.results = results
    return fitted
