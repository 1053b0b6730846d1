"""CIFAR-10 / CIFAR-100: the official ``cifar-*-python`` folders and the ``.npz`` subset."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from labelkit_ext.data.core import ArraySplit, RawDataset, open_npz
from labelkit_ext.data.paths import missing
from labelkit_ext.errors import UsageError, reading

__all__ = ["load_cifar10", "load_cifar100", "read_cifar_pickle"]

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR100_DIR = "cifar-100-python"
CIFAR10_NPZ = "cifar10_subset.npz"
CIFAR10_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))

CIFAR10_LAYOUT = (
    f"`{CIFAR10_DIR}/` (data_batch_1..5, test_batch, batches.meta; extract cifar-10-python.tar.gz) "
    f"or `{CIFAR10_NPZ}` (x_train (N,32,32,3) uint8, y_train, x_test, y_test, label_names)"
)
CIFAR100_LAYOUT = f"`{CIFAR100_DIR}/` (train, test, meta; extract cifar-100-python.tar.gz)"

# The only globals a CIFAR pickle needs: numpy arrays, and bytes as protocol 2 encodes them.
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    ("_codecs", "encode"): ("_codecs", "encode"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays, refusing any other callable.

    Kept on purpose instead of ``pickle.load``/``numpy.load(allow_pickle=True)``: the official
    CIFAR release is a pickle, and a file from anywhere else could run code when unpickled.
    An unpickling error (refused global) is a malformed-file error for the user.
    """

    def find_class(self, module: str, name: str) -> Any:
        target = _NUMPY_GLOBALS.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR file")
        return super().find_class(*target)


def read_cifar_pickle(file: Path) -> dict[str, Any]:
    """One official CIFAR pickle (Python 2 era, bytes keys) as a dict with str keys."""
    with reading(file, "an official CIFAR python pickle"), open(file, "rb") as f:
        raw = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    if not isinstance(raw, dict):
        raise UsageError(f"could not read {file} (an official CIFAR python pickle): not a dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _names(values: list) -> tuple[str, ...]:
    return tuple(v.decode() if isinstance(v, bytes) else str(v) for v in values)


def _batch_split(batches: list[dict[str, Any]], label_key: str) -> ArraySplit:
    # Rows are 3072 bytes: the R, G and B planes of a 32x32 image, so (N, 3, 32, 32) directly.
    data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
    labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
    return ArraySplit(torch.from_numpy(data.reshape(-1, 3, 32, 32)), torch.from_numpy(labels))


def _find(path: Path, folder: str) -> Path | None:
    for candidate in (path, path / folder):
        if candidate.name == folder and candidate.is_dir():
            return candidate
    return None


def _read(folder: Path, name: str, layout: str) -> dict[str, Any]:
    file = folder / name
    if not file.is_file():
        raise missing(file, layout, "cifar")
    return read_cifar_pickle(file)


def _cifar10_official(folder: Path) -> RawDataset:
    train = [_read(folder, b, CIFAR10_LAYOUT) for b in CIFAR10_BATCHES]
    test = _read(folder, "test_batch", CIFAR10_LAYOUT)
    meta = _read(folder, "batches.meta", CIFAR10_LAYOUT)
    with reading(folder, CIFAR10_LAYOUT):  # a missing key or a bad array: the files' fault
        return RawDataset(
            task="multiclass",
            class_names=_names(meta["label_names"]),
            splits={
                "train": _batch_split(train, "labels"),
                "test": _batch_split([test], "labels"),
            },
            in_channels=3,
            flip=True,
        )


def _cifar10_npz(file: Path) -> RawDataset:
    with open_npz(file, CIFAR10_LAYOUT) as npz, reading(file, CIFAR10_LAYOUT):
        absent = [
            k for k in ("x_train", "y_train", "x_test", "y_test", "label_names") if k not in npz
        ]
        if absent:
            raise UsageError(f"{file} lacks arrays {absent}; expected {CIFAR10_LAYOUT}")
        splits = {
            split: ArraySplit(
                torch.from_numpy(np.ascontiguousarray(npz[f"x_{split}"].transpose(0, 3, 1, 2))),
                torch.from_numpy(npz[f"y_{split}"].astype(np.int64).reshape(-1)),
            )
            for split in ("train", "test")
        }
        names = _names(list(npz["label_names"]))
    return RawDataset(task="multiclass", class_names=names, splits=splits, in_channels=3, flip=True)


def load_cifar10(path: Path) -> RawDataset:
    """CIFAR-10 from ``path``: the official folder (preferred) or the ``.npz`` subset.

    ``path`` may be the ``cifar-10-batches-py`` folder, a folder holding it or
    ``cifar10_subset.npz``, or an ``.npz`` file.
    """
    if path.is_file():
        return _cifar10_npz(path)
    official = _find(path, CIFAR10_DIR)
    if official is not None:
        return _cifar10_official(official)
    if (path / CIFAR10_NPZ).is_file():
        return _cifar10_npz(path / CIFAR10_NPZ)
    raise missing(f"{path / CIFAR10_DIR} (or {path / CIFAR10_NPZ})", CIFAR10_LAYOUT, "cifar")


def load_cifar100(path: Path, labels: str = "fine") -> RawDataset:
    """CIFAR-100 from the official ``cifar-100-python`` folder (or a folder holding it).

    ``labels`` is "fine" (100 classes) or "coarse" (20 superclasses).
    """
    if labels not in ("fine", "coarse"):
        raise UsageError(f"labels must be 'fine' or 'coarse', got {labels!r}")
    folder = _find(path, CIFAR100_DIR)
    if folder is None:
        raise missing(path / CIFAR100_DIR, CIFAR100_LAYOUT, "cifar")
    key = f"{labels}_labels"
    train = _read(folder, "train", CIFAR100_LAYOUT)
    test = _read(folder, "test", CIFAR100_LAYOUT)
    meta = _read(folder, "meta", CIFAR100_LAYOUT)
    with reading(folder, CIFAR100_LAYOUT):
        return RawDataset(
            task="multiclass",
            class_names=_names(meta[f"{labels}_label_names"]),
            splits={"train": _batch_split([train], key), "test": _batch_split([test], key)},
            in_channels=3,
            flip=True,
        )
