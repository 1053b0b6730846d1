"""MedMNIST ``.npz`` files (``train_images``, ``train_labels``, ``val_*``, ``test_*``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from labelkit_ext.data.core import ArraySplit, RawDataset, open_npz
from labelkit_ext.data.nih import NIH_FINDINGS
from labelkit_ext.data.paths import missing
from labelkit_ext.errors import UsageError, reading

__all__ = ["MEDMNIST_CLASSES", "load_medmnist_npz"]

# flag -> (task, class names), as in MedMNIST's own INFO table.
MEDMNIST_CLASSES: dict[str, tuple[str, tuple[str, ...]]] = {
    "pneumoniamnist": ("multiclass", ("normal", "pneumonia")),
    "chestmnist": ("multilabel", NIH_FINDINGS),
}

SPLITS = ("train", "val", "test")


def _layout(flag: str) -> str:
    return (
        f"a MedMNIST file `{flag}.npz` (or `{flag}_<size>.npz`) holding uint8 arrays "
        "train_images/val_images/test_images (N, H, W[, 3]) and train_labels/val_labels/"
        "test_labels (N, 1) or (N, K)"
    )


def load_medmnist_npz(path: Path, flag: str) -> RawDataset:
    """Read a MedMNIST ``.npz`` for ``flag`` (a key of ``MEDMNIST_CLASSES``) from ``path``.

    ``path`` is the file itself or a folder holding ``<flag>.npz``. The official val split is
    kept as is.
    """
    task, names = MEDMNIST_CLASSES[flag]
    file = path if path.is_file() else _find_npz(path, flag)
    if not file.is_file():
        raise missing(file, _layout(flag), "medmnist")
    # The members are read (decompressed) inside `reading` too: a truncated archive fails there.
    with open_npz(file, _layout(flag)) as npz, reading(file, _layout(flag)):
        absent = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels") if f"{s}_{k}" not in npz]
        if absent:
            raise UsageError(f"{file} lacks arrays {absent}; expected {_layout(flag)}")
        arrays = {k: npz[k] for k in npz.files}  # reading the members decompresses them
        # Arrays of the wrong rank or labels that are no numbers are the file's fault too.
        splits = {s: _split(arrays[f"{s}_images"], arrays[f"{s}_labels"], task) for s in SPLITS}
    channels = splits["train"].images.shape[1]
    return RawDataset(task=task, class_names=names, splits=splits, in_channels=channels)


def _find_npz(folder: Path, flag: str) -> Path:
    """``<flag>.npz`` in ``folder``, else the one sized release ``<flag>_<size>.npz`` there
    (MedMNIST+ names its 64/128/224 px files so); several sizes need the file itself."""
    plain = folder / f"{flag}.npz"
    sized = sorted(folder.glob(f"{flag}_*.npz")) if folder.is_dir() else []
    if plain.is_file() or not sized:
        return plain
    if len(sized) > 1:
        raise UsageError(
            f"{folder} holds {', '.join(p.name for p in sized)}: pass the one to use as the data "
            f"path (e.g. --data-dir {sized[0]})"
        )
    return sized[0]


def _split(images: np.ndarray, labels: np.ndarray, task: str) -> ArraySplit:
    # Grayscale sets are (N, H, W), RGB sets (N, H, W, 3); both become (N, C, H, W).
    if images.ndim not in (3, 4):
        raise ValueError(f"images must be (N, H, W) or (N, H, W, 3), got shape {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images))
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(labels.astype(np.int64))
    y = y.reshape(-1) if task == "multiclass" else y.float()
    return ArraySplit(x, y)
