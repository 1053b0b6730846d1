"""Oracles: who labels the queried samples.

An oracle gets the pool indices of a query and returns the labels it can give now, as
{index: class index}; fewer than asked means "not yet" (a person still answering). The loop
saves every answer as soon as it has it and never asks again for an answered index.

* ``SimulatedOracle`` reveals the data set's own labels (the usual benchmark setting).
* ``FileOracle`` writes the query as ``queries.csv`` plus a PNG thumbnail per sample into a
  folder, and reads a person's answers from ``answers.csv`` (``index,label``; the label as a
  class name or class number). It waits up to ``wait_seconds`` for them; a run whose query is
  not fully answered stops cleanly (``AwaitingAnswers``) and resumes when run again.
"""

from __future__ import annotations

import csv
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from labelkit_ext.engine.checkpoint import temp_path
from labelkit_ext.engine.report import unit_range
from labelkit_ext.errors import UsageError, reading

__all__ = [
    "ANSWERS_FILE",
    "QUERIES_FILE",
    "AwaitingAnswers",
    "FileOracle",
    "Oracle",
    "SimulatedOracle",
    "pool_image",
]

QUERIES_FILE = "queries.csv"
ANSWERS_FILE = "answers.csv"
THUMBNAIL_DIR = "thumbnails"
THUMBNAIL_MIN_SIDE = 96  # small images (8x8 digits) are upscaled so a person can see them


class AwaitingAnswers(RuntimeError):
    """The oracle has not answered the whole query yet; the run stopped and can be resumed."""

    def __init__(self, missing: Sequence[int], where: str) -> None:
        self.missing = list(missing)
        super().__init__(
            f"waiting for {len(self.missing)} answer(s) ({where}); the answers given so far are "
            "saved: run the same command again with --resume once they are in"
        )


class Oracle(ABC):
    """Labels pool samples on request."""

    @abstractmethod
    def answer(self, indices: Sequence[int], round: int) -> dict[int, int]:
        """Labels (class indices) for some or all of ``indices``, the query of ``round``."""

    def describe(self) -> str:
        return type(self).__name__


class SimulatedOracle(Oracle):
    """Answers every query at once with the data set's true labels."""

    def __init__(self, targets: torch.Tensor | Sequence[int]) -> None:
        targets = torch.as_tensor(targets)
        if targets.ndim != 1:
            raise UsageError(
                f"targets must be 1-D class indices (multi-class data), got shape {tuple(targets.shape)}"
            )
        self.targets = targets.long()
        self.asked = 0  # how many labels were revealed (tests check nothing is asked twice)

    def check_pool(self, pool_size: int) -> None:
        """One label per pool sample: other targets (the test split's, say) would answer out of
        range, or silently with labels of other images."""
        if len(self.targets) != pool_size:
            raise UsageError(
                f"SimulatedOracle has {len(self.targets):,} targets for a pool of {pool_size:,} "
                "samples: pass the pool's own targets, one per sample in pool order"
            )

    def answer(self, indices: Sequence[int], round: int) -> dict[int, int]:
        self.asked += len(indices)
        return {int(i): int(self.targets[int(i)]) for i in indices}

    def describe(self) -> str:
        return "simulated (reveals the data set's labels)"


def pool_image(dataset: object, index: int) -> torch.Tensor:
    """The untransformed uint8 (C, H, W) image ``index`` of a labelkit dataset (in-memory
    ``TensorImageDataset`` or file-backed ``ImageFileDataset``)."""
    if hasattr(dataset, "images"):
        return dataset.images[index]
    if hasattr(dataset, "load"):
        return dataset.load(index)
    raise UsageError(f"cannot read raw images from a {type(dataset).__name__} for thumbnails")


def _write_atomic_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    tmp = temp_path(path)
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _displayable(image: torch.Tensor) -> torch.Tensor:
    """uint8 ``[C, H, W]`` (C = 1, 3 or 4: gray, RGB, RGBA) to show a person: uint8 as given; any other dtype
    (normalised floats, 16-bit scans) stretched from its own min..max to 0..255 (casting
    normalised floats to uint8 wrapped them into noise)."""
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] not in (1, 3, 4):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise UsageError(
            f"FileOracle: image(i) must return a [C, H, W] tensor with C 1, 3 or 4, got {shape}"
        )
    image = image.detach().cpu()
    if image.dtype == torch.uint8:
        return image
    return (unit_range(image) * 255).round().to(torch.uint8)


