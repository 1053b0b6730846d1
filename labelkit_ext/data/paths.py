"""Where data lives, and the error that says what is missing and where to get it."""

from __future__ import annotations

import os
from pathlib import Path

from labelkit_ext.errors import MissingFileError

__all__ = ["DATA_ENV", "DataNotFoundError", "default_data_dir", "resolve_data_dir", "missing"]

DATA_ENV = "LABELKIT_DATA"

# The source tree's root (the folder holding labelkit_ext/); `../shared/data` is relative to it.
_PROJECT_ROOT = Path(__file__).resolve().parents[2]

SOURCES = {
    "medmnist": "MedMNIST v2 on Zenodo (https://zenodo.org/records/6496656), or "
    "`pip install medmnist` then `python -m medmnist download`",
    "cifar": "https://www.cs.toronto.edu/~kriz/cifar.html",
    "nih": "https://nihcc.app.box.com/v/ChestXray-NIHCC",
}


class DataNotFoundError(MissingFileError):
    """A data file or folder is missing; the message names it, the layout and the source."""


def default_data_dir() -> Path:
    """The data folder used when none is given: ``$LABELKIT_DATA``, else ``../shared/data``.

    ``../shared/data`` is taken relative to the source tree's root, then to the current
    directory (for an installed package run from the project root).
    """
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    candidates = [_PROJECT_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """``data_dir`` as a path (a folder or a single data file), or the default data folder."""
    if data_dir is not None and not isinstance(data_dir, (str, os.PathLike)):
        raise TypeError(
            f"data_dir must be a path (str or os.PathLike), got {type(data_dir).__name__}"
        )
    return Path(data_dir).expanduser() if data_dir is not None else default_data_dir()


def missing(what: str | os.PathLike, layout: str, source: str) -> DataNotFoundError:
    """The error for a missing file: ``what`` it was, the ``layout`` expected, the ``source`` key."""
    parent = Path(what).parent
    if parent.is_file():  # a data file given where the set needs its folder
        what = f"{what} not found: {parent} is a file, and this data set is read from a folder"
    else:
        what = f"{what} not found"
    return DataNotFoundError(
        f"{what}.\nExpected layout: {layout}\nOfficial release: {SOURCES[source]}\n"
        f"Pass the folder with --data-dir (or data_dir=...), or set ${DATA_ENV}."
    )
