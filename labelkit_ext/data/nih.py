"""NIH ChestX-ray14 in its official layout: 14 findings as multi-hot labels.

"No Finding" images are kept, with an all-zero label vector.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from labelkit_ext.data.core import FileSplit, RawDataset
from labelkit_ext.data.paths import missing
from labelkit_ext.errors import UsageError, reading

__all__ = ["NIH_FINDINGS", "NO_FINDING", "load_nih_chestxray14", "parse_findings"]

NIH_FINDINGS = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"
NIH_DIR = "nih-chestxray14"
ENTRY_CSV = "Data_Entry_2017.csv"
LISTS = {"train": "train_val_list.txt", "test": "test_list.txt"}
NIH_LAYOUT = (
    f"a folder (or its `{NIH_DIR}/` subfolder) with {ENTRY_CSV} (columns 'Image Index', "
    f"'Finding Labels', 'Patient ID', ...), {LISTS['train']}, {LISTS['test']} and the PNGs "
    "under images*/ (images_001.tar.gz ... images_012.tar.gz extracted)"
)


def parse_findings(field: str) -> torch.Tensor:
    """'Effusion|Mass' -> a float32 multi-hot vector over the 14 findings ("No Finding" -> 0s)."""
    labels = [name for name in field.split("|") if name and name != NO_FINDING]
    unknown = sorted(set(labels) - set(NIH_FINDINGS))
    if unknown:
        raise UsageError(f"unknown finding(s) {unknown} in 'Finding Labels' value {field!r}")
    target = torch.zeros(len(NIH_FINDINGS))
    for name in labels:
        target[NIH_FINDINGS.index(name)] = 1.0
    return target


def _root(path: Path) -> Path:
    for root in (path, path / NIH_DIR):
        if (root / ENTRY_CSV).is_file():
            return root
    raise missing(path / ENTRY_CSV, NIH_LAYOUT, "nih")


def _entries(csv_file: Path) -> dict[str, tuple[str, str]]:
    """Image Index -> (Finding Labels, Patient ID)."""
    with reading(csv_file, f"the {ENTRY_CSV} table"), open(csv_file, newline="") as f:
        reader = csv.DictReader(f)
        needed = {"Image Index", "Finding Labels", "Patient ID"}
        absent = needed - set(reader.fieldnames or ())
        if absent:
            raise UsageError(f"{csv_file} lacks columns {sorted(absent)}; expected {NIH_LAYOUT}")
        return {row["Image Index"]: (row["Finding Labels"], row["Patient ID"]) for row in reader}


def _image_index(root: Path) -> dict[str, Path]:
    # Kaggle-style images_001/images/*.png and the tarballs' flat images/*.png both match.
    return {p.name: p for p in root.glob("images*/**/*.png")}


def _split(root: Path, list_name: str, entries: dict, images: dict[str, Path]) -> FileSplit:
    list_file = root / list_name
    if not list_file.is_file():
        raise missing(list_file, NIH_LAYOUT, "nih")
    with reading(list_file, "a list of image file names, one a line"):
        text = list_file.read_text()
    names = [line.strip() for line in text.splitlines() if line.strip()]
    unlisted = [n for n in names if n not in entries]
    if unlisted:
        raise UsageError(
            f"{len(unlisted)} images of {list_name} are not in {ENTRY_CSV}, e.g. {unlisted[:3]}"
        )
    absent = [n for n in names if n not in images]
    if absent:
        raise missing(
            f"{len(absent)} of {len(names)} images listed in {list_name} (e.g. {absent[:3]}) under {root}/images*/",
            NIH_LAYOUT,
            "nih",
        )
    if not names:
        raise UsageError(f"{root / list_name} lists no images")
    targets = torch.stack([parse_findings(entries[n][0]) for n in names])
    return FileSplit([images[n] for n in names], targets, [entries[n][1] for n in names])


def load_nih_chestxray14(path: Path) -> RawDataset:
    """The official train_val / test lists, images read lazily; val is held out by patient."""
    root = _root(path)
    entries = _entries(root / ENTRY_CSV)
    images = _image_index(root)
    splits = {split: _split(root, name, entries, images) for split, name in LISTS.items()}
    return RawDataset(task="multilabel", class_names=NIH_FINDINGS, splits=splits, in_channels=1)
