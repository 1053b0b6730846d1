"""The pool-based active-learning loop, resumable from any point.

One round: train on the labeled set, evaluate, score the pool, select a batch, ask the oracle.
Every step that produces something that cannot be recomputed identically is saved before the
next begins (``state.py``): the initial set and each query before the oracle sees it, each
oracle answer as it arrives, each round's record. Training is seeded by (seed, round) and
resumes from its last checkpoint on the same per-epoch seeds, and scoring and selection are
deterministic in (seed, round), so a run killed anywhere and resumed selects the same samples,
and asks the oracle only for what it has not answered.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from labelkit_ext.checks import check_fields
from labelkit_ext.engine import (
    current_dist,
    derive_seed,
    load_checkpoint,
    on_main,
    save_checkpoint,
)
from labelkit_ext.errors import UsageError
from labelkit_ext.methods.active.learners import Learner
from labelkit_ext.methods.active.oracles import AwaitingAnswers, Oracle
from labelkit_ext.methods.active.state import (
    STATE_FILE,
    ActiveState,
    StateError,
    load_state,
    save_state,
)
from labelkit_ext.methods.active.strategies import (
    PoolScores,
    SelectionContext,
    Strategy,
    select,
)

__all__ = [
    "STEPS",
    "STRATEGY_STATE_FILE",
    "ActiveConfig",
    "ActiveLoop",
    "check_pool",
    "initial_indices",
]

STRATEGY_STATE_FILE = "strategy_state.pt"
# The steps after which ``on_step`` is called (tests kill the process there).
STEPS = ("initial", "answered", "trained", "evaluated", "scored", "selected", "finished")


@dataclass(frozen=True)
class ActiveConfig:
    """``rounds`` queries of ``query_size`` after ``initial_size`` random labels; ``seed``
    fixes the initial set, training and every random choice; ``mc_samples`` dropout passes
    for the MC strategies."""

    rounds: int = 8
    query_size: int = 20
    initial_size: int = 20
    seed: int = 0
    mc_samples: int = 20

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("query_size", "initial_size", "mc_samples"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rounds < 0:
            raise UsageError(f"rounds must be >= 0, got {self.rounds}")


def check_pool(config: ActiveConfig, pool_size: int) -> None:
    """The initial set and a query fit the pool of ``pool_size`` (checked once it is loaded,
    before any training): a larger query would label the whole pool in one round."""
    if config.initial_size > pool_size:
        raise UsageError(
            f"initial_size ({config.initial_size:,}) is larger than the pool "
            f"({pool_size:,} images); lower --initial-size"
        )
    unlabeled = pool_size - config.initial_size
    if config.rounds > 0 and config.query_size > unlabeled:
        raise UsageError(
            f"query_size ({config.query_size:,}) is larger than the unlabeled pool: "
            f"{pool_size:,} images minus {config.initial_size} initial labels leave "
            f"{unlabeled:,}; lower --query-size"
        )


def initial_indices(pool_size: int, size: int, seed: int) -> list[int]:
    """``size`` distinct pool indices drawn uniformly, seeded (the same for every strategy)."""
    if not 1 <= size <= pool_size:
        raise UsageError(f"initial_size must be in [1, pool size {pool_size}], got {size}")
    generator = torch.Generator().manual_seed(derive_seed(seed, 0x1A1))
    return torch.randperm(pool_size, generator=generator)[:size].tolist()


class ActiveLoop:
    """Runs ``strategy`` with ``learner`` and ``oracle``; its state lives in ``out_dir``.

    ``fingerprint`` (data set, model, training settings...) is stored with the state; a
    resume with other settings, or of a corrupt state, raises ``StateError``. ``on_step(name,
    state)`` is called after each step in ``STEPS`` (progress lines; tests kill there).
    """

    def __init__(
        self,
        learner: Learner,
        strategy: Strategy,
        oracle: Oracle,
        config: ActiveConfig,
        out_dir: str | os.PathLike,
        *,
        fingerprint: dict[str, Any] | None = None,
        on_step: Callable[[str, ActiveState], None] | None = None,
    ) -> None:
        if "mc_logits" in strategy.needs and config.mc_samples < 2:
            raise UsageError(
                f"strategy {strategy.name!r} compares MC-dropout passes: mc_samples must be "
                f">= 2, got {config.mc_samples}"
            )
        check_pool(config, learner.pool_size)
        if hasattr(oracle, "check_pool"):  # optional: an oracle that can refuse a pool
            oracle.check_pool(learner.pool_size)
        self.learner = learner
        self.strategy = strategy
        self.oracle = oracle
        self.config = config
        self.out_dir = Path(out_dir)
        self.on_step = on_step
        self.fingerprint = {
            **(fingerprint or {}),
            "strategy": strategy.name,
            "strategy_params": strategy.params(),
            "pool_size": learner.pool_size,
            "num_classes": learner.num_classes,
            **{k: v for k, v in asdict(config).items() if k != "rounds"},
        }

    @property
    def state_path(self) -> Path:
        return self.out_dir / STATE_FILE

    @property
    def strategy_state_path(self) -> Path:
        return self.out_dir / STRATEGY_STATE_FILE

    def _step(self, name: str, state: ActiveState) -> None:
        if self.on_step is not None:
            self.on_step(name, state)

    def _save(self, state: ActiveState) -> None:
        if current_dist().is_main:
            save_state(self.state_path, state)

    def _open(self, resume: bool) -> ActiveState:
        """The run's state, resumed or started (and saved); under torchrun rank 0 reads or
        starts it and every rank gets that state and the strategy's kept state."""
        fresh, state, kept = on_main(lambda: self._open_on_main(resume))
        if kept:  # every rank selects with the strategy's saved state
            self.strategy.load_state_dict(kept)
        if fresh:
            self._step("initial", state)
        return state

    def _open_on_main(self, resume: bool) -> tuple[bool, ActiveState, dict]:
        if self.state_path.exists():
            if not resume:
                raise StateError(
                    f"{self.state_path} exists: pass --resume (resume=True) to continue that run, "
                    "or choose another --out"
                )
            state = load_state(
                self.state_path, self.fingerprint, self.learner.pool_size, self.learner.num_classes
            )
            if state.round > self.config.rounds:  # its records and results would disagree
                raise StateError(
                    f"{self.state_path} has {state.round} rounds done: resume with rounds >= "
                    f"{state.round} (--rounds), or choose another --out"
                )
            kept = {}
            if self.strategy_state_path.exists():
                kept = load_checkpoint(self.strategy_state_path)["strategy"]
            return False, state, kept
        # Files left by a run whose state was removed must not leak into this one.
        self.strategy_state_path.unlink(missing_ok=True)
        self.learner.reset()
        pending = initial_indices(
            self.learner.pool_size, self.config.initial_size, self.config.seed
        )
        state = ActiveState(fingerprint=self.fingerprint, pending=pending)
        save_state(self.state_path, state)
        return True, state, {}

    def _ask(self, state: ActiveState) -> None:
        """Ask the oracle for the pending query; save what it answered; finish the round when
        the query is complete, else stop (``AwaitingAnswers``)."""
        # Rank 0 alone asks (a file oracle writes the query), every rank gets its answers. The
        # query's round is the one its labels complete: 0 for the initial set, then 1, 2, ...
        completes = len(state.records)
        answers = on_main(lambda: self.oracle.answer(list(state.pending), completes))
        unknown = [i for i, y in answers.items() if not 0 <= int(y) < self.learner.num_classes]
        if unknown:
            raise UsageError(
                f"oracle gave labels outside [0, {self.learner.num_classes}) for {unknown[:5]}"
            )
        if state.add_answers(answers):
            if not state.pending and len(state.records) > state.round:
                state.round += 1  # the query of an evaluated round is complete
            self._save(state)
            self._step("answered", state)
        if state.pending:
            raise AwaitingAnswers(state.pending, self.oracle.describe())

    def _evaluate(self, state: ActiveState) -> None:
        trained = self.learner.fit(state.labeled, state.labels, state.round)
        self._step("trained", state)
        metrics = self.learner.evaluate()
        state.records.append(
            {"round": state.round, "labels": len(state.labeled), **metrics, **trained}
        )
        self._save(state)
        self._step("evaluated", state)

    def _ensure_trained(self, state: ActiveState) -> None:
        """After a resume the round's model is retrained (its checkpoint makes that instant)."""
        if not self.learner.fitted:
            self.learner.fit(state.labeled, state.labels, state.round)

    def _query(self, state: ActiveState) -> None:
        # Training, scoring and selection run on every rank (under torchrun the pairwise
        # strategies split the pool over the ranks); rank 0's query is the one every rank
        # takes, so all ask for exactly the same samples.
        self._ensure_trained(state)
        tic = time.perf_counter()
        scores = self.learner.score(self.strategy.needs, self.config.mc_samples)
        _sync(scores)
        scored = time.perf_counter()
        self._step("scored", state)
        selection = self._select(state, scores)
        chosen, selection_seconds = on_main(lambda: self._keep_strategy_state(selection))
        state.records[-1].update(
            {"scoring_seconds": scored - tic, "selection_seconds": selection_seconds}
        )
        state.pending = chosen
        self._save(state)
        self._step("selected", state)

    def _select(self, state: ActiveState, scores: PoolScores) -> tuple[list[int], float]:
        """The next query and the seconds the strategy took (on every rank; the strategy's
        kept state is saved by ``_keep_strategy_state``, on rank 0)."""
        tic = time.perf_counter()
        ctx = SelectionContext(
            scores,
            labeled=torch.as_tensor(state.labeled, dtype=torch.long),
            labels=torch.as_tensor(state.labels, dtype=torch.long),
            budget=min(self.config.query_size, self.learner.pool_size - len(state.labeled)),
            pool_size=self.learner.pool_size,
            num_classes=self.learner.num_classes,
            round=state.round,
            seed=self.config.seed,
            dist_info=current_dist(),  # every rank selects, splitting the pairwise work
        )
        chosen = select(self.strategy, ctx)
        return chosen.tolist(), time.perf_counter() - tic

    def _keep_strategy_state(self, selection: tuple[list[int], float]) -> tuple[list[int], float]:
        """Saves what the strategy keeps across rounds (once; rank 0) and passes ``selection``
        through."""
        kept = self.strategy.state_dict()
        if kept and not self.strategy_state_path.exists():
            save_checkpoint(self.strategy_state_path, {"strategy": kept})
        return selection

    def done(self, state: ActiveState) -> bool:
        return state.round >= self.config.rounds or len(state.labeled) >= self.learner.pool_size

    def run(self, resume: bool = False) -> ActiveState:
        """Run (or continue) until ``config.rounds`` queries are answered and the last labeled
        set is evaluated. Raises ``AwaitingAnswers`` when the oracle has not answered yet."""
        state = self._open(resume)
        while True:
            if state.pending:
                self._ask(state)
            if len(state.records) <= state.round:
                self._evaluate(state)
            if self.done(state):
                self._step("finished", state)
                return state
            self._query(state)


def _sync(scores: Any) -> None:
    """Wait for the GPU so the scoring time is the real one."""
    for t in (scores.logits, scores.embeddings, scores.mc_logits):
        if t is not None and t.is_cuda:
            torch.cuda.synchronize(t.device)
            return
