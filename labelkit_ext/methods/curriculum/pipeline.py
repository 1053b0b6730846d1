"""``fit_curriculum``: every schedule with every seed on an equal step budget, evaluated on
val and test, summarised, plotted and written to results.json."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from labelkit_ext.checks import check_fields, check_seeds
from labelkit_ext.data import DataSplits
from labelkit_ext.engine import Predictions, TrainConfig, current_dist, predict, prediction_metrics
from labelkit_ext.errors import UsageError
from labelkit_ext.methods.common import dataset_summary, write_results
from labelkit_ext.methods.curriculum.report import (
    plot_auc_curves,
    plot_per_finding_delta,
    summarise_runs,
)
from labelkit_ext.methods.curriculum.schedule import (
    DEFAULT_AUX_SHARE,
    allocate_steps,
    parse_schedule,
)
from labelkit_ext.methods.curriculum.tasks import (
    TASK_KINDS,
    build_task,
    cooccurrence_groups,
    default_num_superclasses,
)
from labelkit_ext.methods.curriculum.training import (
    FindingData,
    ScheduleRun,
    finding_data,
    train_schedule,
)

__all__ = ["DEFAULT_SCHEDULES", "CurriculumConfig", "CurriculumFit", "fit_curriculum"]

DEFAULT_SCHEDULES = ("default", "1-stage", "2-stage")


@dataclass
class CurriculumConfig:
    """What the curriculum adds to a ``TrainConfig`` (whose ``epochs`` it ignores).

    ``total_steps`` optimisation steps per schedule (the equal budget), validated every
    ``eval_every`` steps; auxiliary stages share ``aux_share`` of it (see ``allocate_steps``).
    ``schedules`` are names of ``SCHEDULES`` or comma-separated stage lists; the first is the
    reference of the improvements and paired tests. ``seeds`` are the training seeds.
    ``num_superclasses`` (default about sqrt(K)) groups findings by co-occurrence for a
    ``superclass`` stage. ``no_finding`` names an explicit "no finding" label column.
    """

    total_steps: int
    eval_every: int
    schedules: tuple[str, ...] = DEFAULT_SCHEDULES
    seeds: tuple[int, ...] = (0, 1, 2)
    aux_share: float = DEFAULT_AUX_SHARE
    num_superclasses: int | None = None
    no_finding: int | str | None = None

    def __post_init__(self) -> None:
        self.schedules = tuple(self.schedules)
        self.seeds = tuple(check_seeds(self.seeds))
        check_fields(self)
        if self.num_superclasses is not None and self.num_superclasses < 2:
            raise UsageError(f"num_superclasses must be >= 2, got {self.num_superclasses}")
        if not self.schedules or len(set(self.schedules)) != len(self.schedules):
            raise UsageError(f"schedules must be distinct and at least one, got {self.schedules}")
        for schedule in self.schedules:
            allocate_steps(len(parse_schedule(schedule)), self.total_steps, self.eval_every,
                           self.aux_share)  # fmt: skip

    def stage_plan(self) -> dict[str, dict[str, list]]:
        """Schedule -> its stages and steps per stage."""
        plan = {}
        for schedule in self.schedules:
            stages = parse_schedule(schedule)
            steps = allocate_steps(len(stages), self.total_steps, self.eval_every, self.aux_share)
            plan[schedule] = {"stages": list(stages), "steps": steps}
        return plan


@dataclass
class CurriculumFit:
    """The results (as written to results.json) and the final model of every (schedule, seed)."""

    results: dict[str, Any]
    models: dict[tuple[str, int], torch.nn.Module] = field(default_factory=dict)


def _superclass_groups(data: FindingData, config: CurriculumConfig) -> torch.Tensor | None:
    uses = any("superclass" in p["stages"] for p in config.stage_plan().values())
    if not uses:
        return None
    k, g = data.num_findings, config.num_superclasses
    if g is None:
        g = default_num_superclasses(k)
    elif not 2 <= g <= k - 1:  # the upper bound needs the data: say which option it is
        raise UsageError(
            f"superclasses (--superclasses; num_superclasses) must be in [2, {k - 1}] for "
            f"{k} findings, got {g}"
        )
    return cooccurrence_groups(data.findings["train"], g)


def _evaluate(run: ScheduleRun, data: FindingData, train: TrainConfig) -> tuple[dict, torch.Tensor]:
    """Val and test metrics of the final multi-label model, and its test logits."""
    metrics, test_logits = {}, None
    for split in ("val", "test"):
        logits = predict(
            run.model, getattr(data, split), run.device, batch_size=train.eval_batch_size,
            amp=train.amp, num_workers=train.num_workers,
        ).logits  # fmt: skip
        metrics[split] = prediction_metrics(
            Predictions(logits, data.findings[split]), "multilabel", data.names
        )
        test_logits = logits
    return metrics, test_logits


def _warn_unequal_targets(plan: dict[str, dict[str, list]], config: CurriculumConfig) -> None:
    """Curricula (schedules with auxiliary stages) train their target stage equally long,
    except that each auxiliary stage gets a chunk at least: with few chunks a longer
    schedule's stages take more than ``aux_share`` of the budget and its target trains for
    less, which a comparison must not hide."""
    targets = {schedule: p["steps"][-1] for schedule, p in plan.items() if len(p["steps"]) > 1}
    if len(set(targets.values())) > 1:
        steps = ", ".join(f"{schedule} {n}" for schedule, n in targets.items())
        warnings.warn(
            f"the target stage trains for unequal steps ({steps}): with {config.total_steps // config.eval_every} "
            f"chunks the one-chunk minimum of each auxiliary stage exceeds aux_share "
            f"({config.aux_share}) of the budget; more chunks (--epochs, --evals-per-epoch) or a "
            "larger --aux-share evens them",
            stacklevel=3,
        )


def _log(message: str, quiet: bool) -> None:
    if not quiet and current_dist().is_main:
        print(f"[curriculum] {message}", flush=True)


def fit_curriculum(
    splits: DataSplits | FindingData,
    config: CurriculumConfig,
    train: TrainConfig | None = None,
    *,
    model: str = "small-cnn",
    model_kwargs: Mapping[str, Any] | None = None,
    pretrained: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
) -> CurriculumFit:
    """Train every schedule of ``config`` with every seed for ``config.total_steps`` steps,
    evaluate the final multi-label model on val and test (the last step's weights; no
    selection on val), and summarise: mean ± std over seeds, the improvement over the first
    schedule and a paired t-test by seed.

    ``train`` sets the optimiser, batch size, device etc. (its ``seed`` and ``epochs`` are
    replaced). With ``out_dir``: per run ``<schedule>/seed<s>/stage<i>-<task>/`` checkpoints
    and curves (``resume`` continues them), ``auc_curve.png``, ``per_finding_auc.png`` and
    ``results.json``.
    """
    started = time.perf_counter()
    train = train or TrainConfig()
    data = splits if isinstance(splits, FindingData) else finding_data(splits, config.no_finding)
    plan = config.stage_plan()
    groups = _superclass_groups(data, config)
    tasks = _task_summaries(data, groups)
    for schedule, stage_plan in plan.items():  # fail before any training, not halfway
        for kind in stage_plan["stages"]:
            if "error" in tasks[kind]:
                raise UsageError(f"schedule {schedule!r}: {tasks[kind]['error']}")
    _warn_unequal_targets(plan, config)
    out = Path(out_dir) if out_dir is not None else None
    runs, models = [], {}
    for seed in config.seeds:
        for schedule, stage_plan in plan.items():
            _log(f"seed {seed}, {schedule}: {' > '.join(stage_plan['stages'])} "
                 f"({'/'.join(map(str, stage_plan['steps']))} steps)", train.quiet)  # fmt: skip
            run = train_schedule(
                data, stage_plan["stages"], stage_plan["steps"],
                TrainConfig(**{**asdict(train), "seed": seed}),
                model=model, eval_every=config.eval_every, groups=groups,
                pretrained=pretrained, model_kwargs=dict(model_kwargs or {}), schedule=schedule,
                out_dir=out / _safe(schedule) / f"seed{seed}" if out is not None else None,
                resume=resume,
            )  # fmt: skip
            metrics, _ = _evaluate(run, data, train)
            _log(f"seed {seed}, {schedule}: test mean AUC {metrics['test']['auc']:.4f} "
                 f"({run.train_seconds:.0f}s)", train.quiet)  # fmt: skip
            runs.append({
                "schedule": schedule, "seed": seed, "stages": list(run.stages),
                "steps": run.steps, "tasks": run.tasks, "curve": run.curve,
                "val": metrics["val"], "test": metrics["test"],
                "train_seconds": run.train_seconds,
            })  # fmt: skip
            models[(schedule, seed)] = run.model
    reference = config.schedules[0]
    summary = summarise_runs(runs, config.schedules, reference, data.names)
    results: dict[str, Any] = {
        "method": "curriculum",
        "config": {
            "model": model,
            "model_kwargs": dict(model_kwargs or {}),
            "pretrained": pretrained,
            "curriculum": asdict(config),
            "train": train.to_dict(),
        },
        "dataset": dataset_summary(splits)
        if isinstance(splits, DataSplits)
        else {"name": data.name},
        "findings": list(data.names),
        "test_positives": data.findings["test"].sum(0).int().tolist(),
        "superclasses": _groups_record(groups, data.names),
        "tasks": tasks,
        "schedules": plan,
        "reference": reference,
        "runs": runs,
        "summary": summary,
        "timings": {"train_seconds": sum(r["train_seconds"] for r in runs)},
    }
    if out is not None:
        if current_dist().is_main:
            title = f"curriculum: {data.name}, {model}, {config.total_steps} steps per schedule"
            results["plots"] = [
                plot_auc_curves(runs, plan, reference, out / "auc_curve.png", title).name,
                plot_per_finding_delta(
                    summary, data.names, reference, out / "per_finding_auc.png", title
                ).name,  # fmt: skip
            ]
        write_results(out, results, started)
    return CurriculumFit(results, models)


def _safe(schedule: str) -> str:
    return schedule.replace(",", "-")


def _groups_record(groups: torch.Tensor | None, names: Sequence[str]) -> dict | None:
    if groups is None:
        return None
    members = [
        [names[f] for f in range(len(names)) if groups[f] == g]
        for g in range(int(groups.max()) + 1)
    ]
    return {"groups": groups.tolist(), "members": members}


def _task_summaries(data: FindingData, groups: torch.Tensor | None) -> dict[str, dict]:
    """Each task's training images and per-class counts (the label structure it sees)."""
    kinds = [k for k in TASK_KINDS if k != "superclass" or groups is not None]
    summaries = {}
    for kind in kinds:
        try:
            summaries[kind] = build_task(kind, data.findings["train"], data.names, groups).summary()
        except ValueError as exc:
            summaries[kind] = {"kind": kind, "images": 0, "error": str(exc)}
    return summaries
