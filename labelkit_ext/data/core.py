"""The shared pieces of every data set: what a loader returns, datasets, splits, resizing."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset, TensorDataset

from labelkit_ext.errors import UsageError, reading
from labelkit_ext.fingerprint import tensor_digest

__all__ = [
    "DatasetInfo",
    "ArraySplit",
    "FileSplit",
    "RawDataset",
    "TensorImageDataset",
    "ImageFileDataset",
    "open_npz",
    "resize_images",
    "check_fits_in_memory",
    "memory_limit",
    "holdout_indices",
    "check_raw",
    "dataset_targets",
]


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and the metrics need to know about a data set."""

    name: str
    task: str  # "multiclass" (binary is 2-class) or "multilabel"
    class_names: tuple[str, ...]
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool = False  # horizontal flips preserve the label (natural images, not digits)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class ArraySplit:
    """One split held in memory: ``images`` uint8 (N, C, H, W); ``targets`` int64 (N,) or
    float32 multi-hot (N, K)."""

    images: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, index: np.ndarray) -> ArraySplit:
        idx = torch.as_tensor(index, dtype=torch.long)
        return ArraySplit(self.images[idx], self.targets[idx])


@dataclass
class FileSplit:
    """One split of image files read lazily; ``groups`` (e.g. patient IDs) keep a hold-out
    from leaking one patient into both sides."""

    paths: list[Path]
    targets: torch.Tensor
    groups: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, index: np.ndarray) -> FileSplit:
        idx = [int(i) for i in index]
        groups = [self.groups[i] for i in idx] if self.groups else []
        return FileSplit([self.paths[i] for i in idx], self.targets[idx], groups)


@dataclass
class RawDataset:
    """What a loader returns: splits by name ("train", "test", optionally "val")."""

    task: str
    class_names: tuple[str, ...]
    splits: dict[str, ArraySplit | FileSplit]
    in_channels: int
    flip: bool = False  # horizontal flip is label-preserving (natural images, not digits)


def check_raw(raw: RawDataset, source: str) -> None:
    """What every loader's output must be, checked once for all of them so a malformed file is a
    UsageError naming ``source`` instead of a traceback mid-training or a silently wrong run:
    non-empty splits with one target per image; uint8 ``(N, C, S, S)`` images with the set's
    channel count; class ids in ``[0, K)`` or 0/1 multi-hot rows of K labels."""
    k = len(raw.class_names)
    for name, split in raw.splits.items():
        where = f"{source}: the {name} split"
        images = split.paths if isinstance(split, FileSplit) else split.images
        if len(images) == 0:
            raise UsageError(f"{where} is empty")
        if len(images) != len(split.targets):
            raise UsageError(f"{where} has {len(images)} images but {len(split.targets)} labels")
        if isinstance(split, ArraySplit):
            _check_images(split.images, raw.in_channels, where)
        _check_targets(split.targets, raw.task, k, where)


def _check_images(images: torch.Tensor, channels: int, where: str) -> None:
    if images.dtype != torch.uint8:
        raise UsageError(f"{where}: images must be uint8 (0-255 pixels), got {images.dtype}")
    if images.ndim != 4 or images.shape[1] != channels or images.shape[2] != images.shape[3]:
        raise UsageError(
            f"{where}: images must be square with {channels} channel(s), got shape "
            f"{tuple(images.shape)} as (N, C, H, W)"
        )


def _check_targets(targets: torch.Tensor, task: str, k: int, where: str) -> None:
    if task == "multiclass":
        if targets.ndim != 1 or targets.is_floating_point():
            raise UsageError(
                f"{where}: labels must be one class id per image, got shape {tuple(targets.shape)}"
            )
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= k:
            raise UsageError(f"{where}: class ids must lie in [0, {k}), got [{lo}, {hi}]")
    elif (
        targets.ndim != 2
        or targets.shape[1] != k
        or not bool(((targets == 0) | (targets == 1)).all())
    ):
        values = ", ".join(f"{v:g}" for v in torch.unique(targets)[:5].tolist())
        raise UsageError(
            f"{where}: multi-label targets must be 0/1 rows of {k} labels, got shape "
            f"{tuple(targets.shape)} with values [{values}]"
        )


