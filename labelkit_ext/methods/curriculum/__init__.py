"""``curriculum``: coarse-to-fine curriculum for multi-label classification.

A confusion matrix cannot group classes when images carry several labels, so the auxiliary
tasks come from the label structure: no finding vs any finding (all images), which finding
(only the images with exactly one, softmax), optionally which super-class of co-occurring
findings, then the target multi-label task (a sigmoid per finding). Each stage starts from
the previous stage's network with a new head. Every schedule gets the same number of
optimisation steps; several seeds give mean ± std and a paired test. See
docs/methods/curriculum.md.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from labelkit_ext.checks import check_fields
from labelkit_ext.engine import TrainConfig, current_dist, option
from labelkit_ext.errors import UsageError
from labelkit_ext.methods.common import (
    DataConfig,
    check_run_config,
    load_data,
    prepare_run_dir,
    write_results,
)
from labelkit_ext.methods.curriculum.pipeline import (
    DEFAULT_SCHEDULES,
    CurriculumConfig,
    CurriculumFit,
    fit_curriculum,
)
from labelkit_ext.methods.curriculum.report import (
    paired_test,
    per_finding_table,
    plot_auc_curves,
    plot_per_finding_delta,
    schedule_table,
    summarise_runs,
)
from labelkit_ext.methods.curriculum.schedule import (
    DEFAULT_AUX_SHARE,
    SCHEDULES,
    StageStream,
    allocate_steps,
    budget_from_epochs,
    parse_schedule,
)
from labelkit_ext.methods.curriculum.tasks import (
    TASK_KINDS,
    LabelTask,
    binary_task,
    build_task,
    cooccurrence_groups,
    cooccurrence_similarity,
    default_num_superclasses,
    findings_matrix,
    multiclass_task,
    multilabel_task,
    superclass_task,
)
from labelkit_ext.methods.curriculum.training import (
    FindingData,
    ScheduleRun,
    check_multilabel,
    finding_data,
    replace_head,
    target_auc,
    train_schedule,
)
from labelkit_ext.methods.registry import register_method
from labelkit_ext.models import available_models

__all__ = [
    "DEFAULT_AUX_SHARE",
    "DEFAULT_SCHEDULES",
    "SCHEDULES",
    "TASK_KINDS",
    "CurriculumConfig",
    "CurriculumFit",
    "CurriculumRunConfig",
    "FindingData",
    "LabelTask",
    "ScheduleRun",
    "StageStream",
    "allocate_steps",
    "binary_task",
    "budget_from_epochs",
    "build_task",
    "check_multilabel",
    "cooccurrence_groups",
    "cooccurrence_similarity",
    "default_num_superclasses",
    "finding_data",
    "findings_matrix",
    "fit_curriculum",
    "multiclass_task",
    "multilabel_task",
    "paired_test",
    "parse_schedule",
    "per_finding_table",
    "plot_auc_curves",
    "plot_per_finding_delta",
    "replace_head",
    "run_curriculum",
    "schedule_table",
    "summarise_runs",
    "superclass_task",
    "target_auc",
    "train_schedule",
]

DEFAULT_EPOCHS = 4
DEFAULT_EVALS_PER_EPOCH = 2
# The embedded mosaic's digits are 8x8 scans: 16 px mosaics lose nothing and train 4x faster.
QUICK_IMAGE_SIZE = {"digit-mosaic": 16}


@dataclass
class CurriculumRunConfig:
    """``labelkit run curriculum``: its options are these fields. The budget is given in
    epochs of the training set; ``curriculum_config`` turns it into the equal step budget of
    ``CurriculumConfig``."""

    data: DataConfig = option(
        factory=lambda: DataConfig(dataset="digit-mosaic"),
        help="data",
        helps={
            "image_size": "model input size (default: the data set's own; digit-mosaic "
            f"{QUICK_IMAGE_SIZE['digit-mosaic']} here, its 8x8 digits upsampled)"
        },
    )
    model: str = option("small-cnn", "network", choices=available_models)
    pretrained: str | None = option(None, "initial weights from a local file", metavar="FILE")
    train: TrainConfig = option(
        factory=lambda: TrainConfig(epochs=DEFAULT_EPOCHS),
        help="training (epochs: the step budget of every schedule, in epochs of the training set)",
    )
    schedules: tuple[str, ...] = option(
        DEFAULT_SCHEDULES,
        f"schedules to compare, the first is the reference: {', '.join(SCHEDULES)}, or stages "
        f"coarse to fine joined by commas from {', '.join(TASK_KINDS)} "
        "(e.g. binary,superclass,multilabel)",
        metavar="S",
    )
    num_seeds: int = option(3, "training seeds seed, seed+1, ...; every schedule runs with each")
    evals_per_epoch: int = option(
        DEFAULT_EVALS_PER_EPOCH,
        "validations per epoch; the stage budget is counted in these chunks",
    )
    aux_share: float = option(
        DEFAULT_AUX_SHARE, "share of the step budget for the auxiliary stages together"
    )
    superclasses: int | None = option(
        None,
        "super-classes of co-occurring findings for a superclass stage, in [2, K - 1] for K "
        "findings (default: about sqrt(K))",
        metavar="G",
    )

    def __post_init__(self) -> None:
        check_fields(self)
        check_run_config(self, self.data_config().image_size)
        for name in ("num_seeds", "evals_per_epoch"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.aux_share < 1:
            raise UsageError(f"aux_share must be in (0, 1), got {self.aux_share}")
        if self.superclasses is not None and self.superclasses < 2:
            raise UsageError(
                f"superclasses must be >= 2 (or left out: about sqrt(findings)), "
                f"got {self.superclasses}"
            )
        if not self.schedules:
            raise UsageError("schedules must name at least one schedule")
        # The budget is epochs x evals_per_epoch validation chunks (budget_from_epochs), and
        # every stage needs one: say so in the options' terms, not in steps.
        chunks = self.train.epochs * self.evals_per_epoch
        for schedule in self.schedules:
            stages = len(parse_schedule(schedule))  # a bad schedule fails before the data loads
            if stages > chunks:
                raise UsageError(
                    f"schedule {schedule!r} has {stages} stages, but --epochs "
                    f"{self.train.epochs} x --evals-per-epoch {self.evals_per_epoch} give "
                    f"{chunks} validation chunk(s) and every stage needs one: raise --epochs "
                    "or --evals-per-epoch"
                )
        uses_groups = any("superclass" in parse_schedule(s) for s in self.schedules)
        if self.superclasses is not None and not uses_groups:
            raise UsageError(
                f"--superclasses {self.superclasses} groups the findings of a superclass stage, "
                f"but no schedule has one ({', '.join(self.schedules)}): add a schedule such as "
                "3-stage or binary,superclass,multilabel, or leave --superclasses out"
            )

    def data_config(self) -> DataConfig:
        """``data`` with this method's own default input size (digit-mosaic: 16 px)."""
        return self.data.sized(QUICK_IMAGE_SIZE)

    def curriculum_config(self, train_size: int) -> CurriculumConfig:
        """The step-level config for a training set of ``train_size`` images."""
        total_steps, eval_every = budget_from_epochs(
            train_size, self.train.batch_size, self.train.epochs, self.evals_per_epoch
        )
        seed = self.train.seed
        return CurriculumConfig(
            total_steps=total_steps,
            eval_every=eval_every,
            schedules=tuple(self.schedules),
            seeds=tuple(range(seed, seed + self.num_seeds)),
            aux_share=self.aux_share,
            num_superclasses=self.superclasses,
        )