def _save_thumbnail(image: torch.Tensor, path: Path) -> None:
    array = _displayable(image).numpy()
    array = array[0] if array.shape[0] == 1 else np.transpose(array, (1, 2, 0))
    picture = Image.fromarray(np.ascontiguousarray(array))
    scale = max(1, -(-THUMBNAIL_MIN_SIDE // max(picture.size)))
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    tmp = temp_path(path)
    picture.save(tmp, format="PNG")
    os.replace(tmp, path)


class FileOracle(Oracle):
    """A person answers through files in ``folder``.

    For each query it writes ``queries.csv`` (index, thumbnail, empty label column) and
    ``thumbnails/<index>.png``; the person writes ``answers.csv`` with columns ``index,label``
    (copying queries.csv and filling the label column works). Labels may be class names or
    class numbers. ``answer`` polls every ``poll_seconds`` for up to ``wait_seconds`` (0: look
    once) and returns the answers found for the query; rows for other indices are ignored.
    ``image(i)`` returns pool image ``i`` as ``[C, H, W]`` (C = 1, 3 or 4): uint8 is shown as is,
    other dtypes (normalised floats) stretched from their own min..max.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        image: Callable[[int], torch.Tensor],
        class_names: Sequence[str],
        *,
        wait_seconds: float = 0.0,
        poll_seconds: float = 2.0,
    ) -> None:
        if wait_seconds < 0 or poll_seconds <= 0:
            raise UsageError(
                f"wait_seconds must be >= 0 and poll_seconds > 0, got {wait_seconds}, {poll_seconds}"
            )
        self.folder = Path(folder)
        self.image = image
        self.class_names = list(class_names)
        self.wait_seconds = wait_seconds
        self.poll_seconds = poll_seconds

    @property
    def queries_path(self) -> Path:
        return self.folder / QUERIES_FILE

    @property
    def answers_path(self) -> Path:
        return self.folder / ANSWERS_FILE

    def describe(self) -> str:
        return f"file ({self.queries_path} -> {self.answers_path})"

    def write_query(self, indices: Sequence[int], round: int) -> None:
        """queries.csv and the thumbnails of ``indices`` (existing thumbnails are kept)."""
        thumbs = self.folder / THUMBNAIL_DIR
        thumbs.mkdir(parents=True, exist_ok=True)
        rows = []
        for i in indices:
            png = thumbs / f"{int(i)}.png"
            if not png.exists():
                _save_thumbnail(self.image(int(i)), png)
            rows.append([int(i), png.relative_to(self.folder).as_posix(), round, ""])
        _write_atomic_csv(self.queries_path, ["index", "thumbnail", "round", "label"], rows)

    def parse_label(self, text: str, where: str) -> int:
        """A class name, else a class number; anything else is a ValueError naming ``where``."""
        text = text.strip()
        if text in self.class_names:
            return self.class_names.index(text)
        try:
            value = int(text)
        except ValueError:
            value = -1
        if 0 <= value < len(self.class_names):
            return value
        raise UsageError(
            f"{where}: label {text!r} is neither a class name {self.class_names} nor a class "
            f"number in [0, {len(self.class_names)})"
        )

    def read_answers(self) -> dict[int, int]:
        """Every answered row of answers.csv (rows with an empty label are skipped; an index
        answered twice must have one label)."""
        if not self.answers_path.is_file():
            return {}
        answers: dict[int, int] = {}
        first_line: dict[int, int] = {}
        with (
            reading(self.answers_path, "answers: a CSV with columns index, label"),
            open(self.answers_path, newline="") as f,
        ):
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"index", "label"} <= set(reader.fieldnames):
                raise UsageError(f"{self.answers_path} needs the columns 'index' and 'label'")
            for line, row in enumerate(reader, start=2):
                label = (row.get("label") or "").strip()
                if not label:
                    continue
                where = f"{self.answers_path} line {line}"
                try:
                    index = int(row["index"])
                except (TypeError, ValueError) as exc:
                    raise UsageError(f"{where}: index {row['index']!r} is not an integer") from exc
                value = self.parse_label(label, where)
                if index in answers and answers[index] != value:
                    raise UsageError(
                        f"{where}: index {index} is answered differently on line "
                        f"{first_line[index]}; keep one answer"
                    )
                answers[index] = value
                first_line.setdefault(index, line)
        return answers

    def answer(self, indices: Sequence[int], round: int) -> dict[int, int]:
        wanted = {int(i) for i in indices}
        self.write_query(indices, round)
        deadline = time.monotonic() + self.wait_seconds
        while True:
            found = {i: y for i, y in self.read_answers().items() if i in wanted}
            if len(found) == len(wanted) or time.monotonic() >= deadline:
                return found
            time.sleep(min(self.poll_seconds, max(0.0, deadline - time.monotonic())))
