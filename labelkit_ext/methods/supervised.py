"""``supervised``: plain training on every label, then evaluation; the baseline of all methods."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
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
    option,
    plot_confusion_matrix,
    plot_history,
    plot_roc,
    predict,
    prediction_metrics,
    seed_everything,
)
from labelkit_ext.fingerprint import module_digest
from labelkit_ext.methods.common import (
    DataConfig,
    check_run_config,
    dataset_summary,
    load_data,
    metrics_table,
    prepare_run_dir,
    write_results,
)
from labelkit_ext.methods.registry import register_method
from labelkit_ext.models import available_models, build_model

__all__ = ["SupervisedRunConfig", "fit_supervised", "run_supervised", "train_supervised"]


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
        # a finished run resumed with other --pretrained weights would report the old ones
        identity={"pretrained": module_digest(net) if pretrained and out_dir else None},
        setting_names={"pretrained": "--pretrained weights"},
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
) -> dict[str, Any]:
    """Train ``model`` on ``splits.train`` for ``config.epochs`` epochs, then evaluate the
    last epoch's weights on val and test (no model selection on val); returns the results.

    With ``out_dir``: checkpoints (``resume`` continues from the last) and the history /
    confusion matrix / ROC PNGs (``run_supervised`` also writes results.json there).
    """
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
        "config": {"model": model, "pretrained": pretrained, "train": config.to_dict()},
        "dataset": dataset_summary(splits),
        "device": str(fitted.device),
        "resumed_from_epoch": fitted.resumed_from,
        "history": fitted.history,
        "metrics": metrics,
        "timings": {
            "train_seconds": fitted.train_seconds,
            "eval_seconds": time.perf_counter() - tic,
        },
    }
    if out_dir is not None and current_dist().is_main:
        results["plots"] = _plots(
            Path(out_dir), splits, fitted.history, predictions["test"], metrics["test"]
        )
    return results


@dataclass
class SupervisedRunConfig:
    """``labelkit run supervised``: its options are these fields."""

    data: DataConfig = option(factory=DataConfig, help="data")
    model: str = option("small-cnn", "network", choices=available_models)
    pretrained: str | None = option(None, "initial weights from a local file", metavar="FILE")
    train: TrainConfig = option(factory=TrainConfig, help="training")

    def __post_init__(self) -> None:
        check_run_config(self)


def run_supervised(
    config: SupervisedRunConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    resume: bool = False,
) -> dict[str, Any]:
    """Load the data, train, evaluate; write results.json and plots into ``out_dir`` (default
    ``runs/supervised-<dataset>``) and print the results table."""
    started = time.perf_counter()
    config = config or SupervisedRunConfig()
    out = prepare_run_dir("supervised", config.data, out_dir)
    splits = load_data(config.data)
    data_seconds = time.perf_counter() - started
    results = train_supervised(
        splits,
        model=config.model,
        config=config.train,
        out_dir=out,
        resume=resume,
        pretrained=config.pretrained,
    )
    results["config"] = asdict(config)
    results["timings"]["data_seconds"] = data_seconds
    write_results(out, results, started)
    if current_dist().is_main:
        print(
            metrics_table(
                results["metrics"],
                f"supervised | {splits.info.name} | {config.model} | {config.train.epochs} epochs",
            )
        )
        print(f"results: {out / 'results.json'}  plots: {', '.join(results.get('plots', []))}")
    return results


register_method(
    "supervised",
    config=SupervisedRunConfig,
    run=run_supervised,
    help="plain training on all labels, then val/test evaluation (the baseline)",
)
