"""The curriculum's tasks, built from a multi-hot label matrix alone.

A confusion matrix cannot group classes when an image carries several labels, so the
auxiliary tasks come from the label structure: "no finding" vs "any finding" on every image
(binary), which super-class of co-occurring findings on the images whose findings fall in one
super-class (superclass), which finding on the images with exactly one (multiclass), and the
target, every finding (multilabel).

Each task knows how to turn its head's outputs into a score per finding (``score_map``), so
the target's mean AUC can be followed through every stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from labelkit_ext.engine import scores_from_logits
from labelkit_ext.errors import UsageError

__all__ = [
    "TASK_KINDS",
    "LabelTask",
    "findings_matrix",
    "binary_task",
    "superclass_task",
    "multiclass_task",
    "multilabel_task",
    "build_task",
    "cooccurrence_similarity",
    "cooccurrence_groups",
    "default_num_superclasses",
]

TASK_KINDS = ("binary", "superclass", "multiclass", "multilabel")
BINARY_NAMES = ("no finding", "any finding")


@dataclass(frozen=True)
class LabelTask:
    """One stage's task over a label matrix of N images and K findings.

    ``rows`` are the images it trains on (indices into the matrix), ``targets`` their labels
    (int64 class indices for the softmax tasks, float32 multi-hot for ``multilabel``).
    ``score_map`` (outputs, K) maps the head's probabilities to one score per finding.
    """

    kind: str
    engine_task: str  # "multiclass" (softmax, cross-entropy) or "multilabel" (sigmoid, BCE)
    class_names: tuple[str, ...]
    rows: torch.Tensor
    targets: torch.Tensor
    score_map: torch.Tensor

    @property
    def num_outputs(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.rows)

    def class_counts(self) -> list[int]:
        """Training images per output class (positives per finding for ``multilabel``)."""
        if self.engine_task == "multilabel":
            return [int(c) for c in self.targets.sum(0).tolist()]
        return torch.bincount(self.targets, minlength=self.num_outputs).tolist()

    def finding_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, K) scores per finding from this head's (N, outputs) logits: the sigmoid for the
        target; for the softmax tasks the probability of the class a finding belongs to."""
        if logits.ndim != 2 or logits.shape[1] != self.num_outputs:
            raise UsageError(
                f"logits must be (N, {self.num_outputs}) for the {self.kind} task, "
                f"got {tuple(logits.shape)}"
            )
        return scores_from_logits(logits, self.engine_task) @ self.score_map

    def summary(self) -> dict:
        """Kind, size and per-class counts, for results.json."""
        return {
            "kind": self.kind,
            "images": len(self),
            "classes": list(self.class_names),
            "class_counts": self.class_counts(),
        }


def _as_matrix(labels: torch.Tensor | np.ndarray) -> torch.Tensor:
    y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    if y.ndim != 2 or y.shape[1] < 1:
        raise UsageError(
            f"labels must be a 2-D (N, K) multi-hot matrix, got shape {tuple(y.shape)}"
        )
    y = y.to(torch.float32)
    if not torch.all((y == 0) | (y == 1)):
        raise UsageError("labels must hold only 0 and 1 (a multi-hot matrix)")
    return y


def findings_matrix(
    labels: torch.Tensor | np.ndarray,
    class_names: Sequence[str] | None = None,
    no_finding: int | str | None = None,
) -> tuple[torch.Tensor, tuple[str, ...]]:
    """The (N, K) float32 finding matrix and the finding names from a multi-hot ``labels``.

    ``no_finding`` names (or indexes) an explicit "no finding" column: it is dropped, and
    each row must then say exactly one thing (that column, or some findings). Without it an
    all-zero row is an image with no finding (NIH's "No Finding" images load that way).
    """
    y = _as_matrix(labels)
    names = (
        tuple(class_names) if class_names is not None else tuple(str(i) for i in range(y.shape[1]))
    )
    if len(names) != y.shape[1]:
        raise UsageError(f"class_names has {len(names)} names for {y.shape[1]} label columns")
    if no_finding is None:
        return y, names
    if isinstance(no_finding, str):
        if no_finding not in names:
            raise UsageError(f"no_finding {no_finding!r} is not one of the class names {names}")
        column = names.index(no_finding)
    else:
        column = int(no_finding)
        if not 0 <= column < y.shape[1]:
            raise UsageError(f"no_finding column {column} is outside [0, {y.shape[1]})")
    keep = [c for c in range(y.shape[1]) if c != column]
    if not keep:
        raise UsageError("labels hold only the no_finding column: there is no finding to learn")
    findings, healthy = y[:, keep], y[:, column]
    contradictory = (healthy == 1) & (findings.sum(1) > 0)
    unlabelled = (healthy == 0) & (findings.sum(1) == 0)
    for mask, what in (
        (contradictory, "both 'no finding' and a finding"),
        (unlabelled, "neither 'no finding' nor a finding"),
    ):
        if mask.any():
            rows = mask.nonzero().flatten()[:5].tolist()
            raise UsageError(f"{int(mask.sum())} label rows say {what}, e.g. rows {rows}")
    return findings, tuple(names[c] for c in keep)


def binary_task(findings: torch.Tensor) -> LabelTask:
    """Every image: class 0 "no finding" (all-zero row), class 1 "any finding"."""
    y = _as_matrix(findings)
    k = y.shape[1]
    score_map = torch.zeros(2, k)
    score_map[1] = 1.0  # every finding scores P(any finding)
    return LabelTask(
        "binary",
        "multiclass",
        BINARY_NAMES,
        torch.arange(len(y)),
        (y.sum(1) > 0).to(torch.int64),
        score_map,
    )


