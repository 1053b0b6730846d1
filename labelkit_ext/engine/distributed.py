"""Distributed data parallel under ``torchrun``: process group, rank facts, gathering."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    Sampler,
    Subset,
    TensorDataset,
)

from labelkit_ext.engine.seeding import derive_seed

__all__ = [
    "DistInfo",
    "current_dist",
    "init_distributed",
    "shutdown_distributed",
    "barrier",
    "broadcast_buffers",
    "data_parallel",
    "gather_rows",
    "gather_shards",
    "index_sampler",
    "loader_over",
    "on_main",
    "shuffle_epoch",
    "shuffled_loader",
    "sum_across_ranks",
]

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job; a single process is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, writes checkpoints and results."""
        return self.rank == 0


def current_dist() -> DistInfo:
    """The running job as torch.distributed sees it (single process when uninitialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1 in the
    environment): NCCL when training on GPUs, gloo on CPU. A no-op otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size <= 1 or dist.is_initialized():
        return current_dist()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return current_dist()


def shutdown_distributed() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op for one process)."""
    if info.enabled:
        dist.barrier()


def data_parallel(module: nn.Module, device: torch.device, info: DistInfo) -> nn.Module:
    """``module`` (already on ``device``) wrapped in DDP under torchrun, itself otherwise."""
    if not info.enabled:
        return module
    return DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None
    )


def loader_over(
    dataset: Dataset, sampler: Sampler, *, batch_size: int, drop_last: bool = False, **loader_args
) -> DataLoader:
    """A ``DataLoader`` of ``dataset`` in ``sampler``'s order, ``batch_size`` at a time.

    A dataset held in tensors (a ``TensorDataset``, or a ``Subset`` of one: precomputed
    features; not their subclasses) is indexed once per batch rather than once per sample and then stacked: the same
    batches without a Python call per row (a third of a small head's epoch on features).
    """
    if _indexes_whole_batches(dataset):
        batches = BatchSampler(sampler, batch_size, drop_last)
        return DataLoader(dataset, sampler=batches, batch_size=None, **loader_args)
    return DataLoader(
        dataset, sampler=sampler, batch_size=batch_size, drop_last=drop_last, **loader_args
    )


def _indexes_whole_batches(dataset: Dataset) -> bool:
    # Exact types: a subclass may index one sample at a time (a transform per sample).
    while type(dataset) is Subset:  # a Subset passes a list of indices on to its dataset
        dataset = dataset.dataset
    return type(dataset) is TensorDataset


def index_sampler(loader: DataLoader) -> Sampler:
    """The sampler whose order the batches of ``loader`` (from ``loader_over``) follow."""
    sampler = loader.sampler
    return sampler.sampler if isinstance(sampler, BatchSampler) else sampler


def shuffled_loader(
    dataset: Dataset,
    info: DistInfo,
    seed: int,
    generator: torch.Generator | None = None,
    **loader_args,
) -> DataLoader:
    """Shuffled training batches: under torchrun this rank's ``DistributedSampler`` share
    (its order seeded by ``seed``), otherwise a shuffle drawn from ``generator`` (a fresh one by
    default). ``shuffle_epoch`` sets an epoch's order."""
    if info.enabled:
        sampler = DistributedSampler(dataset, info.world_size, info.rank, shuffle=True, seed=seed)
        return loader_over(dataset, sampler, **loader_args)
    # The loader draws its workers' base seed from the same generator, as shuffle=True does.
    generator = generator or torch.Generator()
    sampler = RandomSampler(dataset, generator=generator)
    return loader_over(dataset, sampler, generator=generator, **loader_args)


def shuffle_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    """Epoch ``epoch``'s order of a ``shuffled_loader``, a function of (seed, epoch) alone: the
    sampler is told the epoch, or the generator reseeded."""
    sampler = index_sampler(loader)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
    else:
        loader.generator.manual_seed(derive_seed(seed, epoch))


def on_main(fn: Callable[[], T], info: DistInfo | None = None) -> T:
    """``fn()`` run by rank 0 alone, its result handed to every rank (``fn()`` itself for one
    process): for steps with side effects (files, a person's answers) or whose outcome every
    rank must share exactly. An exception ``fn`` raises is raised on every rank (as a
    RuntimeError with its message where it cannot be pickled), so no rank waits forever."""
    info = info or current_dist()
    if not info.enabled:
        return fn()
    box: list = [None]
    if info.is_main:
        try:
            box[0] = (True, fn())
        except Exception as error:
            box[0] = (False, _portable(error))
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def _portable(error: Exception) -> Exception:
    """``error`` if it survives pickling, else a RuntimeError with its message."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__} on rank 0: {error}")


def broadcast_buffers(model: nn.Module, info: DistInfo) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts buffers before each training forward, but that forward then updates each
    rank's copy from its own batch; without this, ranks would evaluate slightly different
    models and rank 0's checkpoint would not be the model every rank scored.
    """
    if info.enabled:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def sum_across_ranks(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """Element-wise sums of ``values`` over every rank (``values`` itself for one process)."""
    if not info.enabled:
        return values
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def gather_rows(rows: torch.Tensor, info: DistInfo) -> tuple[torch.Tensor, int]:
    """Every rank's ``rows`` concatenated in rank order, differentiable (each rank's part sends
    its gradient back to its owner), and where this rank's rows start in it. Ranks may hold
    different row counts (padded to the largest for the gather, then cut back). One process:
    ``(rows, 0)``."""
    if not info.enabled:
        return rows, 0
    mine = torch.tensor([rows.shape[0]], device=rows.device)
    counts = [torch.empty_like(mine) for _ in range(info.world_size)]
    dist.all_gather(counts, mine)
    counts = [int(c) for c in counts]
    padded = F.pad(rows, (0, 0) * (rows.ndim - 1) + (0, max(counts) - rows.shape[0]))
    parts = dist_nn.all_gather(padded)
    gathered = torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)])
    return gathered, sum(counts[: info.rank])


def gather_shards(shard: torch.Tensor, total: int, info: DistInfo) -> torch.Tensor:
    """Reassemble rows computed on the strided shards ``range(rank, total, world_size)``."""
    if not info.enabled:
        return shard
    pieces: list = [None] * info.world_size
    dist.all_gather_object(pieces, shard.cpu())
    out = torch.empty((total, *shard.shape[1:]), dtype=shard.dtype)
    for rank, piece in enumerate(pieces):
        out[rank :: info.world_size] = piece
    return out
