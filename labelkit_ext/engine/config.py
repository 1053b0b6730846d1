"""Training configuration, and the optimiser and LR scheduler it describes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import MISSING, asdict, dataclass, field
from typing import Any

import torch

from labelkit_ext.checks import check_fields
from labelkit_ext.engine.device import check_device_spec
from labelkit_ext.errors import UsageError

__all__ = [
    "TRAJECTORY_FIELDS",
    "OPTIMIZERS",
    "SCHEDULERS",
    "TrainConfig",
    "build_optimizer",
    "build_scheduler",
    "option",
]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("cosine", "step", "none")
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
#: ``TrainConfig`` fields that fix an optimisation's trajectory: a resumed run must match its
#: checkpoint on them (``fit`` adds ``num_workers``, its augmentation streams).
TRAJECTORY_FIELDS = ("epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay",
                     "scheduler", "step_size", "gamma", "seed")  # fmt: skip


def option(default: Any = MISSING, help: str = "", *, factory: Any = MISSING, **cli: Any) -> Any:
    """A dataclass field with its command-line help (and ``choices``, ``metavar``, ``flag``...)
    in ``metadata``: the ``labelkit`` options are generated from these fields, so Python and
    the shell share one default (see ``labelkit_ext.engine.options``)."""
    metadata = {"help": help, **cli}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Everything ``fit`` needs besides the model and data. The scheduler steps once per epoch."""

    epochs: int = option(10, "training epochs")
    batch_size: int = option(64, "batch size, per process under torchrun")
    lr: float = option(0.05, "initial learning rate")
    optimizer: str = option("sgd", "optimiser", choices=OPTIMIZERS)
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(5e-4, "L2 weight decay")
    scheduler: str = option(
        "cosine",
        "learning-rate schedule, stepped per epoch: cosine decay to 0 over the epochs, step decay "
        "(x gamma every step-size epochs), or none (constant)",
        choices=SCHEDULERS,
    )
    step_size: int | None = option(
        None, "'step' schedule: epochs between decays (default: a third of the epochs)"
    )
    gamma: float = option(0.1, "'step' schedule: factor applied at each decay")
    amp: bool = option(
        True, "autocast on CUDA (bfloat16, else float16 with loss scaling); CPU runs float32"
    )
    seed: int = option(
        0, "training seed (initial weights, batch order, augmentation), in [0, 2**32)"
    )
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    num_workers: int = option(
        0, "DataLoader worker processes (with the seed, they fix the augmentation)"
    )
    eval_batch_size: int = option(256, "batch size for evaluation")
    quiet: bool = option(False, "no progress bars or per-epoch lines")

    def __post_init__(self) -> None:
        check_fields(self)  # types, NaN / inf, the seed's range: before the range checks below
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("weight_decay", "momentum", "num_workers"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.momentum >= 1:  # the update then grows without bound
            raise UsageError(f"momentum must be < 1, got {self.momentum}")
        check_device_spec(self.device)
        if self.lr <= 0:
            raise UsageError(f"lr must be > 0, got {self.lr}")
        for name in ("lr", "weight_decay"):  # the optimisers apply them in float32
            if getattr(self, name) > FLOAT32_MAX:
                raise UsageError(
                    f"{name} must be at most {FLOAT32_MAX:.4g} (float32), got {getattr(self, name)}"
                )
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.scheduler not in SCHEDULERS:
            raise UsageError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        if self.step_size is not None and self.step_size < 1:
            raise UsageError(f"step_size must be >= 1, got {self.step_size}")
        if self.scheduler == "step" and self.decay_every >= self.epochs:
            raise UsageError(
                f"step_size={self.decay_every} >= epochs={self.epochs}: the 'step' schedule would "
                "never decay the learning rate; lower step_size or use scheduler='none'"
            )
        if not 0 < self.gamma <= 1:
            raise UsageError(f"gamma must be in (0, 1], got {self.gamma}")

    @property
    def decay_every(self) -> int:
        """Epochs between decays of the 'step' schedule (``step_size``, else epochs // 3)."""
        return self.step_size if self.step_size is not None else max(1, self.epochs // 3)

    def to_dict(self) -> dict:
        return asdict(self)


def build_optimizer(
    params: Iterable[torch.nn.Parameter], config: TrainConfig
) -> torch.optim.Optimizer:
    """SGD with momentum, Adam or AdamW from ``config``."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=config.lr, weight_decay=config.weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig
) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine decay to 0 over ``epochs``, step decay, or a constant LR."""
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    if config.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=config.decay_every, gamma=config.gamma
        )
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
