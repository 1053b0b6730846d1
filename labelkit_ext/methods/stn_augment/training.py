"""Stage 2: train the augmenter against a frozen classifier (and, optionally, a discriminator),
and measure its warps. Stages 1 and 3 are ``engine.fit``; this alternating two-optimiser loop
is the one thing the engine does not express (it follows ``fit`` under torchrun: DDP, a
``DistributedSampler`` share per rank, BatchNorm buffers broadcast, rank 0 logs)."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, DistributedSampler

from labelkit_ext.checks import check_fields
from labelkit_ext.engine import (
    autocast_for,
    broadcast_buffers,
    check_device_spec,
    current_dist,
    data_parallel,
    derive_seed,
    grad_scaler,
    index_sampler,
    progress_bar,
    seed_everything,
    select_device,
    shuffled_loader,
)
from labelkit_ext.errors import UsageError
from labelkit_ext.nn.stn import theta_deviation, theta_penalty
from labelkit_ext.ops.entropy import max_entropy_loss, softmax_entropy

__all__ = [
    "AugmentConfig",
    "AugmenterFit",
    "frozen",
    "probe_entropy",
    "probe_images",
    "train_augmenter",
    "warp_statistics",
]

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass
class AugmentConfig:
    """Stage-2 settings. The generator (augmenter) minimises
    ``log(1 - D(I')) - lambda_me * L_ME [+ penalty_weight * theta_penalty(theta, penalty_radius)]``;
    the discriminator minimises the binary cross-entropy of original (1) vs warped (0)."""

    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3  # Adam, augmenter
    disc_lr: float = 1e-3  # Adam, discriminator
    lambda_me: float = 2.0  # the original's lambda
    penalty_weight: float = 10.0
    penalty_radius: float = 0.5
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    probe_size: int = 512  # held-out images whose warps are measured after every epoch
    quiet: bool = False
    # DataLoader worker processes for the (augmented) training images; as in stage 1, each
    # worker draws its own augmentation stream, so another count is another run.
    num_workers: int = 0

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("epochs", "batch_size", "probe_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise UsageError(f"num_workers must be >= 0, got {self.num_workers}")
        for name in ("lr", "disc_lr"):
            if getattr(self, name) <= 0:
                raise UsageError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("lambda_me", "penalty_weight", "penalty_radius"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} must be >= 0, got {getattr(self, name)}")
        check_device_spec(self.device)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AugmenterFit:
    """Stage-2 record: per-step losses, the probe's warp statistics before training (epoch 0)
    and after each epoch, and the wall time."""

    steps: list[dict] = field(default_factory=list)
    epochs: list[dict] = field(default_factory=list)
    seconds: float = 0.0


@contextlib.contextmanager
def frozen(*modules: nn.Module | None) -> Iterator[None]:
    """``modules`` in eval mode with no parameter gradients; their flags restored after."""
    present = [m for m in modules if m is not None]
    saved = [(m.training, [p.requires_grad for p in m.parameters()]) for m in present]
    for m in present:
        m.eval().requires_grad_(False)
    try:
        yield
    finally:
        for m, (training, flags) in zip(present, saved, strict=True):
            m.train(training)
            for p, flag in zip(m.parameters(), flags, strict=True):
                p.requires_grad_(flag)


def probe_images(dataset: Dataset, size: int) -> torch.Tensor:
    """The first ``size`` images of ``dataset`` (an evaluation split), stacked."""
    n = min(size, len(dataset))
    if n == 0:
        raise ValueError("the probe data set is empty")
    return torch.stack([dataset[i][0] for i in range(n)])


def _summary(values: torch.Tensor) -> dict[str, float]:
    v = values.double().cpu().numpy()
    stats = {"mean": float(v.mean())}
    stats.update({f"q{round(q * 100):02d}": float(np.quantile(v, q)) for q in QUANTILES})
    return stats


@torch.no_grad()
def warp_statistics(
    classifier: nn.Module,
    augmenter: nn.Module,
    images: torch.Tensor,
    batch_size: int = 256,
    original_entropy: torch.Tensor | None = None,
) -> dict[str, dict[str, float]]:
    """Distribution over ``images`` of ``||theta - I||``, and of the classifier's entropy
    (bits) on the warped and on the original images: mean and quantiles. ``original_entropy``
    (``probe_entropy``'s answer for these images) skips the pass over the originals, whose
    entropies do not change while the classifier is frozen."""
    device = next(classifier.parameters()).device
    deviation, warped_h = [], []
    with frozen(classifier, augmenter):
        for chunk in images.split(batch_size):
            out = augmenter(chunk.to(device))
            deviation.append(theta_deviation(out.theta.float()))
            warped_h.append(softmax_entropy(classifier(out.image).float(), base=2))
    if original_entropy is None:
        original_entropy = probe_entropy(classifier, images, batch_size)
    return {
        "theta_deviation": _summary(torch.cat(deviation)),
        "warped_entropy": _summary(torch.cat(warped_h)),
        "original_entropy": _summary(original_entropy),
    }


@torch.no_grad()
def probe_entropy(
    classifier: nn.Module, images: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """(N,) the classifier's entropy (bits) on each of ``images``."""
    device = next(classifier.parameters()).device
    with frozen(classifier):
        return torch.cat(
            [
                softmax_entropy(classifier(chunk.to(device)).float(), base=2)
                for chunk in images.split(batch_size)
            ]
        )


def _log_one_minus_d(logits: torch.Tensor) -> torch.Tensor:
    """``log(1 - sigmoid(logits))``, stably: ``-softplus(logits)``."""
    return -F.softplus(logits)


def _discriminator_step(
    discriminator: nn.Module,
    optimizer: torch.optim.Optimizer,
    real: torch.Tensor,
    fake: torch.Tensor,
    amp: bool,
    scaler: torch.amp.GradScaler,
) -> dict[str, torch.Tensor]:
    """One discriminator step; the caller runs ``scaler.update()`` once both steps are done.
    Its loss and accuracy stay on the device (see ``_to_numbers``)."""
    with autocast_for(real.device, amp):
        real_logits = discriminator(real).float()
        fake_logits = discriminator(fake.detach()).float()
    loss = F.binary_cross_entropy_with_logits(
        real_logits, torch.ones_like(real_logits)
    ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    hits = (real_logits > 0).sum() + (fake_logits <= 0).sum()
    return {"d_loss": loss.detach(), "d_accuracy": hits.double() / (2 * len(real))}


def _to_numbers(records: list[dict]) -> None:
    """Replace the device scalars in ``records`` by Python floats, in one transfer: the step
    records stay on the GPU during an epoch, so no step waits for the GPU (float32 values
    widen to float64 exactly, as ``.item()`` does)."""
    places = [(r, k) for r in records for k, v in r.items() if isinstance(v, torch.Tensor)]
    if places:
        values = torch.stack([r[k].double() for r, k in places]).tolist()
        for (r, k), value in zip(places, values, strict=True):
            r[k] = value


def train_augmenter(
    classifier: nn.Module,
    augmenter: nn.Module,
    train_set: Dataset,
    probe: torch.Tensor,
    config: AugmentConfig,
    *,
    discriminator: nn.Module | None = None,
    penalty: bool = False,
    log: Callable[[str], None] = print,
) -> AugmenterFit:
    """Stage 2: train ``augmenter`` to make ``classifier`` (frozen, eval mode: its weights
    and batch-norm statistics never change) uncertain on the warped images, by maximising
    ``max_entropy_loss``; with ``discriminator``, against it (alternating one discriminator
    and one augmenter step per batch); with ``penalty``, plus ``theta_penalty``.

    The images in ``probe`` are measured (``warp_statistics``) before training and after
    every epoch. Seeded by ``config.seed``. Under torchrun the augmenter and discriminator are
    data-parallel (DDP, ``batch_size`` per process) and rank 0 logs; the records are rank 0's.
    """
    info = current_dist()
    device = select_device(config.device)
    augmenter.to(device).train()
    seed_everything(config.seed)
    opt_g = torch.optim.Adam(augmenter.parameters(), lr=config.lr, betas=(0.5, 0.999))
    opt_d = None
    scaler = grad_scaler(device, config.amp)  # float16 GPUs: one scaler for both optimisers
    if discriminator is not None:
        discriminator.to(device).train()
        opt_d = torch.optim.Adam(discriminator.parameters(), lr=config.disc_lr, betas=(0.5, 0.999))
    generator = data_parallel(augmenter, device, info)
    critic = data_parallel(discriminator, device, info) if discriminator is not None else None
    if info.rank:  # other ranks draw other random warps (rank 0 draws those of one process)
        seed_everything(derive_seed(config.seed, info.rank))
    # One process draws every epoch's order from one generator seeded once (as it always has).
    loader = shuffled_loader(train_set, info, config.seed, torch.Generator().manual_seed(config.seed),
                             batch_size=config.batch_size, num_workers=config.num_workers,
                             pin_memory=device.type == "cuda")  # fmt: skip
    fitted = AugmenterFit()
    tic = time.perf_counter()
    with frozen(classifier):
        classifier.to(device)
        original = probe_entropy(classifier, probe)  # the classifier stays frozen: once
        fitted.epochs.append(
            {"epoch": 0, **warp_statistics(classifier, augmenter, probe, original_entropy=original)}
        )
        augmenter.train()
        progress = not config.quiet and info.is_main and sys.stderr.isatty()
        for epoch in range(1, config.epochs + 1):
            sampler = index_sampler(loader)
            if isinstance(sampler, DistributedSampler):
                sampler.set_epoch(epoch)
            bar = progress_bar(loader, f"stage 2 epoch {epoch}/{config.epochs}", progress)
            first_step = len(fitted.steps)
            for images, _ in bar:
                x = images.to(device, non_blocking=True)
                out = generator(x)
                record = {"step": len(fitted.steps) + 1, "epoch": epoch}
                if critic is not None:
                    record.update(
                        _discriminator_step(critic, opt_d, x, out.image, config.amp, scaler)
                    )
                with autocast_for(device, config.amp):
                    logits = classifier(out.image).float()
                me = max_entropy_loss(logits)
                loss = -config.lambda_me * me
                if discriminator is not None:
                    with frozen(discriminator), autocast_for(device, config.amp):
                        adversarial = _log_one_minus_d(discriminator(out.image).float()).mean()
                    loss = loss + adversarial
                    record["g_adversarial"] = adversarial.detach()
                if penalty:
                    reg = theta_penalty(out.theta.float(), config.penalty_radius)
                    loss = loss + config.penalty_weight * reg
                    record["penalty"] = reg.detach()
                opt_g.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt_g)
                scaler.update()
                with torch.no_grad():
                    record.update(
                        g_loss=loss.detach(),
                        max_entropy=me.detach(),
                        warped_entropy=softmax_entropy(logits, base=2).mean(),
                        theta_deviation=theta_deviation(out.theta.float()).mean(),
                    )
                fitted.steps.append(record)
                if progress:  # reads two values: a sync, only with a bar on screen
                    bar.set_postfix(me=f"{float(record['max_entropy']):.3f}",
                                    dev=f"{float(record['theta_deviation']):.3f}",
                                    refresh=False)  # fmt: skip
            _to_numbers(fitted.steps[first_step:])
            broadcast_buffers(augmenter, info)
            if discriminator is not None:
                broadcast_buffers(discriminator, info)
            stats = warp_statistics(classifier, augmenter, probe, original_entropy=original)
            augmenter.train()
            fitted.epochs.append({"epoch": epoch, **stats})
            if not config.quiet and info.is_main:
                log(
                    f"stage 2 epoch {epoch}: ||theta - I|| median "
                    f"{stats['theta_deviation']['q50']:.3f}, warped entropy median "
                    f"{stats['warped_entropy']['q50']:.3f} bits (originals "
                    f"{stats['original_entropy']['q50']:.3f})"
                )
    augmenter.eval()
    if discriminator is not None:
        discriminator.eval()
    fitted.seconds = time.perf_counter() - tic
    return fitted
