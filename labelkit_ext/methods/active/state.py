"""The state of one active-learning run, saved atomically after every oracle answer.

``ActiveState`` holds what cannot be recomputed: the labeled pool indices and the labels the
oracle gave (in the order it gave them), the round, the query waiting for answers, and the
per-round records. It is a small JSON file with a SHA-256 checksum of its body and a
fingerprint of the run's settings. ``save_state`` writes a temporary file, fsyncs it, renames
it over the old one and fsyncs the folder, so a kill at any instant leaves either the old
state or the new one. ``load_state`` refuses a corrupt file or one written by a run with other
settings (``StateError``), never resetting it silently.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from labelkit_ext.engine.checkpoint import temp_path
from labelkit_ext.errors import UsageError

__all__ = ["STATE_FILE", "STATE_FORMAT", "ActiveState", "StateError", "load_state", "save_state"]

STATE_FILE = "state.json"
STATE_FORMAT = "labelkit-active-state"
STATE_VERSION = 1


class StateError(UsageError):
    """A state file that cannot be trusted: corrupt, of another format, or of another run."""


@dataclass
class ActiveState:
    """Everything a killed run needs to continue exactly where it stopped.

    ``labeled`` and ``labels`` are parallel lists (pool index, label from the oracle);
    ``pending`` is the query of the current round still (partly) unanswered, so a resumed
    run asks for exactly the same samples and never re-asks an answered one; ``round`` counts
    finished rounds (round 0 is the initial labeled set). ``records`` hold one dict per
    evaluated round (labels, accuracy, timings).
    """

    fingerprint: dict[str, Any]
    labeled: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    round: int = 0
    pending: list[int] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)

    def add_answers(self, answers: dict[int, int]) -> list[int]:
        """Record the answers for pending indices (others are ignored); returns the indices
        newly labeled, in pending order."""
        new = [i for i in self.pending if i in answers]
        for i in new:
            self.labeled.append(i)
            self.labels.append(int(answers[i]))
        self.pending = [i for i in self.pending if i not in answers]
        return new

    def validate(self, pool_size: int, num_classes: int) -> None:
        """Raise ``StateError`` unless the indices and labels are consistent with the pool."""
        if len(self.labeled) != len(self.labels):
            raise StateError(
                f"state has {len(self.labeled)} labeled indices but {len(self.labels)} labels"
            )
        every = self.labeled + self.pending
        if len(set(every)) != len(every):
            raise StateError("state lists a pool index twice (labeled or pending)")
        bad = [i for i in every if not 0 <= i < pool_size]
        if bad:
            raise StateError(f"state holds pool indices outside [0, {pool_size}): {bad[:5]}")
        wrong = [y for y in self.labels if not 0 <= y < num_classes]
        if wrong:
            raise StateError(f"state holds labels outside [0, {num_classes}): {wrong[:5]}")
        if self.round < 0:
            raise StateError(f"state round must be >= 0, got {self.round}")


def _digest(body: dict[str, Any]) -> str:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable: fsync the folder holding it (a no-op where folders cannot be
    opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_state(path: str | os.PathLike, state: ActiveState) -> Path:
    """Write ``state`` to ``path`` atomically and durably (temp file, fsync, rename, fsync)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = asdict(state)
    doc = {"format": STATE_FORMAT, "version": STATE_VERSION, "sha256": _digest(body), "state": body}
    tmp = temp_path(path)
    try:
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _mismatches(saved: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(expected))
    return [
        f"{k}={saved.get(k)!r} -> {expected.get(k)!r}"
        for k in keys
        if saved.get(k) != expected.get(k)
    ]


def load_state(
    path: str | os.PathLike, fingerprint: dict[str, Any], pool_size: int, num_classes: int
) -> ActiveState:
    """Read and check the state at ``path``.

    Raises ``StateError`` when the file is not valid JSON, not a labelkit active-learning
    state, fails its checksum, was written with other run settings than ``fingerprint``, or
    holds indices / labels that do not fit a pool of ``pool_size`` and ``num_classes``.
    """
    path = Path(path)
    hint = "delete it or choose another --out to start afresh"
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateError(f"state file {path} is unreadable or corrupt ({exc}); {hint}") from exc
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
        raise StateError(f"{path} is not a labelkit active-learning state file; {hint}")
    if doc.get("version") != STATE_VERSION:
        raise StateError(
            f"{path} has state version {doc.get('version')!r}, expected {STATE_VERSION}"
        )
    body = doc.get("state")
    if not isinstance(body, dict) or doc.get("sha256") != _digest(body):
        raise StateError(f"state file {path} fails its checksum (edited or corrupt); {hint}")
    try:
        state = ActiveState(**body)
    except TypeError as exc:
        raise StateError(f"state file {path} has unexpected fields ({exc}); {hint}") from exc
    changed = _mismatches(state.fingerprint, fingerprint)
    if changed:
        raise StateError(
            f"state file {path} belongs to a run with other settings ({', '.join(changed)}); "
            f"resume with the same settings, or {hint}"
        )
    state.validate(pool_size, num_classes)
    return state
