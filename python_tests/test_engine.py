"""Engine: metrics, config, devices, seeding, checkpoints, resume after an interruption, DDP."""

from __future__ import annotations

import argparse
import math
import os
import statistics
from dataclasses import replace

import numpy as np
import pytest
import torch
from ddp_helpers import spawn
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler, TensorDataset

from labelkit_ext.data import load_dataset
from labelkit_ext.engine import (
    LAST_CHECKPOINT,
    DistInfo,
    TrainConfig,
    amp_dtype,
    build_scheduler,
    classification_metrics,
    fit,
    format_table,
    grad_scaler,
    load_checkpoint,
    loader_over,
    mean_std,
    on_main,
    plus_minus,
    predict,
    progress_bar,
    save_checkpoint,
    seed_everything,
    select_device,
    shuffle_epoch,
    shuffled_loader,
    to_jsonable,
    topk_accuracy,
)
from labelkit_ext.errors import UsageError
from labelkit_ext.models import build_model

TINY = {"batch_size": 64, "device": "cpu", "quiet": True}


@pytest.fixture(scope="module")
def digits8():
    return load_dataset("digits", image_size=8)


def _model(seed: int = 0) -> torch.nn.Module:
    seed_everything(seed)
    return build_model("small-cnn", 10, 1, image_size=8, width=8)


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# -- metrics ----------------------------------------------------------------------------------


def test_multiclass_metrics_by_hand():
    scores = np.array([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    targets = np.array([0, 2, 2, 1])
    m = classification_metrics(scores, targets, "multiclass", ["a", "b", "c"], topk=(2, 5))
    assert m["accuracy"] == 0.5 and m["top2_accuracy"] == 1.0 and "top5_accuracy" not in m
    assert m["confusion_matrix"] == [[1, 0, 0], [1, 0, 0], [0, 1, 1]]
    assert m["per_class_accuracy"] == {"a": 1.0, "b": 0.0, "c": 0.5}
    assert m["auc"] == pytest.approx(roc_auc_score(targets, scores, multi_class="ovr"))
    assert m["per_class_auc"]["a"] == pytest.approx(roc_auc_score(targets == 0, scores[:, 0]))
    assert m["n"] == 4


def test_binary_auc_is_the_usual_one_and_undefined_auc_is_none():
    rng = np.random.default_rng(0)
    p1 = rng.random(50)
    y = (rng.random(50) < p1).astype(int)
    m = classification_metrics(np.stack([1 - p1, p1], 1), y, "multiclass")
    assert m["auc"] == pytest.approx(roc_auc_score(y, p1))
    absent = classification_metrics(
        np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0]]), np.array([0, 1]), "multiclass"
    )
    assert absent["per_class_auc"]["2"] is None and absent["auc"] == 1.0


def test_multilabel_metrics():
    scores = np.array([[0.9, 0.2], [0.4, 0.7], [0.6, 0.1], [0.1, 0.3]])
    targets = np.array([[1, 0], [0, 1], [0, 0], [0, 1]])
    m = classification_metrics(scores, targets, "multilabel", ["x", "y"])
    assert m["accuracy"] == pytest.approx(6 / 8) and m["exact_match"] == 0.5
    assert m["per_class_auc"]["x"] == pytest.approx(roc_auc_score(targets[:, 0], scores[:, 0]))
    assert m["auc"] == pytest.approx(
        np.mean([roc_auc_score(targets[:, k], scores[:, k]) for k in range(2)])
    )
    with pytest.raises(ValueError, match="multilabel targets"):
        classification_metrics(scores, targets[:, :1], "multilabel")
    with pytest.raises(ValueError, match="task"):
        classification_metrics(scores, targets, "regression")


def test_report_helpers():
    assert to_jsonable({"a": float("nan"), "b": torch.tensor([1, 2]), "c": np.float32(0.5)}) == {
        "a": None,
        "b": [1, 2],
        "c": 0.5,
    }
    table = format_table([["val", 10, 0.5, None]], ["split", "n", "auc", "top5"])
    assert table.splitlines()[2] == "val    10  0.5000     -"


