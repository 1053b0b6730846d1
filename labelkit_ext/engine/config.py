"""Training configuration, and the optimiser and LR scheduler it describes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

__all__ = ["OPTIMIZERS", "SCHEDULERS", "TrainConfig", "build_optimizer", "build_scheduler"]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("cosine", "step", "none")


@dataclass
class TrainConfig:
    """Everything ``fit`` needs besides the model and data. The scheduler steps once per epoch."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    scheduler: str = "cosine"
    step_size: int = 30  # "step": decay every step_size epochs ...
    gamma: float = 0.1  # ... by this factor
    amp: bool = (
        True  # autocast (bfloat16, else float16 with loss scaling) on CUDA; CPU runs float32
    )
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    eval_batch_size: int = 256
    quiet: bool = False  # no progress bars or per-epoch lines

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "step_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("weight_decay", "momentum", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")

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
            optimizer, step_size=config.step_size, gamma=config.gamma
        )
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
