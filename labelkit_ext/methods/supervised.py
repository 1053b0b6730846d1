"""``supervised``: plain training on every label, then evaluation; the baseline of all methods."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from labelkit_ext.data import DataSplits
from labelkit_ext.engine import (
    EpochEnd,
    FitResult,
    Predictions,
    TrainConfig,
    current_dist,
    fit,
    plot_confusion_matrix,
    plot_history,
    plot_roc,
    predict,
    prediction_metrics,
    seed_everything,
)
from labelkit_ext.methods.common import (
    add_training_arguments,
    dataset_summary,
    load_data,
    metrics_table,
    run_dir,
    train_config,
    write_results,
)
from labelkit_ext.methods.registry import register_method
from labelkit_ext.models import build_model

__all__ = ["fit_supervised", "train_supervised", "run"]


def _plots(
    out_dir: Path, splits: DataSplits, history: list[dict], test: Predictions, test_metrics: dict
) -> list[str]:
    """history.png, confusion_matrix.png (multi-class) and roc.png of the test split."""
    info = splits.info
    title = f"supervised: {info.name}"
    paths = [plot_history(history, out_dir / "history.png", title)]
    if info.task == "multiclass":
        cm = test_metrics["confusion_matrix"]
        paths.append(
            plot_confusion_matrix(
                cm, info.class_names, out_dir / "confusion_matrix.png", f"{title} (test)"
            )
        )
    scores = test.scores(info.task)
    paths.append(
        plot_roc(
            scores,
            test.targets,
            info.task,
            info.class_names,
            out_dir / "roc.png",
            f"{title} (test)",
        )
    )
    return [p.name for p in paths]


def fit_supervised(
    splits: DataSplits,
    model: str,
    config: TrainConfig,
    *,
    pretrained: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    callbacks: Sequence[Callable[[EpochEnd], None]] = (),
) -> FitResult:
    """The supervised recipe without evaluation or reports: seed, build ``model``, and ``fit``
    it on every training label. With ``out_dir`` its checkpoint (``resume`` continues from it)
    lives there. Other methods use it for their baselines."""
    info = splits.info
    seed_everything(config.seed)  # the same initial weights for the same seed
    net = build_model(model, info.num_classes, info.in_channels, info.image_size, pretrained)
    return fit(
        net,
        splits.train,
        splits.val,
        info.task,
        config,
        out_dir=out_dir,
        resume=resume,
        class_names=info.class_names,
        callbacks=callbacks,
    )


def train_supervised(
    splits: DataSplits,
    *,
    model: str = "small-cnn",
    config: TrainConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    pretrained: str | os.PathLike | None = None,
    callbacks: Sequence[Callable[[EpochEnd], None]] = (),
    cli_args: Mapping[str, Any] | None = None,
    data_seconds: float = 0.0,
) -> dict[str, Any]:
    """Train ``model`` on ``splits.train`` for ``config.epochs`` epochs, then evaluate the
    last epoch's weights on val and test (no model selection on val).

    With ``out_dir``: checkpoints (``resume`` continues from the last), history / confusion
    matrix / ROC PNGs, and the returned results are written to ``out_dir/results.json``.
    ``cli_args`` (the command's options) and ``data_seconds`` (time spent loading) are recorded.
    """
    started = time.perf_counter() - data_seconds
    config = config or TrainConfig()
    info = splits.info
    fitted = fit_supervised(
        splits,
        model,
        config,
        pretrained=pretrained,
        out_dir=out_dir,
        resume=resume,
        callbacks=callbacks,
    )
    tic = time.perf_counter()
    predictions = {
        split: predict(
            fitted.model,
            getattr(splits, split),
            fitted.device,
            batch_size=config.eval_batch_size,
            amp=config.amp,
            num_workers=config.num_workers,
        )
        for split in ("val", "test")
    }
    metrics = {
        split: prediction_metrics(pred, info.task, info.class_names)
        for split, pred in predictions.items()
    }
    results: dict[str, Any] = {
        "method": "supervised",
        "config": {
            "model": model,
            "pretrained": pretrained,
            "train": config.to_dict(),
            "cli": dict(cli_args or {}),
        },
        "dataset": dataset_summary(splits),
        "device": str(fitted.device),
        "resumed_from_epoch": fitted.resumed_from,
        "history": fitted.history,
        "metrics": metrics,
        "timings": {
            "data_seconds": data_seconds,
            "train_seconds": fitted.train_seconds,
            "eval_seconds": time.perf_counter() - tic,
        },
    }
    if out_dir is not None:
        out = Path(out_dir)
        if current_dist().is_main:
            results["plots"] = _plots(
                out, splits, fitted.history, predictions["test"], metrics["test"]
            )
        write_results(out, results, started)
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_training_arguments(parser)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """``labelkit run supervised``: load the data, train, evaluate, write and print results."""
    tic = time.perf_counter()
    splits = load_data(args)
    out = run_dir(args, "supervised")
    results = train_supervised(
        splits,
        model=args.model,
        config=train_config(args),
        out_dir=out,
        resume=args.resume,
        pretrained=args.pretrained,
        cli_args=vars(args),
        data_seconds=time.perf_counter() - tic,
    )
    if current_dist().is_main:
        info = splits.info
        print(
            metrics_table(
                results["metrics"],
                f"supervised | {info.name} | {args.model} | {args.epochs} epochs",
            )
        )
        print(f"results: {out / 'results.json'}  plots: {', '.join(results.get('plots', []))}")
    return results


register_method(
    "supervised",
    run=run,
    add_arguments=add_arguments,
    help="plain training on all labels, then val/test evaluation (the baseline)",
)
