"""The exception for mistakes in what a user asked for.

``UsageError`` marks our own checks of options, config fields and data files. ``labelkit``
prints it as one ``labelkit: error:`` line and exits 2; any other exception is a bug (ours or a
library's) and keeps its traceback (exit 1). It subclasses ``ValueError`` so Python callers that
catch ``ValueError`` keep working.
"""

from __future__ import annotations

import contextlib
import csv
import os
import pickle
import zipfile
import zlib
from collections.abc import Iterator

__all__ = ["MissingFileError", "UsageError", "reading"]

# What reading and parsing a bad file raises: truncated or empty (EOFError), not an archive
# (BadZipFile, zlib.error), numpy's "pickled data" ValueError for a file that is no .npy/.npz,
# torch.load's UnpicklingError / RuntimeError ("failed finding central directory") and, on
# random bytes, KeyError / IndexError from its legacy unpickler; csv.Error.
_READ_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    RuntimeError,
    KeyError,
    IndexError,
    zipfile.BadZipFile,
    zlib.error,
    pickle.UnpicklingError,
    csv.Error,
)


class UsageError(ValueError):
    """A bad option value, config field, method or data set name, or a missing/malformed file."""


class MissingFileError(UsageError, FileNotFoundError):
    """A file or folder the user pointed at (or the default data folder) does not exist."""


def _reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    if text.startswith("Weights only load failed"):  # torch.load's advice, then the reason
        paragraphs = [" ".join(p.split()) for p in str(exc).split("\n\n")[1:]]
        detail = [
            p.split("WeightsUnpickler error:", 1)[-1].strip()
            for p in paragraphs
            if not p.startswith("Check the documentation")
        ]
        reason = "; ".join(d for d in detail if d) or "unsupported content"
        return (
            f"not a plain tensor/weights file (torch.load(weights_only=True) refused it: {reason})"
        )
    if isinstance(exc, EOFError) or not text:
        return "the file is empty or truncated" if isinstance(exc, EOFError) else type(exc).__name__
    if "allow_pickle" in text:  # numpy's guess for bytes that are no .npy/.npz
        return "not a NumPy .npy/.npz file"
    if isinstance(exc, (KeyError, IndexError)):  # a parser lost in bytes of another format
        return f"unrecognised file format ({type(exc).__name__}: {text})"
    return text


@contextlib.contextmanager
def reading(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Around the reading and parsing of a user's file ``path``: a failure becomes
    ``UsageError("could not read <path> (<what>): <reason>")`` instead of a library's
    traceback. Keep only the reading inside: any RuntimeError or ValueError there is blamed on
    the file."""
    try:
        yield
    except UsageError:
        raise
    except _READ_ERRORS as exc:
        raise UsageError(f"could not read {path} ({what}): {_reason(exc)}") from exc
