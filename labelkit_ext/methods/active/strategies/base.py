"""What every query strategy shares: the pool scores it reads, the selection context, the
``Strategy`` base class with its one ``select`` method, and the registry of strategies by name.

A new strategy is one file in this package: a ``Strategy`` subclass decorated with
``@register_strategy``; ``strategies/__init__.py`` imports every module of the package.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from labelkit_ext.distributed import shard_bounds
from labelkit_ext.engine.distributed import DistInfo
from labelkit_ext.errors import UsageError

__all__ = [
    "NEEDS",
    "PoolScores",
    "SelectionContext",
    "Strategy",
    "available_strategies",
    "build_strategy",
    "check_finite_scores",
    "check_selection",
    "register_strategy",
    "select",
    "top_unlabeled",
]

# What a strategy may ask the learner for: class logits, penultimate embeddings, and logits
# under S Monte-Carlo dropout masks.
NEEDS = ("logits", "embeddings", "mc_logits")


@dataclass
class PoolScores:
    """The learner's view of the whole pool, rows in pool order: ``logits`` (N, C),
    ``embeddings`` (N, D), ``mc_logits`` (S, N, C); each None unless a strategy needs it."""

    logits: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None
    mc_logits: torch.Tensor | None = None


@dataclass
class SelectionContext:
    """Everything ``select`` sees.

    ``labeled`` holds the labeled pool indices and ``labels`` their labels (from the oracle);
    ``budget`` is how many new indices to return (at most the unlabeled count); ``seed`` and
    ``round`` seed random choices so a resumed run selects the same batch. ``dist_info``: the
    ranks that select together (``ActiveLoop`` passes ``current_dist()`` under torchrun, and
    every rank then calls ``select``); by default one process, whatever else runs.
    """

    scores: PoolScores
    labeled: torch.Tensor
    labels: torch.Tensor
    budget: int
    pool_size: int
    num_classes: int
    round: int = 0
    seed: int = 0
    dist_info: DistInfo = field(default_factory=DistInfo)

    def __post_init__(self) -> None:
        self.labeled = torch.as_tensor(self.labeled, dtype=torch.long).reshape(-1)
        self.labels = torch.as_tensor(self.labels, dtype=torch.long).reshape(-1)
        if len(self.labeled) != len(self.labels):
            raise ValueError(
                f"labeled ({len(self.labeled)}) and labels ({len(self.labels)}) differ in length"
            )
        if self.budget < 1:
            raise ValueError(f"budget must be >= 1, got {self.budget}")

    @property
    def device(self) -> torch.device:
        for t in (self.scores.logits, self.scores.embeddings, self.scores.mc_logits):
            if t is not None:
                return t.device
        return torch.device("cpu")

    def unlabeled_mask(self) -> torch.Tensor:
        """(N,) bool on the scores' device: True where a pool sample has no label."""
        mask = torch.ones(self.pool_size, dtype=torch.bool, device=self.device)
        mask[self.labeled.to(self.device)] = False
        return mask

    def unlabeled(self) -> torch.Tensor:
        """Unlabeled pool indices, ascending, on the scores' device."""
        return self.unlabeled_mask().nonzero().squeeze(1)

    def shard(self, rows: int) -> slice:
        """This rank's contiguous share of ``rows`` rows under ``dist_info`` (all of them for one
        process). The pairwise strategies hand it, with ``dist_info``, to the sharded ops of
        :mod:`labelkit_ext.distributed`, which give the whole pool's answer on every rank: each
        rank does 1/world of the pairwise work."""
        start, end = shard_bounds(rows, self.dist_info)
        return slice(start, end)

    def generator(self) -> torch.Generator:
        """A CPU generator seeded by (seed, round): the same random choices on resume."""
        from labelkit_ext.engine import derive_seed

        return torch.Generator().manual_seed(derive_seed(self.seed, self.round))

    def require(self, name: str, strategy: str) -> torch.Tensor:
        value = getattr(self.scores, name)
        if value is None:
            raise ValueError(f"strategy {strategy!r} needs pool {name}, which were not computed")
        return value