def dataset_targets(dataset: Dataset, read_items: bool = True) -> torch.Tensor | None:
    """Every target of ``dataset`` in order, for any map-style dataset: what it states (its
    ``targets`` attribute, as labelkit_ext's and torchvision's data sets have; a
    ``TensorDataset``'s second tensor; a ``Subset``'s selection of those), else (``read_items``)
    each item's ``[1]`` read in turn, which loads those samples; None when ``read_items`` is
    False and only that would do."""
    stated = _stated_targets(dataset)
    if stated is not None or not read_items:
        return stated
    if len(dataset) == 0:
        return torch.empty(0, dtype=torch.int64)
    return torch.stack([torch.as_tensor(dataset[i][1]) for i in range(len(dataset))])


def _stated_targets(dataset: Dataset) -> torch.Tensor | None:
    """The targets ``dataset`` states without loading samples, as one tensor; None where it
    states none, or states something else than its items give (a ``target_transform``, as
    torchvision applies in ``__getitem__``) or than one tensor can hold (ragged lists, names)."""
    if isinstance(dataset, Subset):
        inner = _stated_targets(dataset.dataset)
        indices = torch.as_tensor(np.asarray(dataset.indices, dtype=np.int64))
        return None if inner is None else inner[indices]
    if getattr(dataset, "target_transform", None) is not None:
        return None
    targets = getattr(dataset, "targets", None)
    if targets is None and isinstance(dataset, TensorDataset) and len(dataset.tensors) > 1:
        targets = dataset.tensors[1]
    if targets is None:
        return None
    try:
        return torch.as_tensor(np.asarray(targets) if isinstance(targets, list) else targets)
    except (TypeError, ValueError, RuntimeError):
        return None


class _SplitDataset(Dataset):
    """A data set's split, which says what identifies it."""

    targets: torch.Tensor
    transform: Callable | None

    def fingerprint(self) -> dict[str, str]:
        """What a resumed training run must find unchanged (``engine.fit`` checks it): the
        targets in order (another split seed or data set gives others) and the transform
        (augmented or not)."""
        return {"targets": tensor_digest(self.targets), "transform": repr(self.transform)}


class TensorImageDataset(_SplitDataset):
    """uint8 images in memory; ``transform`` maps a (C, H, W) uint8 tensor to the model input."""

    def __init__(self, split: ArraySplit, transform: Callable | None = None) -> None:
        self.images = split.images
        self.targets = split.targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[i]
        return (self.transform(image) if self.transform else image), self.targets[i]


class ImageFileDataset(_SplitDataset):
    """Grayscale image files read on demand and resized to ``image_size`` squares."""

    def __init__(
        self, split: FileSplit, image_size: int, transform: Callable | None = None
    ) -> None:
        self.paths = split.paths
        self.targets = split.targets
        self.image_size = image_size
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, i: int) -> torch.Tensor:
        """Image ``i`` as uint8 (1, image_size, image_size)."""
        # Imported here, not at the top: `labelkit run --help` would wait for it.
        from torchvision.transforms.v2.functional import pil_to_tensor

        # PIL raises OSError (UnidentifiedImageError) for a truncated or non-image file.
        with reading(self.paths[i], "an image file"), Image.open(self.paths[i]) as im:
            # Some official NIH PNGs are RGBA; "L" makes every one single-channel.
            im = im.convert("L").resize((self.image_size, self.image_size), Image.BILINEAR)
            return pil_to_tensor(im)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.load(i)
        return (self.transform(image) if self.transform else image), self.targets[i]


