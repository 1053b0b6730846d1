"""Learners: what the loop trains on the labeled set, scores the pool with, and evaluates.

* ``NetLearner`` trains a fresh network per round with the engine's ``fit`` (checkpointed, so a
  killed round resumes mid-training), and scores the pool in one pass for logits and
  penultimate embeddings, plus S MC-dropout passes when a strategy needs them.
* ``EmbeddingLearner`` trains a linear softmax head on fixed, precomputed embeddings: the
  pool-scale mode (a million embeddings on a GPU), where training is seconds and the selection
  ops dominate.
"""

from __future__ import annotations

import os
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from labelkit_ext.data import DataSplits
from labelkit_ext.engine import (
    TrainConfig,
    autocast_for,
    current_dist,
    data_fingerprint,
    derive_seed,
    fit,
    gather_shards,
    predict,
    prediction_metrics,
    seed_everything,
    select_device,
)
from labelkit_ext.errors import UsageError
from labelkit_ext.fingerprint import tensor_digest
from labelkit_ext.methods.active.strategies import PoolScores
from labelkit_ext.models import build_model

__all__ = [
    "DROPOUT_MODELS",
    "EmbeddingLearner",
    "LabeledSubset",
    "Learner",
    "NetLearner",
    "mc_dropout_modules",
]

# Models whose builder takes a ``dropout`` rate before the final layer (needed for MC dropout).
DROPOUT_MODELS = ("small-cnn", "wrn-28-10")
# A round's fit is many epochs of a few batches: a checkpoint after each took up to 44 % of a
# small-cnn round on CPU. Checkpoints are at least 30 s apart, plus one after the last epoch
# (which makes a resumed round instant); a kill mid-round retrains about 30 s and an epoch of
# it at most, identically.
ROUND_CHECKPOINT_SECONDS = 30.0


class Learner(ABC):
    """Trains on (pool index, label) pairs, scores the pool, evaluates on held-out data."""

    pool_size: int
    num_classes: int

    @abstractmethod
    def fit(self, indices: Sequence[int], labels: Sequence[int], round: int) -> dict:
        """Train from scratch on the labeled pool samples (seeded by the round); returns a
        record with at least ``train_seconds``."""

    @abstractmethod
    def score(self, needs: Sequence[str], mc_samples: int) -> PoolScores:
        """The pool's logits / embeddings / MC-dropout logits, as ``needs`` asks; called on
        every rank under torchrun, each gets the whole pool's scores."""

    @abstractmethod
    def evaluate(self) -> dict:
        """Metrics on the held-out test data, at least ``accuracy``."""

    @property
    @abstractmethod
    def fitted(self) -> bool:
        """Whether ``fit`` has run in this process (a resumed loop refits first)."""

    def reset(self) -> None:  # noqa: B027 - optional hook: most learners keep no files
        """Forget files left by an earlier run (called when a run starts afresh)."""


class LabeledSubset(Dataset):
    """``dataset[indices[i]]``'s image with the oracle's label ``labels[i]`` (never the data
    set's own target: with a person as oracle only their answers are known)."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], labels: Sequence[int]) -> None:
        if len(indices) != len(labels):
            raise UsageError(
                f"indices ({len(indices)}) and labels ({len(labels)}) differ in length"
            )
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, _ = self.dataset[self.indices[i]]
        return image, self.labels[i]

    @property
    def targets(self) -> torch.Tensor:
        """The oracle's labels, in order (what ``engine.fit`` checks before training)."""
        return self.labels

    def fingerprint(self) -> dict:
        """Which pool images, with which answers, of which pool: what a resumed round's
        training must find unchanged."""
        indices = torch.as_tensor(self.indices, dtype=torch.int64)
        return {"indices": tensor_digest(indices), "labels": tensor_digest(self.labels),
                "of": data_fingerprint(self.dataset)}  # fmt: skip


def mc_dropout_modules(model: nn.Module) -> list[nn.Module]:
    """The dropout layers with p > 0 that MC dropout switches on at inference."""
    kinds = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
    return [m for m in model.modules() if isinstance(m, kinds) and m.p > 0]


def _head_dropout(model: nn.Module, dropouts: list[nn.Module]) -> nn.Module | None:
    """``model.features`` without its last layer when that layer is the model's only dropout
    (small-cnn's layout), else None."""
    features = getattr(model, "features", None)
    if (
        isinstance(features, nn.Sequential)
        and len(features) > 1
        and len(dropouts) == 1
        and features[-1] is dropouts[0]
    ):
        return features[:-1]
    return None


