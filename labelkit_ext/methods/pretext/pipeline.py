"""``run_study``: every pretext task x seed, linear evaluation at every label fraction, the random
and supervised-from-scratch baselines, and the aggregated results (Table 1, fraction curves)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from labelkit_ext.checks import check_seeds
from labelkit_ext.data import DataSplits, dataset_targets
from labelkit_ext.engine import TrainConfig, current_dist, save_checkpoint, seed_everything
from labelkit_ext.errors import UsageError
from labelkit_ext.methods.common import dataset_summary, write_results
from labelkit_ext.methods.pretext.evaluation import (
    EvalResult,
    extract_features,
    label_fraction_indices,
    linear_eval,
    train_scratch,
)
from labelkit_ext.methods.pretext.networks import Backbone, build_backbone
from labelkit_ext.methods.pretext.report import percent, summarize, write_plots
from labelkit_ext.methods.pretext.tasks import PRETEXT_TASKS, PretextSettings, check_task_images
from labelkit_ext.methods.pretext.training import PretextFit, train_pretext

__all__ = [
    "BACKBONE_FILE",
    "DEFAULT_FRACTIONS",
    "PRETRAINED",
    "RANDOM",
    "SUPERVISED",
    "StudyFit",
    "run_study",
]

DEFAULT_FRACTIONS = (0.01, 0.1, 1.0)
RANDOM = "random init"  # the frozen, untrained backbone
PRETRAINED = "pretrained"  # a backbone from a weights file (e.g. ImageNet), evaluated frozen
SUPERVISED = "supervised"  # the whole network trained from scratch on the labels
BACKBONE_FILE = "backbone.pt"  # a pretext-trained backbone, loadable with --pretrained
# pretext_config's fields as `labelkit run pretext` names them (in a refused resume's message)
PRETEXT_OPTION_NAMES = {"epochs": "pretext_epochs", "lr": "pretext_lr"}


@dataclass
class StudyFit:
    """What ``run_study`` returns: the results (as written to results.json), the pretext fits
    by (task, seed), and the linear-eval / scratch results by (backbone, seed, fraction)."""

    results: dict[str, Any]
    pretext: dict[tuple[str, int], PretextFit] = field(default_factory=dict)
    evals: dict[tuple[str, int, float], EvalResult] = field(default_factory=dict)


class _Stages:
    """Wall time per stage, printed as each ends unless quiet."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.seconds: dict[str, float] = {}

    def log(self, message: str) -> None:
        if not self.quiet and current_dist().is_main:
            print(f"[pretext] {message}", flush=True)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        tic = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - tic
        self.log(f"{name}: {self.seconds[name]:.1f}s")


def _check(
    tasks: Sequence[str], seeds: Sequence[int], fractions: Sequence[float]
) -> tuple[list[int], list[float]]:
    """The seeds and label fractions as Python numbers (NumPy arrays and scalars accepted)."""
    unknown = [t for t in tasks if t not in PRETEXT_TASKS]
    if unknown:
        raise UsageError(f"tasks must be among {PRETEXT_TASKS}, got {unknown}")
    seeds = check_seeds(seeds)
    fractions = np.asarray(fractions, dtype=np.float64).ravel().tolist()
    if not fractions:
        raise UsageError("fractions must hold at least one label fraction")
    for f in fractions:
        if not 0.0 < f <= 1.0:
            raise UsageError(f"label fractions must be in (0, 1], got {f}")
    return seeds, fractions


def _eval_dir(out: Path | None, seed: int, backbone: str, fraction: float) -> Path | None:
    """Where the head (or scratch network) of (backbone, seed, fraction) is checkpointed."""
    if out is None:
        return None
    return out / f"seed{seed}" / "eval" / backbone.replace(" ", "-") / f"fraction-{fraction!r}"


def _eval_record(backbone: str, seed: int, fraction: float, result: EvalResult) -> dict:
    return {
        "backbone": backbone,
        "seed": seed,
        "fraction": fraction,
        "train_size": result.train_size,
        "epochs": result.epochs,
        "seconds": result.seconds,
        "resumed_from": result.resumed_from,
        "metrics": result.metrics,
        "final_train_loss": result.history[-1]["train_loss"] if result.history else None,
    }


def _results(fit: StudyFit, header: dict, seeds_done: list[int], seconds: dict) -> dict:
    """results.json of the seeds done so far: the header (config, data set, backbones),
    pretext histories, every linear-eval / scratch run and their summary over seeds."""
    config = header["config"]
    runs = [_eval_record(b, s, f, r) for (b, s, f), r in fit.evals.items()]
    pretext = {
        task: {str(seed): {"history": p.history, "seconds": p.train_seconds,
                           "resumed_from": p.resumed_from}
               for (t, seed), p in fit.pretext.items() if t == task}
        for task in config["tasks"]
    }  # fmt: skip
    return {
        **header,
        "seeds_done": seeds_done,
        "pretext": pretext,
        "runs": runs,
        "summary": summarize(runs, pretext, header["backbones"], config["fractions"]),
        "timings": dict(seconds),
    }


