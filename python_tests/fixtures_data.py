"""Tiny data sets written in the official release formats, for the loader and CLI tests."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from labelkit_ext.data import NIH_FINDINGS

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# The official Data_Entry_2017.csv header, trailing empty column included.
NIH_HEADER = [
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
    "OriginalImage[Width",
    "Height]",
    "OriginalImagePixelSpacing[x",
    "y]",
    "",
]


def write_medmnist(
    path: Path, sizes=(20, 6, 8), side: int = 28, num_labels: int = 1, seed: int = 0
) -> Path:
    """A MedMNIST-layout npz: binary labels (N, 1), or multi-hot (N, num_labels) when > 1."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in zip(("train", "val", "test"), sizes, strict=True):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, side, side), dtype=np.uint8)
        if num_labels == 1:
            labels = np.arange(n) % 2  # both classes in every split
            arrays[f"{split}_labels"] = labels.reshape(n, 1).astype(np.uint8)
        else:
            arrays[f"{split}_labels"] = rng.integers(0, 2, (n, num_labels), dtype=np.uint8)
    np.savez_compressed(path, **arrays)
    return path


def _pickle_py2_style(path: Path, obj: dict) -> None:
    # The official files come from Python 2: str keys that Python 3 reads back as bytes.
    with open(path, "wb") as f:
        pickle.dump({k.encode(): v for k, v in obj.items()}, f, protocol=2)


def cifar_rows(n: int, seed: int) -> np.ndarray:
    """(n, 3072) uint8 rows: R, G, B planes of 32x32 images, as in the official batches."""
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def write_cifar10(root: Path, per_batch: int = 4) -> Path:
    """A cifar-10-batches-py folder: data_batch_1..5, test_batch, batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        labels = [(i + j) % 10 for j in range(per_batch)]
        _pickle_py2_style(
            folder / f"data_batch_{i}",
            {"data": cifar_rows(per_batch, i), "labels": labels, "batch_label": b"training batch"},
        )
    _pickle_py2_style(
        folder / "test_batch", {"data": cifar_rows(10, 99), "labels": list(range(10))}
    )
    names = [
        b"airplane",
        b"automobile",
        b"bird",
        b"cat",
        b"deer",
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    _pickle_py2_style(folder / "batches.meta", {"label_names": names, "num_vis": 3072})
    return folder


def write_cifar100(root: Path, n_train: int = 12, n_test: int = 6) -> Path:
    """A cifar-100-python folder: train, test, meta with fine and coarse labels."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        fine = [(7 * j) % 100 for j in range(n)]
        _pickle_py2_style(
            folder / name,
            {
                "data": cifar_rows(n, seed),
                "fine_labels": fine,
                "coarse_labels": [f % 20 for f in fine],
            },
        )
    _pickle_py2_style(
        folder / "meta",
        {
            "fine_label_names": [f"fine{i}".encode() for i in range(100)],
            "coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
        },
    )
    return folder


def write_nih(
    root: Path, patients: int = 8, per_patient: int = 3, side: int = 40
) -> dict[str, str]:
    """A NIH ChestX-ray14 folder: Data_Entry_2017.csv, images_00x/images/*.png, the two lists.

    Returns image name -> 'Finding Labels'. Patients 0-5 are train_val, the rest test; one
    image is RGBA, as a few official ones are.
    """
    findings = {}
    rng = np.random.default_rng(0)
    rows, train_val, test = [], [], []
    for p in range(1, patients + 1):
        for f in range(per_patient):
            name = f"{p:08d}_{f:03d}.png"
            k = (p + f) % 4
            labels = (
                "No Finding"
                if k == 0
                else "|".join(NIH_FINDINGS[(p + f + j) % 14] for j in range(k))
            )
            findings[name] = labels
            folder = root / f"images_{(p - 1) % 2 + 1:03d}" / "images"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (side, side), dtype=np.uint8)
            image = Image.fromarray(pixels, "L")
            (image.convert("RGBA") if (p, f) == (1, 0) else image).save(folder / name)
            rows.append([name, labels, f, p, 50, "M", "PA", side, side, 0.143, 0.143, ""])
            (train_val if p <= patients - 2 else test).append(name)
    with open(root / "Data_Entry_2017.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(NIH_HEADER)
        writer.writerows(rows)
    (root / "train_val_list.txt").write_text("\n".join(train_val) + "\n")
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    return findings
