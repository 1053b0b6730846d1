"""Scalar arguments of the public ops as users hold them: NumPy ints and floats (an index from
``np.argmax``, a size from an array, a threshold from ``np.quantile``) give the same result as
Python numbers; bools and tensors are still refused, naming the argument."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import labelkit_ext as lk
from labelkit_ext.checks import check_seeds
from labelkit_ext.data import load_dataset
from labelkit_ext.engine import TrainConfig, fit, seed_everything
from labelkit_ext.methods.curriculum import CurriculumConfig
from labelkit_ext.models import build_model
from labelkit_ext.nn import AffineWarp
from labelkit_ext.ops._args import as_float, as_int, ints_where_possible


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _same(a, b) -> None:
    for x, y in zip(
        a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,), strict=True
    ):
        assert torch.equal(x, y)


def test_converters():
    assert as_int(np.int64(3)) == 3 and type(as_int(np.uint8(3))) is int
    assert as_int(7) == 7 and as_int(True) is None and as_int(np.True_) is None
    assert as_int(torch.tensor(3)) is None and as_int(3.0) is None and as_int("3") is None
    assert as_float(np.float32(0.5)) == 0.5 and type(as_float(np.int64(2))) is float
    assert as_float(False) is None and as_float(torch.tensor(1.0)) is None and as_float("1") is None
    assert ints_where_possible(np.int32(4), "x", None) == (4, "x", None)


def test_entropy_family_takes_numpy_scalars():
    x = _rand(5, 4) * 4
    _same(lk.softmax_entropy(x, np.int64(1), np.float64(2.0)), lk.softmax_entropy(x, 1, 2.0))
    gate = lk.entropy_gate(x, np.float32(1.25), torch.tensor([0, 1, 1, 0]), np.int64(2))
    ref = lk.entropy_gate(x, float(np.float32(1.25)), torch.tensor([0, 1, 1, 0]), 2)
    _same(tuple(gate), tuple(ref))
    _same(lk.max_entropy_loss(x, eps=np.float32(1e-3)), lk.max_entropy_loss(x, eps=1e-3))
    with pytest.raises(TypeError, match="threshold must be a number, got bool"):
        lk.entropy_gate(x, True)
    with pytest.raises(TypeError, match="dim must be an int, got Tensor"):
        lk.softmax_entropy(x, torch.tensor(1))


def test_affine_takes_numpy_sizes_and_warp_checks_as_the_op():
    x, theta = _rand(2, 1, 6, 7), torch.eye(2, 3).expand(2, 2, 3) * 0.9
    _same(
        lk.affine_grid_sample(x, theta, np.array([4, 5])), lk.affine_grid_sample(x, theta, (4, 5))
    )
    assert AffineWarp(size=tuple(np.array([4, 5]))).size == (4, 5)
    assert all(type(s) is int for s in AffineWarp(size=np.array([4, 5])).size)
    with pytest.raises(ValueError, match=r"AffineWarp: size must be None or \(Ho, Wo\), got 8"):
        AffineWarp(size=8)
    with pytest.raises(ValueError, match="AffineWarp: align_corners must be a bool, got 'yes'"):
        AffineWarp(align_corners="yes")
    with pytest.raises(ValueError, match="AffineWarp: size must hold two ints"):
        AffineWarp(size=(4.0, 5))
    with pytest.raises(ValueError, match="affine_grid_sample: size must hold two ints"):
        lk.affine_grid_sample(x, theta, (True, 5))


def test_pretext_ops_take_numpy_ints():
    x = _rand(2, 1, 12, 12)
    perms = lk.hamming_permutations(np.int64(3), np.int32(3), np.uint16(1))
    assert torch.equal(perms, lk.hamming_permutations(3, 3, 1))
    idx = torch.tensor([0, 2])
    _same(
        lk.jigsaw_tiles(x, idx, perms, np.int64(3), np.int64(3)),
        lk.jigsaw_tiles(x, idx, perms, 3, 3),
    )
    pos = torch.tensor([1, 6])
    _same(lk.context_pair(x, pos, np.int8(3), np.int64(2)), lk.context_pair(x, pos, 3, 2))
    with pytest.raises(ValueError, match="grid must be an int >= 2, got 3.0"):
        lk.jigsaw_tiles(x, idx, perms, 3.0)
    with pytest.raises(ValueError, match="n must be an int"):
        lk.hamming_permutations(np.float64(3))


def test_scoring_ops_take_numpy_ints_and_index_arrays():
    pool = _rand(30, 4)
    top = lk.cosine_topk(pool[:5], pool, np.int64(3), eps=np.float32(1e-6))
    _same(tuple(top), tuple(lk.cosine_topk(pool[:5], pool, 3, eps=float(np.float32(1e-6)))))
    ref = lk.kcenter_greedy(pool, 4, labeled=[2, 7])
    for labeled in (np.array([2, 7]), np.array([2, 7], dtype=np.int32), [np.int64(2), 7]):
        assert torch.equal(lk.kcenter_greedy(pool, np.int64(4), labeled=labeled), ref)
    mask = np.zeros(30, dtype=bool)
    mask[[2, 7]] = True
    assert torch.equal(lk.kcenter_greedy(pool, 4, labeled=mask), ref)
    probs = torch.softmax(_rand(30, 3, seed=1) * 3, 1)
    assert torch.equal(
        lk.badge_select(probs, pool, np.int64(5), seed=np.uint32(4)),
        lk.badge_select(probs, pool, 5, seed=4),
    )
    with pytest.raises(TypeError, match="k must be an int, got bool"):
        lk.cosine_topk(pool, pool, True)
    with pytest.raises(TypeError, match="labeled must be an int64 tensor"):
        lk.kcenter_greedy(pool, 4, labeled=np.array([2.0, 7.0]))


# ---- configs and methods: NumPy numbers become Python ones ----------------------------------------


def test_configs_store_numpy_numbers_as_python_ones(tmp_path):
    """A sweep over np.linspace / np.arange: the config holds Python numbers, so the checkpoint
    that pickles it reads back under weights_only (it was refused as 'not a plain tensor/weights
    file' at resume) and DataLoader takes the batch size."""
    config = TrainConfig(epochs=1, batch_size=np.int64(16), lr=np.linspace(0.01, 0.1, 3)[1],
                         seed=np.arange(3)[2], device="cpu", quiet=True)  # fmt: skip
    assert (type(config.batch_size), type(config.lr), type(config.seed)) == (int, float, int)
    assert config.lr == pytest.approx(0.055) and config.seed == 2
    splits = load_dataset("digits", image_size=np.int64(8))
    assert splits.info.image_size == 8 and type(splits.info.image_size) is int
    for resume in (False, True):
        torch.manual_seed(0)
        model = build_model("small-cnn", num_classes=10, in_channels=1, image_size=8)
        fit(model, splits.train, splits.val, "multiclass", config, out_dir=tmp_path, resume=resume)
    curriculum = CurriculumConfig(total_steps=60, eval_every=10, seeds=np.arange(2))
    assert curriculum.seeds == (0, 1) and all(type(s) is int for s in curriculum.seeds)
    assert check_seeds(np.array([3, 1])) == [3, 1] == check_seeds(torch.tensor([3, 1]))
    assert check_seeds(s for s in (2, 0)) == [2, 0] and check_seeds(range(2)) == [0, 1]
    with pytest.raises(TypeError, match="seeds must be a sequence of ints"):
        check_seeds("01")
    with pytest.raises(TypeError, match="seeds must be an int"):
        check_seeds([0, 1.5])
    with pytest.raises(ValueError, match="seeds must be distinct"):
        check_seeds(np.array([2, 2]))
    with pytest.raises(ValueError, match="at least one seed"):
        check_seeds(np.array([], dtype=np.int64))


def test_seed_everything_takes_numpy_ints():
    seed_everything(np.int64(3))
    a = torch.rand(2)
    seed_everything(3)
    assert torch.equal(a, torch.rand(2))
    with pytest.raises(TypeError):
        seed_everything(3.0)