def open_npz(file: Path, layout: str) -> Any:
    """``np.load(file)`` of a user's ``.npz`` (no pickles); a file that is none (empty,
    garbage, a single ``.npy`` array) is a UsageError describing ``layout``."""
    with reading(file, layout):
        npz = np.load(file, allow_pickle=False)
    if isinstance(npz, np.ndarray):
        raise UsageError(f"{file} is a .npy array, not an .npz archive; expected {layout}")
    return npz


# Images resized per interpolate call: its float32 input and output stay a few MiB instead of
# 4 bytes per pixel of a whole split (about 1 GiB for PneumoniaMNIST's train split at 224 px).
RESIZE_CHUNK = 64


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 (N, C, H, W) images to (size, size) with antialiased bilinear filtering,
    a chunk of images at a time (the float temporaries stay small)."""
    if images.shape[-2:] == (size, size):
        return images
    N, C = images.shape[:2]
    out = torch.empty((N, C, size, size), dtype=torch.uint8, device=images.device)
    for start in range(0, N, RESIZE_CHUNK):
        chunk = images[start : start + RESIZE_CHUNK].float()
        resized = torch.nn.functional.interpolate(
            chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        out[start : start + len(chunk)] = resized.round_().clamp_(0, 255)
    return out


# cgroup v2 / v1 memory limits (containers, Slurm jobs): lower than the machine's RAM there.
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def memory_limit() -> int | None:
    """Bytes this process may use at most: the machine's RAM, or its cgroup's limit where
    lower; None where neither can be read (e.g. on Windows)."""
    limits = []
    if hasattr(os, "sysconf"):
        try:
            limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError):
            pass
    for path in _CGROUP_LIMITS:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            limits.append(int(text))
    return min(limits) if limits else None


def check_fits_in_memory(nbytes: int, what: str) -> None:
    """A UsageError before allocating ``nbytes`` beyond ``memory_limit()`` (the allocator would
    fail mid-way with a traceback, or the system would start swapping)."""
    limit = memory_limit()
    if limit is not None and nbytes > limit:
        raise UsageError(
            f"{what} take {_bytes(nbytes)} in memory and this process may use "
            f"{_bytes(limit)}: choose a smaller --image-size"
        )


def _bytes(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def holdout_indices(
    targets: torch.Tensor, fraction: float, seed: int, groups: Sequence[str] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(len(targets))`` into (keep, held_out) with ``fraction`` held out.

    Grouped when ``groups`` is given (no group on both sides), stratified for class labels
    when every class can appear on both sides, random otherwise. Sorted, deterministic in
    ``seed``.
    """
    if not 0.0 < fraction < 1.0:
        raise UsageError(f"val_fraction must be in (0, 1), got {fraction}")
    n = len(targets)
    n_held = int(np.ceil(fraction * n))
    if not 0 < n_held < n:
        raise UsageError(
            f"val_fraction={fraction} of {n} training samples leaves an empty train or val split"
        )
    # Imported here, not at the top: `labelkit run --help` would wait for it.
    from sklearn.model_selection import GroupShuffleSplit, train_test_split

    index = np.arange(n)
    if groups and len(set(groups)) < 2:
        raise UsageError(
            f"val_fraction: a grouped hold-out needs at least 2 groups (patients), got "
            f"{len(set(groups))}"
        )
    if groups:
        splitter = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
        keep, held = next(splitter.split(index, groups=list(groups)))
        return np.sort(keep), np.sort(held)
    stratify = targets.numpy() if targets.ndim == 1 and _stratifiable(targets, fraction) else None
    keep, held = train_test_split(index, test_size=fraction, random_state=seed, stratify=stratify)
    return np.sort(keep), np.sort(held)


def _stratifiable(labels: torch.Tensor, fraction: float) -> bool:
    # scikit-learn needs >= 2 members per class and room for every class on both sides.
    counts = torch.bincount(labels)
    counts = counts[counts > 0]
    n_held = int(np.ceil(fraction * len(labels)))
    return bool(counts.min() >= 2) and len(counts) <= min(n_held, len(labels) - n_held)