class NetLearner(Learner):
    """A network from ``build_model`` trained with ``fit`` on the labeled part of
    ``splits.train``; the pool is ``splits.train_eval`` (same images, evaluation transform).

    ``workdir`` holds the round's training checkpoint (deleted when the next round starts);
    ``dropout`` is passed to models that take it (``DROPOUT_MODELS``) for MC dropout.
    """

    def __init__(
        self,
        splits: DataSplits,
        model: str,
        config: TrainConfig,
        *,
        workdir: str | os.PathLike | None = None,
        dropout: float = 0.0,
        pretrained: str | os.PathLike | None = None,
    ) -> None:
        if splits.info.task != "multiclass":
            raise UsageError(
                f"active learning needs a multi-class data set, {splits.info.name} is {splits.info.task}"
            )
        if dropout and model not in DROPOUT_MODELS:
            raise UsageError(f"--dropout needs a model among {DROPOUT_MODELS}, got {model!r}")
        self.splits = splits
        self.model_name = model
        self.config = config
        self.workdir = Path(workdir) if workdir is not None else None
        self.dropout = dropout
        self.pretrained = pretrained
        self.pool_size = len(splits.train_eval)
        self.num_classes = splits.info.num_classes
        self.device = select_device(config.device)
        self.model: nn.Module | None = None

    @property
    def fitted(self) -> bool:
        return self.model is not None

    def reset(self) -> None:
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _round_dir(self, round: int) -> Path | None:
        return None if self.workdir is None else self.workdir / f"round_{round:03d}"

    def fit(self, indices: Sequence[int], labels: Sequence[int], round: int) -> dict:
        info = self.splits.info
        config = replace(self.config, seed=derive_seed(self.config.seed, round))
        seed_everything(config.seed)
        kwargs = {"dropout": self.dropout} if self.dropout else {}
        net = build_model(
            self.model_name,
            info.num_classes,
            info.in_channels,
            info.image_size,
            self.pretrained,
            **kwargs,
        )
        out = self._round_dir(round)
        if out is not None and round > 0 and current_dist().is_main:
            shutil.rmtree(self._round_dir(round - 1), ignore_errors=True)
        result = fit(
            net,
            LabeledSubset(self.splits.train, indices, labels),
            None,
            info.task,
            config,
            out_dir=out,
            resume=out is not None,
            checkpoint_seconds=ROUND_CHECKPOINT_SECONDS,
        )
        self.model = result.model
        return {"train_seconds": result.train_seconds, "epochs_resumed": result.resumed_from}

    def _model(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError("the learner has not been fitted yet")
        return self.model

    @torch.no_grad()
    def score(self, needs: Sequence[str], mc_samples: int) -> PoolScores:
        """One pass over the pool; under torchrun each rank scores the strided shard
        ``range(rank, N, world_size)`` and the shards are gathered back in pool order."""
        model = self._model()
        info = current_dist()
        pool = self.splits.train_eval
        if info.enabled:
            pool = Subset(pool, range(info.rank, len(pool), info.world_size))
        loader = DataLoader(
            pool,
            batch_size=self.config.eval_batch_size,
            num_workers=self.config.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        want_mc = "mc_logits" in needs
        dropouts = mc_dropout_modules(model) if want_mc else []
        if want_mc and not dropouts:
            fix = (
                f"build {self.model_name} with --dropout > 0"
                if self.model_name in DROPOUT_MODELS
                else f"{self.model_name} takes no --dropout: use a model among {DROPOUT_MODELS} "
                "with --dropout > 0"
            )
            raise UsageError(f"MC-dropout strategies need dropout layers: {fix}")
        head_only = _head_dropout(model, dropouts)
        logits, embeddings, mc = [], [], []
        model.eval()
        for images, _ in loader:
            images = images.to(self.device, non_blocking=True)
            with autocast_for(self.device, self.config.amp):
                # When the only dropout sits just before the classifier, the trunk runs once
                # and the S masks are sampled on its output (S times cheaper than S passes).
                trunk = head_only(images) if head_only is not None else None
                features = model.features[-1](trunk) if trunk is not None else model.embed(images)
                logits.append(model.classifier(features).float())
                embeddings.append(features.float())
                if want_mc:
                    mc.append(self._mc_pass(model, images, dropouts, trunk, mc_samples))
        scores = PoolScores(
            logits=torch.cat(logits) if "logits" in needs else None,
            embeddings=torch.cat(embeddings) if "embeddings" in needs else None,
            mc_logits=torch.cat(mc, dim=1) if want_mc else None,
        )
        return self._gathered(scores) if info.enabled else scores

    def _gathered(self, shard: PoolScores) -> PoolScores:
        """Every rank's shard of the scores, back in pool order on this rank's device."""
        info, N = current_dist(), self.pool_size

        def rows(t: torch.Tensor | None, dim: int = 0) -> torch.Tensor | None:
            if t is None:
                return None
            whole = gather_shards(t.movedim(dim, 0), N, info).movedim(0, dim)
            return whole.to(self.device)

        return PoolScores(rows(shard.logits), rows(shard.embeddings), rows(shard.mc_logits, 1))

    @staticmethod
    def _mc_pass(
        model: nn.Module,
        images: torch.Tensor,
        dropouts: list[nn.Module],
        trunk: torch.Tensor | None,
        samples: int,
    ) -> torch.Tensor:
        """(S, B, C) logits with the dropout layers sampling; from ``trunk`` (the features
        before the last, dropout, layer) when given."""
        for m in dropouts:
            m.train()
        try:
            if trunk is not None:
                drop = model.features[-1]
                return torch.stack([model.classifier(drop(trunk)).float() for _ in range(samples)])
            return torch.stack([model(images).float() for _ in range(samples)])
        finally:
            for m in dropouts:
                m.eval()

    def evaluate(self) -> dict:
        pred = predict(
            self._model(),
            self.splits.test,
            self.device,
            batch_size=self.config.eval_batch_size,
            amp=self.config.amp,
            num_workers=self.config.num_workers,
        )
        metrics = prediction_metrics(pred, self.splits.info.task, self.splits.info.class_names)
        return {"accuracy": metrics["accuracy"], "loss": metrics["loss"]}


class EmbeddingLearner(Learner):
    """A linear softmax head on fixed embeddings (e.g. from a self-supervised encoder).

    ``pool`` (N, D) and ``test`` (T, D) embeddings with ``test_targets``; trained full-batch
    with Adam for ``steps`` steps on the labeled rows (seeded by the round), input dropout
    ``dropout`` for MC sampling. Scoring is chunked, so the pool may be millions of rows on a GPU.
    """

    def __init__(
        self,
        pool: torch.Tensor,
        test: torch.Tensor,
        test_targets: torch.Tensor,
        num_classes: int,
        *,
        device: str = "auto",
        steps: int = 200,
        lr: float = 0.01,
        weight_decay: float = 1e-4,
        dropout: float = 0.0,
        seed: int = 0,
        chunk: int = 65_536,
    ) -> None:
        if pool.ndim != 2 or test.ndim != 2 or pool.shape[1] != test.shape[1]:
            raise UsageError(
                f"pool and test embeddings must be (N, D) and (T, D), got {tuple(pool.shape)}, {tuple(test.shape)}"
            )
        if len(test_targets) != len(test):
            raise UsageError(f"{len(test)} test embeddings but {len(test_targets)} test targets")
        if num_classes < 2:
            raise UsageError(f"num_classes must be >= 2, got {num_classes}")
        if steps < 1 or lr <= 0 or not 0 <= dropout < 1:
            raise UsageError(
                f"need steps >= 1, lr > 0, dropout in [0, 1); got {steps}, {lr}, {dropout}"
            )
        self.device = select_device(device)
        self.pool = pool.to(self.device, torch.float32)
        self.test = test.to(self.device, torch.float32)
        self.test_targets = torch.as_tensor(test_targets, dtype=torch.long, device=self.device)
        self.pool_size, self.num_classes = len(pool), num_classes
        self.steps, self.lr, self.weight_decay = steps, lr, weight_decay
        self.dropout, self.seed, self.chunk = dropout, seed, chunk
        self.head: nn.Module | None = None

    @property
    def fitted(self) -> bool:
        return self.head is not None

    def _build(self) -> nn.Module:
        return nn.Sequential(
            nn.Dropout(self.dropout), nn.Linear(self.pool.shape[1], self.num_classes)
        )

    def fit(self, indices: Sequence[int], labels: Sequence[int], round: int) -> dict:
        tic = time.perf_counter()
        seed_everything(derive_seed(self.seed, round))
        head = self._build().to(self.device)
        x = self.pool[torch.as_tensor(list(indices), dtype=torch.long, device=self.device)]
        y = torch.as_tensor(list(labels), dtype=torch.long, device=self.device)
        optimizer = torch.optim.Adam(head.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        head.train()
        for _ in range(self.steps):
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(head(x), y).backward()
            optimizer.step()
        self.head = head.eval()
        return {"train_seconds": time.perf_counter() - tic}

    def _logits(self, x: torch.Tensor, mc: bool = False) -> torch.Tensor:
        if self.head is None:
            raise RuntimeError("the learner has not been fitted yet")
        self.head.train(mc)
        try:
            return torch.cat(
                [self.head(x[i : i + self.chunk]) for i in range(0, len(x), self.chunk)]
            )
        finally:
            self.head.eval()

    @torch.no_grad()
    def score(self, needs: Sequence[str], mc_samples: int) -> PoolScores:
        mc = None
        if "mc_logits" in needs:
            if self.dropout == 0:
                raise UsageError("MC-dropout strategies need the embedding head's --dropout > 0")
            mc = torch.stack([self._logits(self.pool, mc=True) for _ in range(mc_samples)])
        return PoolScores(
            logits=self._logits(self.pool) if "logits" in needs else None,
            embeddings=self.pool if "embeddings" in needs else None,
            mc_logits=mc,
        )

    @torch.no_grad()
    def evaluate(self) -> dict:
        logits = self._logits(self.test)
        loss = nn.functional.cross_entropy(logits, self.test_targets)
        accuracy = (logits.argmax(1) == self.test_targets).float().mean()
        return {"accuracy": float(accuracy), "loss": float(loss)}
