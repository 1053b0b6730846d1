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

import argparse
import time
from dataclasses import replace
from typing import Any

from labelkit_ext.engine import current_dist
from labelkit_ext.methods.common import add_training_arguments, load_data, run_dir, train_config
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

__all__ = [
    "DEFAULT_AUX_SHARE",
    "DEFAULT_SCHEDULES",
    "SCHEDULES",
    "TASK_KINDS",
    "CurriculumConfig",
    "CurriculumFit",
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
    "run",
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(dataset="digit-mosaic")
    add_training_arguments(parser, epochs=DEFAULT_EPOCHS, batch_size=64)
    group = parser.add_argument_group("curriculum")
    group.add_argument(
        "--schedules",
        nargs="+",
        default=list(DEFAULT_SCHEDULES),
        metavar="S",
        help=f"schedules to compare, the first is the reference: {', '.join(SCHEDULES)}, or "
        f"stages coarse to fine joined by commas from {', '.join(TASK_KINDS)} "
        "(e.g. binary,superclass,multilabel); default: %(default)s",
    )
    group.add_argument(
        "--num-seeds",
        type=int,
        default=3,
        help="training seeds --seed, --seed+1, ...; every schedule runs with each (default: %(default)s)",
    )
    group.add_argument(
        "--evals-per-epoch",
        type=int,
        default=DEFAULT_EVALS_PER_EPOCH,
        help="validations per --epochs unit; the stage budget is counted in these chunks "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--aux-share",
        type=float,
        default=DEFAULT_AUX_SHARE,
        help="share of the step budget for the auxiliary stages together (default: %(default)s)",
    )
    group.add_argument(
        "--superclasses",
        type=int,
        default=None,
        metavar="G",
        help="super-classes of co-occurring findings for a superclass stage (default: about sqrt(K))",
    )


def _config(args: argparse.Namespace, train_size: int) -> CurriculumConfig:
    if args.num_seeds < 1:
        raise ValueError(f"--num-seeds must be >= 1, got {args.num_seeds}")
    total_steps, eval_every = budget_from_epochs(
        train_size, args.batch_size, args.epochs, args.evals_per_epoch
    )
    return CurriculumConfig(
        total_steps=total_steps,
        eval_every=eval_every,
        schedules=tuple(args.schedules),
        seeds=tuple(range(args.seed, args.seed + args.num_seeds)),
        aux_share=args.aux_share,
        num_superclasses=args.superclasses,
    )


def _print_report(fitted: CurriculumFit, args: argparse.Namespace) -> None:
    r = fitted.results
    budget = r["config"]["curriculum"]
    print(
        "\n\n".join(
            [
                f"curriculum | {r['dataset']['name']} | {args.model} | {budget['total_steps']} "
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    """``labelkit run curriculum``: every schedule x seed on an equal step budget, the tables,
    results.json and plots."""
    tic = time.perf_counter()
    if args.image_size is None and args.dataset in QUICK_IMAGE_SIZE:
        args = argparse.Namespace(**{**vars(args), "image_size": QUICK_IMAGE_SIZE[args.dataset]})
    splits = load_data(args)
    check_multilabel(splits.info)
    config = _config(args, len(splits.train))
    out = run_dir(args, "curriculum")
    fitted = fit_curriculum(
        splits,
        config,
        replace(train_config(args), epochs=1),
        model=args.model,
        pretrained=args.pretrained,
        out_dir=out,
        resume=args.resume,
        cli_args=vars(args),
        data_seconds=time.perf_counter() - tic,
    )
    if current_dist().is_main:
        _print_report(fitted, args)
        print(
            f"results: {out / 'results.json'}  plots: {', '.join(fitted.results.get('plots', []))}"
        )
    return fitted.results


register_method(
    "curriculum",
    run=run,
    add_arguments=add_arguments,
    help="coarse-to-fine curriculum for multi-label data: binary > multi-class > multi-label "
    "stages with weight transfer, equal step budgets, several seeds",
)