def _print_report(fitted: CurriculumFit, model: str) -> None:
    r = fitted.results
    budget = r["config"]["curriculum"]
    print(
        "\n\n".join(
            [
                f"curriculum | {r['dataset']['name']} | {model} | {budget['total_steps']} "
                f"steps per schedule (validated every {budget['eval_every']}) | seeds "
                f"{', '.join(map(str, budget['seeds']))}",
                "mean AUC x100 (mean ± std over seeds); paired t-test on test AUC by seed\n"
                + schedule_table(r["summary"], r["schedules"], r["reference"]),
                "test AUC x100 per finding (mean over seeds)\n"
                + per_finding_table(r["summary"], r["findings"], r["test_positives"]),
                f"train {r['timings']['train_seconds']:.0f}s, total {r['timings']['total_seconds']:.0f}s",
            ]
        )
    )


def run_curriculum(
    config: CurriculumRunConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    resume: bool = False,
) -> dict[str, Any]:
    """Every schedule x seed on an equal step budget; results.json, plots and the tables
    (``out_dir`` default ``runs/curriculum-<dataset>``)."""
    started = time.perf_counter()
    config = config or CurriculumRunConfig()
    data = config.data_config()
    out = prepare_run_dir("curriculum", data, out_dir)
    splits = load_data(data)
    check_multilabel(splits.info)
    data_seconds = time.perf_counter() - started
    fitted = fit_curriculum(
        splits,
        config.curriculum_config(len(splits.train)),
        replace(config.train, epochs=1),
        model=config.model,
        pretrained=config.pretrained,
        out_dir=out,
        resume=resume,
    )
    results = fitted.results
    results["config"]["run"] = asdict(config)
    results["timings"]["data_seconds"] = data_seconds
    write_results(out, results, started)  # adds the run's settings and data time
    if current_dist().is_main:
        _print_report(fitted, config.model)
        print(f"results: {out / 'results.json'}  plots: {', '.join(results.get('plots', []))}")
    return results


register_method(
    "curriculum",
    config=CurriculumRunConfig,
    run=run_curriculum,
    help="coarse-to-fine curriculum for multi-label data: binary > multi-class > multi-label "
    "stages with weight transfer, equal step budgets, several seeds",
)