def multiclass_task(findings: torch.Tensor, names: Sequence[str] | None = None) -> LabelTask:
    """The images with exactly one finding, softmax over all K findings (a finding that never
    occurs alone keeps its output and gets no training image)."""
    y = _as_matrix(findings)
    rows = (y.sum(1) == 1).nonzero().flatten()
    if len(rows) == 0:
        raise UsageError("the multiclass task has no image: no image carries exactly one finding")
    k = y.shape[1]
    return LabelTask(
        "multiclass",
        "multiclass",
        _names(names, k),
        rows,
        y[rows].argmax(1),
        torch.eye(k),
    )


def superclass_task(
    findings: torch.Tensor, groups: torch.Tensor | Sequence[int], names: Sequence[str] | None = None
) -> LabelTask:
    """The images with at least one finding whose findings all lie in one super-class,
    softmax over the G super-classes (``groups``: (K,) super-class id per finding)."""
    y = _as_matrix(findings)
    k = y.shape[1]
    groups = _check_groups(groups, k)
    num_groups = int(groups.max()) + 1
    membership = torch.nn.functional.one_hot(groups, num_groups).to(torch.float32)  # (K, G)
    per_group = y @ membership  # findings of each image in each group
    rows = ((per_group > 0).sum(1) == 1).nonzero().flatten()
    if len(rows) == 0:
        raise UsageError(
            "the superclass task has no image: no image's findings lie in one super-class"
        )
    finding_names = _names(names, k)
    group_names = tuple(
        "+".join(finding_names[f] for f in range(k) if groups[f] == g) for g in range(num_groups)
    )
    return LabelTask(
        "superclass",
        "multiclass",
        group_names,
        rows,
        per_group[rows].argmax(1),
        membership.T.contiguous(),  # a finding scores its super-class's probability
    )


def multilabel_task(findings: torch.Tensor, names: Sequence[str] | None = None) -> LabelTask:
    """The target: every image, a sigmoid per finding."""
    y = _as_matrix(findings)
    k = y.shape[1]
    return LabelTask(
        "multilabel", "multilabel", _names(names, k), torch.arange(len(y)), y, torch.eye(k)
    )


def build_task(
    kind: str,
    findings: torch.Tensor,
    names: Sequence[str] | None = None,
    groups: torch.Tensor | Sequence[int] | None = None,
) -> LabelTask:
    """The task ``kind`` (one of ``TASK_KINDS``); ``superclass`` needs ``groups``."""
    if kind == "binary":
        return binary_task(findings)
    if kind == "multiclass":
        return multiclass_task(findings, names)
    if kind == "multilabel":
        return multilabel_task(findings, names)
    if kind == "superclass":
        if groups is None:
            raise UsageError("the superclass task needs groups (a super-class id per finding)")
        return superclass_task(findings, groups, names)
    raise UsageError(f"task kind must be one of {TASK_KINDS}, got {kind!r}")


def cooccurrence_similarity(findings: torch.Tensor) -> torch.Tensor:
    """(K, K) float64 Ochiai coefficient ``n_ij / sqrt(n_i n_j)``: how often two findings occur
    together relative to how often each occurs (0 for a finding that never occurs; 1 on the
    diagonal)."""
    y = _as_matrix(findings).double()
    together = y.T @ y
    counts = together.diagonal().clone()
    scale = torch.sqrt(torch.outer(counts, counts))
    sim = torch.where(scale > 0, together / scale.clamp_min(1e-300), torch.zeros_like(together))
    sim.fill_diagonal_(1.0)
    return sim


def default_num_superclasses(num_findings: int) -> int:
    """About sqrt(K) super-classes: 3 for 10 findings, 4 for NIH's 14."""
    return int(min(max(2, round(np.sqrt(num_findings))), num_findings - 1))


def cooccurrence_groups(findings: torch.Tensor, num_groups: int) -> torch.Tensor:
    """(K,) int64 super-class id per finding: average-linkage agglomerative clustering of the
    distance ``1 - cooccurrence_similarity``. Groups are numbered by their first finding
    (finding 0 is in group 0); deterministic."""
    y = _as_matrix(findings)
    k = y.shape[1]
    if not 2 <= num_groups <= k - 1:
        raise UsageError(
            f"num_superclasses must be in [2, {k - 1}] for {k} findings, got {num_groups}"
        )
    distance = (1.0 - cooccurrence_similarity(y)).clamp_min(0.0).numpy()
    # Imported here, not at the top: `labelkit run --help` would wait for it.
    from sklearn.cluster import AgglomerativeClustering

    labels = AgglomerativeClustering(
        n_clusters=num_groups, metric="precomputed", linkage="average"
    ).fit_predict(distance)
    first_seen = {}
    for label in labels:
        first_seen.setdefault(int(label), len(first_seen))
    return torch.tensor([first_seen[int(label)] for label in labels], dtype=torch.int64)


def _names(names: Sequence[str] | None, k: int) -> tuple[str, ...]:
    if names is None:
        return tuple(str(i) for i in range(k))
    if len(names) != k:
        raise UsageError(f"names has {len(names)} entries for {k} findings")
    return tuple(names)


def _check_groups(groups: torch.Tensor | Sequence[int], k: int) -> torch.Tensor:
    g = torch.as_tensor(groups).to(torch.int64).reshape(-1)
    if len(g) != k:
        raise UsageError(f"groups must hold one super-class id per finding ({k}), got {len(g)}")
    if len(g) and int(g.min()) < 0:
        raise UsageError("groups must be non-negative super-class ids")
    present = torch.unique(g)
    if len(present) < 2 or not torch.equal(present, torch.arange(len(present))):
        raise UsageError(f"groups must use every id 0..G-1 with G >= 2, got ids {present.tolist()}")
    return g
