"""The training engine shared by every method: config, loops, metrics, checkpoints, DDP,
seeding, device selection and run reports."""

from labelkit_ext.engine.checkpoint import load_checkpoint, save_checkpoint
from labelkit_ext.engine.config import (
    OPTIMIZERS,
    SCHEDULERS,
    TrainConfig,
    build_optimizer,
    build_scheduler,
    option,
)
from labelkit_ext.engine.device import select_device
from labelkit_ext.engine.distributed import (
    DistInfo,
    barrier,
    broadcast_buffers,
    current_dist,
    gather_shards,
    init_distributed,
    shutdown_distributed,
)
from labelkit_ext.engine.loops import (
    LAST_CHECKPOINT,
    EpochEnd,
    FitResult,
    Predictions,
    autocast_for,
    evaluate,
    fit,
    loss_for_task,
    predict,
    prediction_metrics,
    train_one_epoch,
)
from labelkit_ext.engine.metrics import (
    classification_metrics,
    roc_auc_per_class,
    scores_from_logits,
    topk_accuracy,
)
from labelkit_ext.engine.report import (
    format_table,
    plot_confusion_matrix,
    plot_history,
    plot_roc,
    to_jsonable,
    versions,
    write_json,
)
from labelkit_ext.engine.seeding import derive_seed, seed_everything

__all__ = [
    "LAST_CHECKPOINT",
    "OPTIMIZERS",
    "SCHEDULERS",
    "DistInfo",
    "EpochEnd",
    "FitResult",
    "Predictions",
    "TrainConfig",
    "autocast_for",
    "barrier",
    "broadcast_buffers",
    "build_optimizer",
    "option",
    "build_scheduler",
    "classification_metrics",
    "current_dist",
    "derive_seed",
    "evaluate",
    "fit",
    "format_table",
    "gather_shards",
    "init_distributed",
    "load_checkpoint",
    "loss_for_task",
    "plot_confusion_matrix",
    "plot_history",
    "plot_roc",
    "predict",
    "prediction_metrics",
    "roc_auc_per_class",
    "save_checkpoint",
    "scores_from_logits",
    "seed_everything",
    "select_device",
    "shutdown_distributed",
    "to_jsonable",
    "topk_accuracy",
    "train_one_epoch",
    "versions",
    "write_json",
]
