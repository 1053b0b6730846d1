"""Schedules (which tasks, in which order), the equal step budget, and the stream a stage
trains on.

Every schedule spends the same number of optimisation steps, so a gain is not just more
training. The budget is counted in chunks of ``eval_every`` steps (one engine epoch each,
with a validation after it); the auxiliary stages share ``aux_share`` of it and the target
stage gets the rest, so every curriculum trains the target equally long.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from labelkit_ext.engine import data_fingerprint
from labelkit_ext.errors import UsageError
from labelkit_ext.fingerprint import tensor_digest
from labelkit_ext.methods.curriculum.tasks import TASK_KINDS

__all__ = [
    "SCHEDULES",
    "DEFAULT_AUX_SHARE",
    "parse_schedule",
    "allocate_steps",
    "budget_from_epochs",
    "StageStream",
]

# The original's schedules, and the finer one its future work suggests.
SCHEDULES: dict[str, tuple[str, ...]] = {
    "default": ("multilabel",),
    "1-stage": ("multiclass", "multilabel"),
    "2-stage": ("binary", "multiclass", "multilabel"),
    "3-stage": ("binary", "superclass", "multiclass", "multilabel"),
}
DEFAULT_AUX_SHARE = 0.4


def parse_schedule(spec: str | Sequence[str]) -> tuple[str, ...]:
    """A schedule's stages: a name of ``SCHEDULES``, or stages coarse to fine as a sequence or
    a comma-separated string (e.g. ``"binary,superclass,multilabel"``), ending with
    ``multilabel`` and using each task once."""
    if isinstance(spec, str):
        if spec in SCHEDULES:
            return SCHEDULES[spec]
        stages = tuple(s.strip() for s in spec.split(",") if s.strip())
    else:
        stages = tuple(spec)
    unknown = [s for s in stages if s not in TASK_KINDS]
    if not stages or unknown:
        raise UsageError(
            f"schedule {spec!r} must be one of {sorted(SCHEDULES)} or comma-separated stages "
            f"from {TASK_KINDS}" + (f"; unknown: {unknown}" if unknown else "")
        )
    if stages[-1] != "multilabel" or len(set(stages)) != len(stages):
        raise UsageError(
            f"schedule {spec!r} must end with the target 'multilabel' and use each task once"
        )
    return stages


def allocate_steps(
    num_stages: int, total_steps: int, eval_every: int, aux_share: float = DEFAULT_AUX_SHARE
) -> list[int]:
    """Optimisation steps per stage, each a multiple of ``eval_every``, summing to
    ``total_steps``. The auxiliary stages (all but the last) share ``aux_share`` of the chunks
    equally (the earlier ones take any remainder), at least one chunk each; the target stage
    gets the rest, and all of them in a one-stage schedule."""
    if num_stages < 1:
        raise UsageError(f"num_stages must be >= 1, got {num_stages}")
    if eval_every < 1 or total_steps < 1:
        raise UsageError(
            f"total_steps and eval_every must be >= 1, got {total_steps}, {eval_every}"
        )
    if total_steps % eval_every:
        raise UsageError(
            f"total_steps ({total_steps}) must be a multiple of eval_every ({eval_every})"
        )
    if not 0.0 < aux_share < 1.0:
        raise UsageError(f"aux_share must be in (0, 1), got {aux_share}")
    chunks = total_steps // eval_every
    if chunks < num_stages:
        raise UsageError(
            f"a budget of {chunks} chunks of {eval_every} steps cannot give each of "
            f"{num_stages} stages one; raise total_steps or lower eval_every"
        )
    aux_stages = num_stages - 1
    if aux_stages == 0:
        return [total_steps]
    aux = min(max(round(aux_share * chunks), aux_stages), chunks - 1)
    base, extra = divmod(aux, aux_stages)
    per_stage = [base + (i < extra) for i in range(aux_stages)] + [chunks - aux]
    return [c * eval_every for c in per_stage]


def budget_from_epochs(
    train_size: int, batch_size: int, epochs: int, evals_per_epoch: int = 1
) -> tuple[int, int]:
    """(total_steps, eval_every) for a budget of about ``epochs`` passes over ``train_size``
    images: ``eval_every = ceil(ceil(train_size / batch_size) / evals_per_epoch)``."""
    for name, value in (("train_size", train_size), ("batch_size", batch_size),
                        ("epochs", epochs), ("evals_per_epoch", evals_per_epoch)):  # fmt: skip
        if value < 1:
            raise UsageError(f"{name} must be >= 1, got {value}")
    steps_per_epoch = -(-train_size // batch_size)
    eval_every = max(1, -(-steps_per_epoch // evals_per_epoch))
    return eval_every * evals_per_epoch * epochs, eval_every


class StageStream(Dataset):
    """A stage's training data as an endless stream, ``items_per_epoch`` at a time.

    The stream is the task's rows in a fresh random order on each pass (deterministic in
    ``seed``); engine epoch ``e`` (set by ``fit`` through ``set_epoch``) sees stream items
    ``[e * L, (e + 1) * L)``. With ``L = eval_every * batch_size`` every epoch is exactly
    ``eval_every`` full optimisation steps, whatever the task's size. Items are
    ``(image of dataset[rows[j]], targets[j])``: the image, with the task's label.
    """

    def __init__(
        self,
        dataset: Dataset,
        rows: torch.Tensor,
        targets: torch.Tensor,
        items_per_epoch: int,
        seed: int,
    ) -> None:
        if len(rows) == 0:
            raise UsageError("a stage needs at least one training image")
        if len(rows) != len(targets):
            raise UsageError(f"rows ({len(rows)}) and targets ({len(targets)}) differ in length")
        if items_per_epoch < 1:
            raise UsageError(f"items_per_epoch must be >= 1, got {items_per_epoch}")
        self.dataset = dataset
        self.rows = torch.as_tensor(rows, dtype=torch.int64)
        self.targets = targets
        self.items_per_epoch = items_per_epoch
        self.seed = seed
        self.epoch = 0
        self._orders: dict[int, np.ndarray] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed stage must find unchanged (``engine.fit`` checks it): its rows and
        labels, and the fingerprint of the images' data set (its split and transform)."""
        return {
            "rows": tensor_digest(self.rows),
            "targets": tensor_digest(torch.as_tensor(self.targets)),
            "of": data_fingerprint(self.dataset),
        }

    def __len__(self) -> int:
        return self.items_per_epoch

    def _order(self, stream_pass: int) -> np.ndarray:
        if stream_pass not in self._orders:
            if len(self._orders) > 4:  # an epoch spans at most a few passes
                self._orders.clear()
            rng = np.random.default_rng([self.seed, stream_pass])
            self._orders[stream_pass] = rng.permutation(len(self.rows))
        return self._orders[stream_pass]

    def stream_index(self, i: int) -> int:
        """The task row (index into ``rows``) at position ``i`` of the current epoch."""
        if not 0 <= i < self.items_per_epoch:
            raise IndexError(f"index {i} out of range for {self.items_per_epoch} items")
        stream_pass, offset = divmod(self.epoch * self.items_per_epoch + i, len(self.rows))
        return int(self._order(stream_pass)[offset])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        j = self.stream_index(i)
        image, _ = self.dataset[int(self.rows[j])]
        return image, self.targets[j]
