"""Data sets by name, and ``load_dataset``: raw splits -> resized, held-out, transformed."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from labelkit_ext.checks import check_int, check_seed
from labelkit_ext.data.cifar import load_cifar10, load_cifar100
from labelkit_ext.data.core import (
    ArraySplit,
    DatasetInfo,
    FileSplit,
    ImageFileDataset,
    RawDataset,
    TensorImageDataset,
    check_fits_in_memory,
    check_raw,
    holdout_indices,
    resize_images,
)
from labelkit_ext.data.digits import load_digits_raw
from labelkit_ext.data.medmnist import load_medmnist_npz
from labelkit_ext.data.mosaic import MosaicStats, load_digit_mosaic
from labelkit_ext.data.nih import load_nih_chestxray14
from labelkit_ext.data.paths import resolve_data_dir
from labelkit_ext.data.transforms import build_transform, channel_stats
from labelkit_ext.errors import UsageError

__all__ = ["DATASETS", "DataSplits", "DatasetSpec", "available_datasets", "load_dataset"]

# Every loader is called as load(path, image_size=..., split_seed=..., val_fraction=..., **options).
Loader = Callable[..., RawDataset]


@dataclass(frozen=True)
class DatasetSpec:
    """A named data set: its loader, a one-line description and its default image size."""

    name: str
    description: str
    load: Loader
    default_image_size: int | None = None  # None: the files' own size


@dataclass
class DataSplits:
    """Ready-to-use datasets yielding (float image, target).

    ``train`` augments; ``train_eval`` is the same images with the evaluation transform (for
    scoring a pool, computing features). Targets: int64 class index, or float32 multi-hot.
    """

    train: Dataset
    train_eval: Dataset
    val: Dataset
    test: Dataset
    info: DatasetInfo


def _digits(path: Path, *, split_seed: int, **_: object) -> RawDataset:
    return load_digits_raw(split_seed)


def _mosaic(
    path: Path,
    *,
    image_size: int,
    split_seed: int,
    val_fraction: float,
    n_train: int = 3000,
    n_val: int = 500,
    n_test: int = 1000,
    empty_fraction: float = 0.54,
    multi_fraction: float = 0.18,
    imbalance: float = 10.0,
) -> RawDataset:
    stats = MosaicStats(empty_fraction, multi_fraction, imbalance)
    return load_digit_mosaic(image_size, split_seed, val_fraction, n_train, n_val, n_test, stats)


def _medmnist(flag: str) -> Loader:
    def load(path: Path, **_: object) -> RawDataset:
        return load_medmnist_npz(path, flag)

    return load


def _cifar10(path: Path, **_: object) -> RawDataset:
    return load_cifar10(path)


def _cifar100(labels: str) -> Loader:
    def load(path: Path, **_: object) -> RawDataset:
        return load_cifar100(path, labels)

    return load


def _nih(path: Path, **_: object) -> RawDataset:
    return load_nih_chestxray14(path)


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "digits", "scikit-learn handwritten digits, 10 classes, 1x8x8 upsampled", _digits, 32
        ),
        DatasetSpec(
            "digit-mosaic",
            "2x2 mosaics of real digits, 10-label multi-hot, NIH-like label statistics",
            _mosaic,
            32,
        ),
        DatasetSpec(
            "pneumoniamnist",
            "MedMNIST PneumoniaMNIST npz, normal vs pneumonia, 1x28x28",
            _medmnist("pneumoniamnist"),
        ),
        DatasetSpec(
            "chestmnist",
            "MedMNIST ChestMNIST npz, 14 NIH findings multi-label, 1x28x28",
            _medmnist("chestmnist"),
        ),
        DatasetSpec(
            "cifar10", "CIFAR-10: cifar-10-batches-py or cifar10_subset.npz, 3x32x32", _cifar10
        ),
        DatasetSpec(
            "cifar100", "CIFAR-100 fine labels (100): cifar-100-python, 3x32x32", _cifar100("fine")
        ),
        DatasetSpec(
            "cifar100-coarse",
            "CIFAR-100 coarse labels (20 superclasses), 3x32x32",
            _cifar100("coarse"),
        ),
        DatasetSpec(
            "nih-chestxray14",
            "NIH ChestX-ray14 official layout, 14 findings multi-label",
            _nih,
            224,
        ),
    )
}


def available_datasets() -> list[str]:
    """Names accepted by ``load_dataset`` and ``--dataset``."""
    return sorted(DATASETS)


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise UsageError(f"dataset must be one of {available_datasets()}, got {name!r}")
    return DATASETS[name]


def _check_options(spec: DatasetSpec, options: dict) -> None:
    params = inspect.signature(spec.load).parameters
    allowed = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY} - {
        "image_size",
        "split_seed",
        "val_fraction",
    }
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise UsageError(
            f"unknown option(s) {unknown} for dataset {spec.name!r}; valid: {sorted(allowed) or 'none'}"
        )


def _with_val(
    raw: RawDataset, val_fraction: float, split_seed: int
) -> dict[str, ArraySplit | FileSplit]:
    splits = dict(raw.splits)
    if "val" not in splits:
        train = splits["train"]
        groups = train.groups if isinstance(train, FileSplit) else ()
        keep, held = holdout_indices(train.targets, val_fraction, split_seed, groups)
        splits["train"], splits["val"] = train.subset(keep), train.subset(held)
    return splits


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    image_size: int | None = None,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    augment: bool = True,
    **options: object,
) -> DataSplits:
    """Load data set ``name`` from local files (nothing is downloaded).

    Args:
        name: one of ``available_datasets()``.
        data_dir: a folder (or a single data file); default ``default_data_dir()``.
        image_size: square size of the model input; default the set's own (digits: 32).
        val_fraction: share of train held out for validation where the release has no val
            split (MedMNIST's official val split is kept as is).
        split_seed: fixes every split, independently of the training seed.
        augment: random crop (and flip for natural images) on ``train``.
        options: loader-specific keywords (digit-mosaic: n_train, n_val, n_test,
            empty_fraction, multi_fraction, imbalance).
    """
    spec = _spec(name)
    _check_options(spec, options)
    if image_size is not None:
        image_size = check_int("image_size", image_size, minimum=1)
    split_seed = check_seed("split_seed", split_seed)
    size = image_size or spec.default_image_size
    source = resolve_data_dir(data_dir)
    try:
        raw = spec.load(
            source,
            image_size=size,
            split_seed=split_seed,
            val_fraction=val_fraction,
            **options,
        )
    except PermissionError as exc:  # Path.is_file/is_dir raise it inside an unreadable folder
        raise UsageError(
            f"{name} data: cannot read {exc.filename or source}: permission denied"
        ) from exc
    check_raw(raw, f"{spec.name} data from {source}")
    size = size or int(raw.splits["train"].images.shape[-1])  # array sets: their own size
    splits = _with_val(raw, val_fraction, split_seed)
    if isinstance(splits["train"], FileSplit):
        stat_source = ImageFileDataset(splits["train"], size)
    else:
        resized = sum(len(s.images) * s.images.shape[1] * size * size for s in splits.values())
        check_fits_in_memory(resized, f"the {name} images at {size}x{size} px")
        splits = {
            k: ArraySplit(resize_images(s.images, size), s.targets) for k, s in splits.items()
        }
        stat_source = splits["train"].images
    mean, std = channel_stats(stat_source)
    info = DatasetInfo(name, raw.task, raw.class_names, raw.in_channels, size, mean, std, raw.flip)
    train_tf, eval_tf = (
        build_transform(info, train=True, augment=augment),
        build_transform(info, train=False),
    )

    def make(split: ArraySplit | FileSplit, transform: Callable) -> Dataset:
        if isinstance(split, FileSplit):
            return ImageFileDataset(split, size, transform)
        return TensorImageDataset(split, transform)

    return DataSplits(
        train=make(splits["train"], train_tf),
        train_eval=make(splits["train"], eval_tf),
        val=make(splits["val"], eval_tf),
        test=make(splits["test"], eval_tf),
        info=info,
    )
