"""``run_experiment``: several strategies x several seeds, each a resumable ``ActiveLoop`` in its
own folder, then the learning-curve report (results.json, table, plot)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from labelkit_ext.engine import current_dist
from labelkit_ext.errors import UsageError
from labelkit_ext.methods.active.learners import Learner
from labelkit_ext.methods.active.loop import ActiveConfig, ActiveLoop
from labelkit_ext.methods.active.oracles import Oracle
from labelkit_ext.methods.active.report import (
    plot_learning_curves,
    summarize_strategy,
    summary_table,
)
from labelkit_ext.methods.active.state import ActiveState
from labelkit_ext.methods.active.strategies import build_strategy
from labelkit_ext.methods.common import write_results

__all__ = ["run_experiment", "run_folder"]

CURVES_PLOT = "learning_curves.png"


def run_folder(out_dir: str | os.PathLike, strategy: str, seed: int) -> Path:
    """Where the run of ``strategy`` with ``seed`` keeps its state and checkpoints."""
    return Path(out_dir) / "runs" / strategy / f"seed_{seed}"


def _progress_line(strategy: str, seed: int, quiet: bool) -> Callable[[str, ActiveState], None]:
    def report(step: str, state: ActiveState) -> None:
        if quiet or step != "evaluated" or not current_dist().is_main:
            return
        r = state.records[-1]
        print(
            f"[{strategy} seed {seed}] round {r['round']}: {r['labels']} labels, "
            f"test accuracy {r['accuracy']:.4f} (train {r['train_seconds']:.1f}s)",
            flush=True,
        )

    return report


def run_experiment(
    make_learner: Callable[[int, Path], Learner],
    make_oracle: Callable[[int, Path], Oracle],
    strategies: Sequence[str],
    seeds: Sequence[int],
    config: ActiveConfig,
    out_dir: str | os.PathLike,
    *,
    strategy_params: Mapping[str, Any] | None = None,
    fingerprint: Mapping[str, Any] | None = None,
    target_accuracy: float | None = None,
    resume: bool = False,
    quiet: bool = False,
    extra_results: Mapping[str, Any] | None = None,
    title: str = "",
) -> dict[str, Any]:
    """Run every strategy with every seed and report.

    ``make_learner(seed, folder)`` and ``make_oracle(seed, folder)`` build a run's learner and
    oracle; every run of a seed starts from the same random initial labels. Each run resumes
    from its state in ``run_folder(out_dir, strategy, seed)`` when ``resume``. The oracle may
    stop the experiment with ``AwaitingAnswers``. Returns the results written to
    ``out_dir/results.json`` (with ``learning_curves.png``).
    """
    if not strategies:
        raise UsageError("give at least one strategy")
    if not seeds:
        raise UsageError("give at least one seed")
    if target_accuracy is not None and not 0 < target_accuracy <= 1:
        raise UsageError(f"target_accuracy must be in (0, 1], got {target_accuracy}")
    built = {name: build_strategy(name, **(strategy_params or {})) for name in strategies}
    started = time.perf_counter()
    out = Path(out_dir)
    records: dict[str, dict[int, list[dict]]] = {}
    for name in strategies:
        for seed in seeds:
            folder = run_folder(out, name, seed)
            loop = ActiveLoop(
                make_learner(seed, folder),
                build_strategy(name, **(strategy_params or {})),
                make_oracle(seed, folder),
                replace(config, seed=seed),
                folder,
                fingerprint=dict(fingerprint or {}),
                on_step=_progress_line(name, seed, quiet),
            )
            state = loop.run(resume=resume)
            records.setdefault(name, {})[seed] = state.records
    summaries = {name: summarize_strategy(records[name], target_accuracy) for name in strategies}
    results: dict[str, Any] = {
        "method": "active",
        "config": {
            **asdict(config),
            "strategies": list(strategies),
            "strategy_params": {n: s.params() for n, s in built.items()},
            "seeds": list(seeds),
            "target_accuracy": target_accuracy,
            **dict(fingerprint or {}),
        },
        **dict(extra_results or {}),
        "summary": summaries,
        "records": {n: {str(s): r for s, r in by_seed.items()} for n, by_seed in records.items()},
        "table": summary_table(summaries),
    }
    if current_dist().is_main:
        plot_learning_curves(summaries, out / CURVES_PLOT, title, target_accuracy)
    results["plots"] = [CURVES_PLOT]
    write_results(out, results, started)
    return results