def test_mean_std_is_the_sample_std_over_the_defined_values():
    assert mean_std([0.5, None, 0.7, 0.9]) == pytest.approx(
        (0.7, statistics.stdev([0.5, 0.7, 0.9]))
    )
    assert mean_std([0.8]) == (0.8, None)  # one seed measures no spread: none, not 0
    assert mean_std([None]) == (None, None) and mean_std([]) == (None, None)
    assert plus_minus(0.8612, 0.0021, scale=100) == "86.12 ± 0.21"
    assert plus_minus(0.8612, None, digits=3) == "0.861" and plus_minus(None, None) == "-"


# -- config, devices, seeding -----------------------------------------------------------------


def test_config_is_validated():
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lbfgs")
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0)
    for name in ("lr", "weight_decay"):  # the optimisers' float32 arithmetic overflows
        with pytest.raises(UsageError, match=rf"{name} must be at most 3\.403e\+38 \(float32\)"):
            TrainConfig(**{name: 1e39})
        TrainConfig(**{name: 3e38})
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    step = build_scheduler(optimizer, TrainConfig(scheduler="step", step_size=2, gamma=0.5))
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        step.step()
    assert lrs == [1.0, 1.0, 0.5, 0.5]


@pytest.mark.parametrize("name", ["lr", "momentum", "weight_decay", "gamma"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_config_refuses_non_finite_floats(name, value):
    with pytest.raises(UsageError, match=rf"{name} must be a finite number"):
        TrainConfig(**{name: value})


def test_config_refuses_momentum_of_one_or_more_and_unknown_devices():
    assert TrainConfig(momentum=0.99).momentum == 0.99
    for momentum in (1.0, 1.5):
        with pytest.raises(UsageError, match="momentum must be < 1"):
            TrainConfig(momentum=momentum)
    assert [TrainConfig(device=d).device for d in ("auto", "cpu", "cuda", "cuda:1")]
    for device in ("gpu", "cuda:x", "cuda:-1", "cuda:", "CPU", " cpu"):
        with pytest.raises(UsageError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"):
            TrainConfig(device=device)


def test_a_diverging_run_stops_with_what_to_change(digits8):
    config = TrainConfig(epochs=3, lr=1e30, **TINY)
    with pytest.raises(
        UsageError, match=r"diverged in epoch 1: .* loss is nan; lower the learning"
    ):
        fit(_model(), digits8.train, digits8.val, "multiclass", config)


def test_metrics_of_non_finite_scores_are_a_clear_error():
    scores = np.full((4, 3), 1 / 3)
    scores[2, 1] = np.nan
    with pytest.raises(UsageError, match="NaN/inf in 1 of 4 rows"):
        classification_metrics(scores, np.array([0, 1, 2, 0]), "multiclass")


def test_config_keeps_seeds_in_numpys_range():
    assert TrainConfig(seed=2**32 - 1).seed == 2**32 - 1
    for seed in (-1, 2**32):
        with pytest.raises(UsageError, match=r"seed must be in \[0, 2\*\*32\)"):
            TrainConfig(seed=seed)


def test_config_fields_of_the_wrong_type_name_the_field():
    """Not "'<' not supported between 'str' and 'int'": the field and what it got."""
    with pytest.raises(TypeError, match=r"epochs must be an int, got '5' \(str\)"):
        TrainConfig(epochs="5")
    with pytest.raises(TypeError, match="lr must be a number"):
        TrainConfig(lr="0.1")
    with pytest.raises(TypeError, match="batch_size must be an int"):
        TrainConfig(batch_size=32.0)
    assert TrainConfig(lr=1).lr == 1  # an int is a fine float


def test_device_selection():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device must be"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            select_device("cuda")


def test_a_bare_cuda_is_this_ranks_gpu_under_torchrun(monkeypatch):
    """Every caller (methods' own loops too) gets cuda:<LOCAL_RANK> without passing it."""
    import labelkit_ext.engine.device as device_module
    from labelkit_ext.engine import DistInfo

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert select_device("cuda") == torch.device("cuda:0")
    monkeypatch.setattr(device_module, "current_dist", lambda: DistInfo(1, 2, 1))
    assert select_device("cuda") == torch.device("cuda:1")
    assert select_device("auto") == torch.device("cuda:1")
    assert select_device("cuda", local_rank=0) == torch.device("cuda:0")
    assert select_device("cuda:0") == torch.device("cuda:0")


def test_same_seed_same_run(digits8):
    config = TrainConfig(epochs=1, **TINY)
    a = fit(_model(), digits8.train, None, "multiclass", config).model.state_dict()
    b = fit(_model(), digits8.train, None, "multiclass", config).model.state_dict()
    _assert_same_state(a, b)
    c = fit(_model(), digits8.train, None, "multiclass", TrainConfig(epochs=1, seed=1, **TINY))
    assert not torch.equal(a["classifier.weight"], c.model.state_dict()["classifier.weight"])


def test_a_last_batch_of_one_sample_is_dropped(digits8):
    """BatchNorm cannot train on one sample: a training set of batch_size + 1 images (a pretext
    linear evaluation at a 10 % label fraction gave one) trains on the full batch only."""
    n = TINY["batch_size"] + 1
    subset = torch.utils.data.Subset(digits8.train, range(n))
    model = _model()
    model.classifier = torch.nn.Sequential(
        torch.nn.BatchNorm1d(model.classifier.in_features), model.classifier
    )
    result = fit(model, subset, None, "multiclass", TrainConfig(epochs=1, **TINY))
    assert len(result.history) == 1


def _batches(loader) -> list[tuple[torch.Tensor, ...]]:
    return [tuple(batch) for batch in loader]


@pytest.mark.parametrize("rank", [None, 1])
@pytest.mark.parametrize("subset", [False, True])
def test_tensor_datasets_are_indexed_a_batch_at_a_time_in_the_usual_order(
    subset, rank, monkeypatch
):
    """Precomputed features (a TensorDataset, or a Subset of one) are fetched with one index
    per batch, in the order and batches a per-sample DataLoader gives: shuffled by the
    generator (reseeded per epoch) or by a rank's DistributedSampler, the last one dropped."""
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(81, 3, generator=g), torch.arange(81))
    indexed = []
    plain_getitem = torch.utils.data.TensorDataset.__getitem__

    def counting_getitem(self, index):
        indexed.append(index)
        return plain_getitem(self, index)

    monkeypatch.setattr(torch.utils.data.TensorDataset, "__getitem__", counting_getitem)
    dataset = torch.utils.data.Subset(data, range(1, 81, 2)) if subset else data
    info = DistInfo(rank, 2) if rank is not None else DistInfo()
    ours = shuffled_loader(dataset, info, seed=7, batch_size=6, drop_last=True)
    if rank is None:
        plain = DataLoader(
            dataset, batch_size=6, drop_last=True, shuffle=True, generator=torch.Generator()
        )
    else:
        sampler = DistributedSampler(dataset, 2, rank, shuffle=True, seed=7)
        plain = DataLoader(dataset, batch_size=6, drop_last=True, sampler=sampler)
    for epoch in (0, 1):
        shuffle_epoch(ours, 7, epoch)
        shuffle_epoch(plain, 7, epoch)
        indexed.clear()
        got = _batches(ours)
        assert len(indexed) == len(got) == len(ours) > 1
        want = _batches(plain)
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    ordered = loader_over(dataset, SequentialSampler(dataset), batch_size=6)
    assert torch.equal(torch.cat([t for t, _ in ordered]), torch.stack([x for x, _ in dataset]))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_progress_bar_runs_one_pass_of_its_loader_in_the_loaders_order(workers, monkeypatch):
    """tqdm.auto calls iter() on what it wraps as it is built: handed the loader itself, every
    epoch started its workers twice, and its order followed an extra draw from the generator,
    so it changed with the number of workers."""
    passes = []
    plain_iter = DataLoader.__iter__

    def counting_iter(self):
        passes.append(1)
        return plain_iter(self)

    monkeypatch.setattr(DataLoader, "__iter__", counting_iter)
    dataset = torch.utils.data.TensorDataset(torch.arange(20.0))
    loader = shuffled_loader(dataset, DistInfo(), seed=3, batch_size=4, num_workers=workers)
    shuffle_epoch(loader, 3, 0)
    want = torch.cat([x for (x,) in loader])
    for shown in (False, True):
        shuffle_epoch(loader, 3, 0)
        passes.clear()
        got = torch.cat([x for (x,) in progress_bar(loader, "test", shown)])
        assert len(passes) == 1
        assert torch.equal(got, want)


class _PerSampleTensors(torch.utils.data.TensorDataset):
    """A TensorDataset subclass that transforms one sample at a time (an int index only)."""

    def __getitem__(self, index: int):
        x, y = super().__getitem__(index)
        return x.flip(0), int(y)


def test_tensor_dataset_subclasses_are_indexed_a_sample_at_a_time():
    data = _PerSampleTensors(torch.randn(10, 3), torch.arange(10))
    for dataset in (data, torch.utils.data.Subset(data, range(7))):
        loader = loader_over(dataset, SequentialSampler(dataset), batch_size=4)
        batches = list(loader)
        assert [len(y) for _, y in batches] == ([4, 4, 2] if dataset is data else [4, 3])
        assert torch.equal(batches[0][0][1], data.tensors[0][1].flip(0))


# -- checkpoints and resume -------------------------------------------------------------------


def test_checkpoint_roundtrip_is_atomic_and_weights_only(tmp_path):
    model = _model()
    path = save_checkpoint(
        tmp_path / "ck.pt", {"epoch": 3, "model": model.state_dict(), "history": [{"loss": 0.5}]}
    )
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temp file left behind
    state = load_checkpoint(path)
    assert state["epoch"] == 3 and state["history"] == [{"loss": 0.5}]
    _assert_same_state(state["model"], model.state_dict())

    # Anything but plain data (here an arbitrary class instance) is refused at load.
    torch.save({"format_version": 1, "x": argparse.Namespace(a=1)}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="weights_only"):
        load_checkpoint(tmp_path / "evil.pt")
    torch.save({"model": {}}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a labelkit checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")


class _Interrupt(Exception):
    pass


def _stop_after(epoch: int):
    def callback(end) -> None:
        if end.epoch == epoch:
            raise _Interrupt

    return callback


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, digits8):
    config = TrainConfig(epochs=3, **TINY)
    full = fit(
        _model(), digits8.train, digits8.val, "multiclass", config, out_dir=tmp_path / "full"
    )
    with pytest.raises(_Interrupt):
        fit(
            _model(),
            digits8.train,
            digits8.val,
            "multiclass",
            config,
            out_dir=tmp_path / "cut",
            callbacks=[_stop_after(1)],
        )
    assert load_checkpoint(tmp_path / "cut" / LAST_CHECKPOINT)["epoch"] == 1
    # A fresh process would build the model from another seed: the checkpoint must decide.
    resumed = fit(
        _model(seed=123),
        digits8.train,
        digits8.val,
        "multiclass",
        config,
        out_dir=tmp_path / "cut",
        resume=True,
    )
    assert resumed.resumed_from == 1 and [r["epoch"] for r in resumed.history] == [1, 2, 3]
    _assert_same_state(resumed.model.state_dict(), full.model.state_dict())
    assert resumed.history[-1]["val_loss"] == full.history[-1]["val_loss"]


def test_resume_refuses_other_settings_and_starts_fresh_without_checkpoint(tmp_path, digits8):
    config = TrainConfig(epochs=1, **TINY)
    fresh = fit(_model(), digits8.train, None, "multiclass", config, out_dir=tmp_path, resume=True)
    assert fresh.resumed_from == 0
    with pytest.raises(ValueError, match=r"lr=0\.05 -> 0\.1"):
        fit(
            _model(),
            digits8.train,
            None,
            "multiclass",
            TrainConfig(epochs=1, lr=0.1, **TINY),
            out_dir=tmp_path,
            resume=True,
        )


@pytest.mark.parametrize(("capability", "dtype"), [((7, 5), torch.float16), ((7, 0), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])  # fmt: skip
def test_amp_dtype_is_bfloat16_only_where_the_gpu_computes_it(monkeypatch, capability, dtype):
    """T4 (7.5) and V100 (7.0) only emulate bfloat16 (torch.cuda.is_bf16_supported() still
    says yes): float16 there, with loss scaling; asked of the device given, not the current."""
    asked = []
    monkeypatch.setattr(
        torch.cuda, "get_device_capability", lambda d: asked.append(d) or capability
    )
    device = torch.device("cuda:1")
    assert amp_dtype(device) == dtype and asked == [device]
    assert not grad_scaler(torch.device("cpu"), True).is_enabled()  # CPU runs stay float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_float16_autocast_with_loss_scaling_trains_on_a_gpu(digits8, monkeypatch):
    """What a T4 or V100 runs (float16 autocast + GradScaler), forced on the GPU at hand."""
    import labelkit_ext.engine.loops as loops

    monkeypatch.setattr(loops, "amp_dtype", lambda device: torch.float16)
    assert loops.grad_scaler(torch.device("cuda"), True).is_enabled()
    config = TrainConfig(epochs=3, batch_size=64, device="cuda", quiet=True)
    result = fit(_model(), digits8.train, digits8.val, "multiclass", config)
    losses = [r["train_loss"] for r in result.history]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert result.history[-1]["val_accuracy"] > 0.5


def test_loss_scaling_trains_the_float32_weights_and_is_checkpointed(
    tmp_path, digits8, forced_loss_scaling
):
    """fit's float16 path (GradScaler) on CPU: scale, unscale and step are wired right."""
    import labelkit_ext.engine.loops as loops

    config = TrainConfig(epochs=2, **TINY)
    plain = fit(_model(), digits8.train, None, "multiclass", config)
    scalers = forced_loss_scaling(loops)
    scaled = fit(_model(), digits8.train, None, "multiclass", config, out_dir=tmp_path)
    _assert_same_state(scaled.model.state_dict(), plain.model.state_dict())
    steps = 2 * math.ceil(len(digits8.train) / 64)
    assert scalers[0].get_scale() == 2.0 ** (8 + steps)
    saved = load_checkpoint(tmp_path / LAST_CHECKPOINT)["scaler"]
    assert saved["scale"] == 2.0 ** (8 + steps)

    def stop_after_first(end):
        if end.epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # a resumed run goes on from the saved scale
        fit(_model(), digits8.train, None, "multiclass", config, out_dir=tmp_path / "cut",
            callbacks=[stop_after_first])  # fmt: skip
    resumed = fit(_model(), digits8.train, None, "multiclass", config, out_dir=tmp_path / "cut",
                  resume=True)  # fmt: skip
    assert resumed.resumed_from == 1 and scalers[-1].get_scale() == 2.0 ** (8 + steps)
    _assert_same_state(resumed.model.state_dict(), plain.model.state_dict())


def test_checkpoint_seconds_writes_fewer_checkpoints_and_always_the_last(
    tmp_path, digits8, monkeypatch
):
    import labelkit_ext.engine.loops as loops

    written = []
    save = loops.save_checkpoint
    monkeypatch.setattr(
        loops, "save_checkpoint", lambda f, s: written.append(s["epoch"]) or save(f, s)
    )
    config = TrainConfig(epochs=3, **TINY)
    fit(_model(), digits8.train, None, "multiclass", config, out_dir=tmp_path / "every")
    assert written == [1, 2, 3]
    written.clear()
    fit(_model(), digits8.train, None, "multiclass", config, out_dir=tmp_path / "last",
        checkpoint_seconds=3600)  # fmt: skip
    assert written == [3]
    assert load_checkpoint(tmp_path / "last" / LAST_CHECKPOINT)["epoch"] == 3
    for bad in (-1, float("nan"), float("inf"), "10"):
        with pytest.raises(ValueError, match="checkpoint_seconds must be a finite number >= 0"):
            fit(_model(), digits8.train, None, "multiclass", config, checkpoint_seconds=bad)


def _interrupted_after_one_epoch(digits8, out_dir) -> TrainConfig:
    """A 2-epoch run stopped (Ctrl-C) after epoch 1's checkpoint; returns its config."""
    config = TrainConfig(epochs=2, **TINY)

    def stop_after_first(end):
        if end.epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(_model(), digits8.train, None, "multiclass", config, out_dir=out_dir,
            callbacks=[stop_after_first])  # fmt: skip
    return config


def test_resume_refuses_another_worker_count(tmp_path, digits8):
    """Workers draw the augmentation from their own streams: 1 worker is another run than 0,
    unless the checkpoint is finished (nothing left to train)."""
    config = _interrupted_after_one_epoch(digits8, tmp_path)
    one_worker = replace(config, num_workers=1)
    with pytest.raises(ValueError, match=r"num_workers=0 -> 1"):
        fit(_model(), digits8.train, None, "multiclass", one_worker, out_dir=tmp_path,
            resume=True)  # fmt: skip
    fit(_model(), digits8.train, None, "multiclass", config, out_dir=tmp_path, resume=True)
    done = fit(_model(), digits8.train, None, "multiclass", one_worker, out_dir=tmp_path,
               resume=True)  # fmt: skip
    assert done.resumed_from == 2


def _as_if_trained_by(checkpoint, world_size: int) -> None:
    """Rewrite a checkpoint as one written under torchrun with ``world_size`` processes."""
    state = load_checkpoint(checkpoint)
    assert state["run"]["world_size"] == 1
    state["run"]["world_size"] = world_size
    save_checkpoint(checkpoint, state)


def test_resume_refuses_another_process_count_until_finished(tmp_path, digits8):
    """batch_size is per process: resumed under another torchrun count, a run continued on
    another global batch (a different trajectory, silently); a finished one trains no further."""
    config = _interrupted_after_one_epoch(digits8, tmp_path)
    _as_if_trained_by(tmp_path / "checkpoint_last.pt", 2)
    with pytest.raises(UsageError, match=r"processes \(torchrun --nproc_per_node\)=2 -> 1"):
        fit(_model(), digits8.train, None, "multiclass", config, out_dir=tmp_path, resume=True)
    fit(_model(), digits8.train, None, "multiclass", config, out_dir=tmp_path / "done")
    _as_if_trained_by(tmp_path / "done" / "checkpoint_last.pt", 2)
    done = fit(_model(), digits8.train, None, "multiclass", config, out_dir=tmp_path / "done",
               resume=True)  # fmt: skip
    assert done.resumed_from == 2


def test_resume_refuses_other_data_or_model_and_checkpoints_without_settings(tmp_path, digits8):
    """Settings alike, but another data set (size), image size or architecture: a clean refusal,
    not a run continuing from foreign weights or a load_state_dict traceback."""
    config = TrainConfig(epochs=1, **TINY)
    fit(_model(), digits8.train, digits8.val, "multiclass", config, out_dir=tmp_path)
    fewer = torch.utils.data.Subset(digits8.train, range(len(digits8.train) - 5))
    with pytest.raises(
        UsageError,
        match=r"other settings or data \(train_samples=\d+ -> \d+, other training samples or",
    ):
        fit(_model(), fewer, digits8.val, "multiclass", config, out_dir=tmp_path, resume=True)
    larger = load_dataset("digits", image_size=12)
    with pytest.raises(UsageError, match=r"input_shape=\[1, 8, 8\] -> \[1, 12, 12\]"):
        model = build_model("small-cnn", 10, in_channels=1, image_size=12)
        fit(model, larger.train, larger.val, "multiclass", config, out_dir=tmp_path, resume=True)

    def resume(model):
        return fit(model, digits8.train, digits8.val, "multiclass", config, out_dir=tmp_path,
                   resume=True)  # fmt: skip

    wider = build_model("small-cnn", 10, in_channels=1, image_size=8, width=16)
    with pytest.raises(UsageError, match=r"model tensors differ: other shapes for features\.0\.w"):
        resume(wider)
    counting = _model()
    counting.register_buffer("steps", torch.zeros((), dtype=torch.int64))  # a newer model version
    with pytest.raises(UsageError, match=r"model tensors differ: the checkpoint lacks steps\)"):
        resume(counting)
    state = load_checkpoint(tmp_path / "checkpoint_last.pt")
    del state["config"]
    save_checkpoint(tmp_path / "checkpoint_last.pt", state)
    with pytest.raises(UsageError, match="holds no training settings"):
        resume(_model())


def test_resume_refuses_another_split_augmentation_or_caller_identity(tmp_path, digits8):
    """A finished run resumed on another split (same sizes) would score its weights on images
    they were trained on; without augmentation, or with another caller fact, it is another
    run. The same data loaded again resumes."""
    config = TrainConfig(epochs=1, **TINY)
    fit(_model(), digits8.train, digits8.val, "multiclass", config, out_dir=tmp_path,
        identity={"mix": 0.5})  # fmt: skip

    def resume(splits, identity=None):
        return fit(_model(), splits.train, splits.val, "multiclass", config, out_dir=tmp_path,
                   resume=True, identity=identity or {"mix": 0.5})  # fmt: skip

    other_split = load_dataset("digits", image_size=8, split_seed=5)
    assert len(other_split.train) == len(digits8.train)
    with pytest.raises(UsageError, match=r"\(other training samples or order \(another "
                       r"--split-seed or data set\?\)\)"):  # fmt: skip
        resume(other_split)
    plain = load_dataset("digits", image_size=8, augment=False)
    with pytest.raises(UsageError, match=r"training transform ImageTransform\(padding=1, "
                       r"flip=False\) -> ImageTransform\(padding=None, flip=False\)"):  # fmt: skip
        resume(plain)
    with pytest.raises(UsageError, match=r"\(mix=0\.5 -> 1\.0\)"):
        resume(digits8, {"mix": 1.0})
    again = resume(load_dataset("digits", image_size=8))
    assert again.resumed_from == 1


class _ItemsOnly(torch.utils.data.Dataset):
    """A user's dataset with neither ``targets`` nor ``fingerprint()``."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        self.images, self.labels = images, targets

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


def test_resume_checks_the_targets_of_a_users_own_dataset(tmp_path, digits8):
    """A TensorDataset (or anything with ``targets``) is fingerprinted by its targets: other
    labels of the same size are refused (they resumed silently). A dataset with neither targets
    nor fingerprint() resumes with a warning that nothing was checked."""
    images, targets = digits8.train.images[:64].float() / 255, digits8.train.targets[:64]
    config = TrainConfig(epochs=1, **TINY)

    def run(dataset, out, resume=False):
        return fit(_model(), dataset, None, "multiclass", config, out_dir=out, resume=resume)

    run(TensorDataset(images, targets), tmp_path / "tensors")
    shuffled = targets[torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    with pytest.raises(UsageError, match=r"other training samples or order"):
        run(TensorDataset(images, shuffled), tmp_path / "tensors", resume=True)
    assert run(TensorDataset(images, targets), tmp_path / "tensors", resume=True).resumed_from == 1
    run(_ItemsOnly(images, targets), tmp_path / "items")
    with pytest.warns(UserWarning, match="without knowing whether all of the training data are"):
        run(_ItemsOnly(images, shuffled), tmp_path / "items", resume=True)


def test_resume_of_a_checkpoint_that_recorded_no_data_digest_warns(tmp_path, digits8, monkeypatch):
    """A TensorDataset's checkpoint from before the engine digested its targets recorded None:
    resuming it is allowed with a warning (it was refused as 'other training samples')."""
    from labelkit_ext.engine import loops

    dataset = TensorDataset(digits8.train.images[:32].float() / 255, digits8.train.targets[:32])
    config = TrainConfig(epochs=1, **TINY)
    with monkeypatch.context() as patch:
        patch.setattr(loops, "data_fingerprint", lambda dataset: None)
        fit(_model(), dataset, None, "multiclass", config, out_dir=tmp_path)
    with pytest.warns(UserWarning, match="now, or when the checkpoint was written"):
        again = fit(_model(), dataset, None, "multiclass", config, out_dir=tmp_path, resume=True)
    assert again.resumed_from == 1


def test_fit_refuses_targets_the_loss_cannot_take_before_training(digits8):
    """A class id past the model's outputs, float class ids, or integer multi-hot rows failed
    mid-epoch inside the loss ("Target 3 is out of bounds", a dtype error)."""
    images = digits8.train.images[:16].float() / 255
    config = TrainConfig(epochs=1, **TINY)
    model = _model()  # 10 outputs
    cases = [
        ("multiclass", torch.full((16,), 10), r"train_set: targets must be classes in \[0, 10\)"
                                              r" for a model of 10 outputs, got values in \[10, 10\]"),
        ("multiclass", torch.zeros(16), "one int64 class per sample .* got torch.float32"),
        ("multiclass", torch.zeros(16, dtype=torch.int32), r"got torch.int32 of shape \(16,\) \(.long\(\)\)"),
        ("multilabel", torch.zeros(16, 10, dtype=torch.int64), r"float rows of 10 labels, got "
                                                                r"torch.int64 of shape \(16, 10\)"),
        ("multilabel", torch.zeros(16, 3), r"float rows of 10 labels, got torch.float32 of shape"),
    ]  # fmt: skip
    for task, targets, message in cases:
        with pytest.raises(UsageError, match=message):
            fit(model, TensorDataset(images, targets), None, task, config)
    bad_val = TensorDataset(images, torch.full((16,), -1))
    with pytest.raises(UsageError, match=r"val_set: targets must be classes in \[0, 10\)"):
        fit(model, TensorDataset(images, torch.zeros(16, dtype=torch.int64)), bad_val, "multiclass",
            config)  # fmt: skip


# -- DDP on 2 gloo processes ------------------------------------------------------------------


def _ddp_worker(rank: int, out_dir: str) -> None:
    splits = load_dataset("digits", image_size=8)
    result = fit(
        _model(),
        splits.train,
        splits.val,
        "multiclass",
        TrainConfig(epochs=2, **TINY),
        out_dir=out_dir,
    )
    pred = predict(result.model, splits.test, result.device)
    torch.save(
        {"state": result.model.state_dict(), "logits": pred.logits, "history": result.history},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


def test_ddp_two_gloo_processes(tmp_path, digits8):
    spawn(_ddp_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    _assert_same_state(ranks[0]["state"], ranks[1]["state"])  # parameters and BN buffers in sync
    for a, b in zip(ranks[0]["history"], ranks[1]["history"], strict=True):  # reduced over ranks
        assert {k: v for k, v in a.items() if k != "seconds"} == {
            k: v for k, v in b.items() if k != "seconds"
        }
    # Rank 0's checkpoint holds that model, and the sharded predictions are the full test set.
    checkpoint = load_checkpoint(tmp_path / LAST_CHECKPOINT)
    _assert_same_state(checkpoint["model"], ranks[0]["state"])
    model = _model()
    model.load_state_dict(checkpoint["model"])
    single = predict(model, digits8.test, torch.device("cpu"))
    assert ranks[0]["logits"].shape == (360, 10)
    torch.testing.assert_close(ranks[0]["logits"], single.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ranks[1]["logits"], single.logits, rtol=1e-5, atol=1e-5)


class _Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("not picklable")


def _on_main_worker(rank: int, out_dir: str) -> None:
    calls: list[int] = []
    seen: dict = {}

    def value() -> dict:
        calls.append(rank)
        return {"rank": rank, "rows": [3, 1, 2]}

    seen["value"] = on_main(value)
    for name, error in (("usage", UsageError("bad --rounds")), ("odd", _Unpicklable("odd"))):

        def fail(error=error):
            raise error

        try:
            on_main(fail)
        except Exception as raised:  # what every rank sees
            seen[name] = (type(raised).__name__, str(raised))
    seen["after"] = on_main(lambda: rank)  # the group still works after the errors
    seen["calls"] = calls
    torch.save(seen, os.path.join(out_dir, f"on_main{rank}.pt"))


def test_on_main_runs_once_and_hands_result_and_errors_to_every_rank(tmp_path):
    assert on_main(lambda: 7) == 7  # one process: just the call
    spawn(_on_main_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"on_main{r}.pt", weights_only=False) for r in range(2)]
    for r, seen in enumerate(ranks):
        assert seen["value"] == {"rank": 0, "rows": [3, 1, 2]}
        assert seen["calls"] == ([0] if r == 0 else [])
        assert seen["usage"] == ("UsageError", "bad --rounds")
        assert seen["after"] == 0
    assert ranks[0]["odd"] == ("_Unpicklable", "odd")  # rank 0 raises the original
    assert ranks[1]["odd"] == ("RuntimeError", "_Unpicklable on rank 0: odd")


def test_topk_accuracy_agrees_with_scikit_learn_from_three_classes():
    from sklearn.metrics import top_k_accuracy_score

    rng = np.random.default_rng(0)
    for classes in (3, 5, 10):
        scores = rng.random((200, classes))
        targets = rng.integers(0, classes, 200)
        for k in range(1, classes):
            ours = topk_accuracy(scores, targets, k)
            theirs = top_k_accuracy_score(targets, scores, k=k, labels=np.arange(classes))
            assert ours == pytest.approx(theirs)
    # Two columns: ranked, not thresholded (scikit-learn's binary path would threshold).
    assert topk_accuracy(np.array([[0.2, 0.3], [0.9, 0.95]]), np.array([1, 1]), 1) == 1.0