def run_study(
    splits: DataSplits,
    *,
    tasks: Sequence[str] = PRETEXT_TASKS,
    model: str = "small-cnn",
    seeds: Sequence[int] = (0,),
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    pretext_config: TrainConfig | None = None,
    eval_config: TrainConfig | None = None,
    scratch_config: TrainConfig | None = None,
    settings: PretextSettings | None = None,
    hidden: int = 256,
    balanced: bool = True,
    min_steps: int = 200,
    random_baseline: bool = True,
    scratch_baseline: bool = True,
    pretrained: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    quiet: bool = False,
) -> StudyFit:
    """The whole method on ``splits``.

    For each seed: each pretext task trains a fresh ``model`` backbone on the training images
    without labels (``pretext_config``), then the frozen backbone is evaluated with the
    two-dense-layer head (``eval_config``) at every label fraction; the randomly initialised
    backbone (and the one loaded from ``pretrained``, e.g. ImageNet weights, when given) is
    evaluated the same way, and ``model`` is trained from scratch on the same label
    subsets (``scratch_config``). The label subset of (seed, fraction) is shared by every
    backbone. Epochs are raised to ``min_steps`` optimiser steps for small subsets.

    With ``out_dir``: checkpoints of the pretext networks, heads and scratch networks
    (``resume`` continues them, and reuses finished ones), the trained backbones
    (``seed<s>/<task>/backbone.pt``), plots and results.json.
    """
    started = time.perf_counter()
    seeds, fractions = _check(tasks, seeds, fractions)
    settings = settings or PretextSettings()
    pretext_config = pretext_config or TrainConfig(epochs=8, optimizer="adam", lr=1e-3)
    eval_config = eval_config or TrainConfig(epochs=30, optimizer="adam", lr=1e-3)
    scratch_config = scratch_config or TrainConfig(epochs=15)
    info = splits.info
    if "context" in tasks and settings.grid % 2 == 0:
        raise UsageError(f"the context task needs an odd grid, got {settings.grid}")
    for task in tasks:
        check_task_images(task, splits.train_eval)
    tile = settings.tile_for(info.image_size) if {"jigsaw", "context"} & set(tasks) else None
    out = Path(out_dir) if out_dir is not None else None
    stages = _Stages(quiet)
    fit = StudyFit(results={})
    targets = dataset_targets(splits.train_eval)
    fractions = sorted(set(fractions))
    order = [SUPERVISED] * scratch_baseline + [RANDOM] * random_baseline
    order += [PRETRAINED] * (pretrained is not None) + list(tasks)
    header = {
        "method": "pretext",
        "config": {
            "model": model,
            "pretrained": pretrained,
            "tasks": list(tasks),
            "seeds": list(seeds),
            "fractions": fractions,
            "settings": settings.to_dict(),
            "tile_size": tile,
            "hidden": hidden,
            "balanced_loss": balanced,
            "min_steps": min_steps,
            "pretext_train": pretext_config.to_dict(),
            "linear_eval_train": eval_config.to_dict(),
            "scratch_train": scratch_config.to_dict(),
        },
        "dataset": dataset_summary(splits),
        "backbones": order,
    }
    for seed in seeds:
        subsets = {f: label_fraction_indices(targets, f, seed) for f in fractions}
        backbones: list[tuple[str, Backbone]] = []
        if random_baseline:
            seed_everything(seed)
            backbones.append((RANDOM, build_backbone(model, info.in_channels, info.image_size)))
        if pretrained is not None:
            backbone = build_backbone(model, info.in_channels, info.image_size, pretrained)
            backbones.append((PRETRAINED, backbone))
        for task in tasks:
            seed_everything(seed)  # every task starts from the same initial backbone
            backbone = build_backbone(model, info.in_channels, info.image_size)
            task_dir = out / f"seed{seed}" / task if out is not None else None
            with stages(f"seed {seed}: pretext {task}"):
                fitted = train_pretext(
                    task,
                    backbone,
                    splits.train_eval,
                    splits.val,
                    replace(pretext_config, seed=seed, quiet=quiet),
                    settings,
                    out_dir=task_dir,
                    resume=resume,
                    setting_names=PRETEXT_OPTION_NAMES,
                )
            fit.pretext[(task, seed)] = fitted
            if task_dir is not None and current_dist().is_main:
                save_checkpoint(
                    task_dir / BACKBONE_FILE,
                    {"model": backbone.state_dict(), "task": task, "backbone": model},
                )
            backbones.append((task, backbone))
        for name, backbone in backbones:
            with stages(f"seed {seed}: linear eval {name}"):
                features = extract_features(backbone, splits, eval_config)
                for f in fractions:
                    fit.evals[(name, seed, f)] = linear_eval(
                        backbone,
                        splits,
                        replace(eval_config, seed=seed, quiet=True),
                        labeled=subsets[f],
                        hidden=hidden,
                        balanced=balanced,
                        min_steps=min_steps,
                        features=features,
                        out_dir=_eval_dir(out, seed, name, f),
                        resume=resume,
                    )
        if scratch_baseline:
            for f in fractions:
                with stages(f"seed {seed}: supervised from scratch, {percent(f)} of the labels"):
                    fit.evals[(SUPERVISED, seed, f)] = train_scratch(
                        splits,
                        model,
                        replace(scratch_config, seed=seed, quiet=True),
                        labeled=subsets[f],
                        balanced=balanced,
                        min_steps=min_steps,
                        out_dir=_eval_dir(out, seed, SUPERVISED, f),
                        resume=resume,
                    )
        # Written after every seed: an interrupted study keeps the seeds it finished.
        fit.results = _results(fit, header, list(seeds[: seeds.index(seed) + 1]), stages.seconds)
        if out is not None:
            main = current_dist().is_main  # rank 0 alone writes under torchrun
            fit.results["plots"] = write_plots(fit.results, splits, settings, out) if main else []
            write_results(out, fit.results, started)
    return fit