class Strategy(ABC):
    """A query strategy: ``select(ctx)`` returns ``ctx.budget`` unlabeled pool indices, the
    first the most wanted. ``needs`` names the ``PoolScores`` fields it reads. Strategies that
    keep something across rounds (Cluster-Margin's clusters) return it from ``state_dict`` so a
    resumed run selects exactly what an uninterrupted one would. With a multi-rank
    ``ctx.dist_info`` ``select`` runs on every rank with the same scores (the pairwise
    strategies split their work through ``ctx.shard``)."""

    name: ClassVar[str] = ""
    needs: ClassVar[tuple[str, ...]] = ("logits",)

    @abstractmethod
    def select(self, ctx: SelectionContext) -> torch.Tensor:
        """(budget,) int64 pool indices, none labeled, no repeats."""

    def params(self) -> dict[str, Any]:
        """The settings that change what is selected (recorded in the run's fingerprint)."""
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"strategy {self.name!r} keeps no state, got keys {sorted(state)}")


_STRATEGIES: dict[str, Callable[..., Strategy]] = {}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make ``cls`` available by ``cls.name``."""
    if not cls.name or cls.name != cls.name.lower():
        raise ValueError(f"strategy name must be lower-case and non-empty, got {cls.name!r}")
    if any(n not in NEEDS for n in cls.needs):
        raise ValueError(f"strategy {cls.name!r}: needs must be among {NEEDS}, got {cls.needs}")
    existing = _STRATEGIES.get(cls.name)
    if existing is not None and existing.__module__ != cls.__module__:
        raise ValueError(f"strategy {cls.name!r} is already registered by {existing.__module__}")
    _STRATEGIES[cls.name] = cls
    return cls


def available_strategies() -> list[str]:
    return sorted(_STRATEGIES)


def build_strategy(name: str, **params: Any) -> Strategy:
    """The strategy ``name``; ``params`` are passed to its constructor where it takes them
    (so one set of command-line options serves every strategy)."""
    import inspect

    if name not in _STRATEGIES:
        raise UsageError(f"strategy must be one of {available_strategies()}, got {name!r}")
    cls = _STRATEGIES[name]
    accepted = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in params.items() if k in accepted})


def top_unlabeled(score: torch.Tensor, ctx: SelectionContext, k: int | None = None) -> torch.Tensor:
    """The ``k`` (default ``ctx.budget``) unlabeled pool indices with the largest ``score``
    ((N,) over the whole pool, or (U,) over ``ctx.unlabeled()``), largest first."""
    unlabeled = ctx.unlabeled()
    if score.shape[0] == ctx.pool_size and score.shape[0] != unlabeled.shape[0]:
        score = score[unlabeled]
    k = min(ctx.budget if k is None else k, unlabeled.numel())
    return unlabeled[torch.topk(score, k).indices]


def check_selection(chosen: torch.Tensor, ctx: SelectionContext, strategy: str) -> torch.Tensor:
    """``chosen`` as CPU int64 after checking the contract every strategy keeps: exactly
    min(budget, unlabeled) distinct, in-range, unlabeled indices."""
    chosen = torch.as_tensor(chosen).reshape(-1).long().cpu()
    expected = min(ctx.budget, ctx.pool_size - len(ctx.labeled))
    if chosen.numel() != expected:
        raise RuntimeError(
            f"strategy {strategy!r} returned {chosen.numel()} indices, expected {expected}"
        )
    if chosen.numel() and (chosen.min() < 0 or chosen.max() >= ctx.pool_size):
        raise RuntimeError(f"strategy {strategy!r} returned indices outside [0, {ctx.pool_size})")
    if chosen.unique().numel() != chosen.numel():
        raise RuntimeError(f"strategy {strategy!r} returned an index twice")
    if torch.isin(chosen, ctx.labeled.cpu()).any():
        raise RuntimeError(f"strategy {strategy!r} re-queried a labeled sample")
    return chosen


def check_finite_scores(ctx: SelectionContext, strategy: Strategy) -> None:
    """A clear error for NaN/inf pool scores, before any op sees them (on every rank alike:
    every rank holds the whole pool's scores)."""
    for name in strategy.needs:
        value = getattr(ctx.scores, name)
        if value is not None and not bool(torch.isfinite(value).all()):
            raise ValueError(
                f"strategy {strategy.name!r}: the pool's {name} hold NaN or inf (a diverged "
                "model, or float16 overflow): no selection can rank them"
            )


def select(strategy: Strategy, ctx: SelectionContext) -> torch.Tensor:
    """``strategy.select(ctx)`` on finite scores (``check_finite_scores``), checked (see
    ``check_selection``)."""
    check_finite_scores(ctx, strategy)
    return check_selection(strategy.select(ctx), ctx, strategy.name)
