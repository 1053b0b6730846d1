"""The exception for mistakes in what a user asked for.

``UsageError`` marks our own checks of options, config fields and data files. ``labelkit``
prints it as one ``labelkit: error:`` line and exits 2; any other exception is a bug (ours or a
library's) and keeps its traceback (exit 1). It subclasses ``ValueError`` so Python callers that
catch ``ValueError`` keep working.
"""

from __future__ import annotations

__all__ = ["MissingFileError", "UsageError"]


class UsageError(ValueError):
    """A bad option value, config field, method or data set name, or a missing/malformed file."""


class MissingFileError(UsageError, FileNotFoundError):
    """A file or folder the user pointed at (or the default data folder) does not exist."""
