"""Self-supervised pretext method: the labels of every pretext batch against slow oracles
(rotate back, re-order tiles, neighbour positions by name), the contrastive pieces, the frozen
backbone in linear evaluation, label fractions, and a tiny run end to end through the CLI."""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from ddp_helpers import spawn, torchrun_labelkit
from fixtures_data import write_medmnist
from torchvision.transforms.v2 import functional as TF

from labelkit_ext import hamming_permutations
from labelkit_ext.cli import main
from labelkit_ext.data import load_dataset
from labelkit_ext.engine import (
    LAST_CHECKPOINT,
    TrainConfig,
    fit,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
)
from labelkit_ext.errors import UsageError
from labelkit_ext.methods.pretext import (
    PretextSettings,
    build_backbone,
    build_pretext_net,
    contrastive_views,
    default_tile_size,
    epochs_for,
    eval_head,
    extract_features,
    label_fraction_indices,
    linear_eval,
    make_batch,
    nt_xent,
    run_study,
    train_pretext,
    warp_views,
)
from labelkit_ext.methods.pretext.networks import LinearEvalModel
from labelkit_ext.methods.pretext.report import CONTEXT_POSITIONS
from labelkit_ext.methods.pretext.tasks import sample_view_params
from labelkit_ext.models import build_model, load_pretrained

CPU = {"device": "cpu", "quiet": True}
# The eight neighbours by name -> (row, column) step from the center cell.
STEPS = {"top": (-1, 0), "bottom": (1, 0), "left": (0, -1), "right": (0, 1)}


@pytest.fixture(scope="module")
def tiny_splits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("medmnist")
    write_medmnist(folder / "pneumoniamnist.npz", sizes=(48, 12, 16))
    return load_dataset("pneumoniamnist", folder, augment=False)


def _images(n: int = 6, size: int = 28, channels: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _cell_crop(image: torch.Tensor, row: int, col: int, cell: int, tile: int) -> torch.Tensor:
    """The centred ``tile`` crop of cell (row, col): a slow, obvious slice."""
    top, left = row * cell + (cell - tile) // 2, col * cell + (cell - tile) // 2
    return image[:, top : top + tile, left : left + tile]


def _step(name: str) -> tuple[int, int]:
    dr = sum(STEPS[p][0] for p in name.split("-") if p in STEPS)
    dc = sum(STEPS[p][1] for p in name.split("-") if p in STEPS)
    return dr, dc


# -- pretext batches: labels are right ---------------------------------------------------------


@pytest.mark.parametrize("all_rotations", [False, True])
def test_rotation_batch_rotated_back_equals_the_original(all_rotations):
    images = _images(8)
    settings = PretextSettings(all_rotations=all_rotations)
    batch = make_batch("rotation", images, settings, torch.Generator().manual_seed(3))
    source = images.repeat_interleave(4, 0) if all_rotations else images
    assert batch.num_classes == 4 and batch.inputs.shape == source.shape
    assert set(batch.labels.tolist()) <= {0, 1, 2, 3}
    for x, k, original in zip(batch.inputs, batch.labels.tolist(), source, strict=True):
        assert torch.equal(torch.rot90(x, -k, dims=(-2, -1)), original)
    if not all_rotations:
        assert len(set(batch.labels.tolist())) > 1  # labels really vary


@pytest.mark.parametrize(("size", "channels"), [(28, 1), (33, 3)])
def test_jigsaw_tiles_reordered_by_the_inverse_permutation_reassemble_the_cells(size, channels):
    images = _images(5, size, channels)
    settings = PretextSettings(jitter=False, normalize_tiles=False, num_permutations=30)
    grid, cell = settings.grid, size // settings.grid
    tile = settings.tile_for(size)
    batch = make_batch("jigsaw", images, settings, torch.Generator().manual_seed(1))
    perms = hamming_permutations(30, grid)  # the independent call: same set
    assert batch.num_classes == 30 and batch.inputs.shape == (5, 9, channels, tile, tile)
    for n, label in enumerate(batch.labels.tolist()):
        inverse = perms[label].argsort()
        ordered = batch.inputs[n][inverse]  # slot order -> cell order
        for c in range(grid * grid):
            assert torch.equal(ordered[c], _cell_crop(images[n], c // grid, c % grid, cell, tile))


def test_jigsaw_tiles_of_whole_cells_reassemble_the_image():
    images = _images(3, 27)
    settings = PretextSettings(jitter=False, normalize_tiles=False, tile_size=9)
    batch = make_batch("jigsaw", images, settings, torch.Generator().manual_seed(2))
    perms = hamming_permutations(100, 3)
    for n, label in enumerate(batch.labels.tolist()):
        cells = batch.inputs[n][perms[label].argsort()]  # (9, C, 9, 9), row-major cells
        picture = cells.reshape(3, 3, 1, 9, 9).permute(2, 0, 3, 1, 4).reshape(1, 27, 27)
        assert torch.equal(picture, images[n])


def test_jigsaw_normalized_tiles_are_standardised_copies():
    images = _images(4)
    plain = make_batch("jigsaw", images, PretextSettings(jitter=False, normalize_tiles=False),
                       torch.Generator().manual_seed(5))  # fmt: skip
    normed = make_batch("jigsaw", images, PretextSettings(jitter=False),
                        torch.Generator().manual_seed(5))  # fmt: skip
    assert torch.equal(plain.labels, normed.labels)
    t = plain.inputs.double()
    mean = t.mean(dim=(-2, -1), keepdim=True)
    std = t.std(dim=(-2, -1), keepdim=True, correction=0)
    torch.testing.assert_close(normed.inputs.double(), (t - mean) / std, rtol=1e-5, atol=1e-5)


def test_context_positions_map_to_the_named_neighbours():
    images = _images(64, 28)
    settings = PretextSettings(jitter=False, normalize_tiles=False)
    cell, tile = 28 // 3, settings.tile_for(28)
    batch = make_batch("context", images, settings, torch.Generator().manual_seed(0))
    assert batch.num_classes == 8 and batch.inputs.shape == (64, 2, 1, tile, tile)
    assert set(batch.labels.tolist()) == set(range(8))  # every position drawn in 64 samples
    for n, p in enumerate(batch.labels.tolist()):
        dr, dc = _step(CONTEXT_POSITIONS[p])
        assert torch.equal(batch.inputs[n, 0], _cell_crop(images[n], 1, 1, cell, tile))
        assert torch.equal(batch.inputs[n, 1], _cell_crop(images[n], 1 + dr, 1 + dc, cell, tile))


def test_jittered_tiles_stay_inside_their_cells_and_vary():
    images = torch.arange(28 * 28, dtype=torch.float32).reshape(1, 1, 28, 28).repeat(16, 1, 1, 1)
    settings = PretextSettings(normalize_tiles=False)
    batch = make_batch("context", images, settings, torch.Generator().manual_seed(0))
    tile, cell = settings.tile_for(28), 28 // 3
    corner = batch.inputs[:, 0, 0, 0, 0].long()  # the center patch's top-left pixel value
    rows, cols = corner // 28, corner % 28
    assert rows.min() >= cell and rows.max() <= 2 * cell - tile
    assert cols.min() >= cell and cols.max() <= 2 * cell - tile
    assert len(set(corner.tolist())) > 1


def test_batches_are_a_function_of_the_generator_seed():
    images = _images(8)
    for task in ("rotation", "jigsaw", "context"):
        a = make_batch(task, images, PretextSettings(), torch.Generator().manual_seed(9))
        b = make_batch(task, images, PretextSettings(), torch.Generator().manual_seed(9))
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)


def test_default_tile_sizes():
    assert default_tile_size(28, 3) == 7  # 9 px cells, 2 px gap
    assert default_tile_size(255, 3) == 64  # the jigsaw paper's 64 px tiles in 85 px cells
    assert default_tile_size(128, 3) == 32
    with pytest.raises(ValueError, match="too small for a 3x3 grid"):
        default_tile_size(8, 3)


# -- contrastive ---------------------------------------------------------------------------------


def test_warp_views_matches_torchvision_v2_affine_per_image():
    images = _images(12, 28)
    params = sample_view_params(12, PretextSettings(), torch.Generator().manual_seed(4))
    warped = warp_views(images, params)
    expected = torch.stack([
        TF.affine(x, angle=float(a), translate=[float(dx * 28), float(dy * 28)], scale=float(z),
                  shear=[0.0, 0.0], interpolation=TF.InterpolationMode.BILINEAR)
        for x, a, z, (dx, dy) in zip(images, params.angle, params.zoom, params.shift, strict=True)
    ])  # fmt: skip
    torch.testing.assert_close(warped, expected, rtol=1e-4, atol=1e-4)
    assert params.angle.abs().max() <= 15 and params.zoom.min() >= 1 and params.zoom.max() <= 1.5


def test_contrastive_views_differ_per_sample_and_repeat_for_a_seed():
    images = _images(6).repeat(2, 1, 1, 1)  # the same image twice in one batch
    a1, a2 = contrastive_views(images, PretextSettings(), torch.Generator().manual_seed(0))
    b1, _ = contrastive_views(images, PretextSettings(), torch.Generator().manual_seed(0))
    assert torch.equal(a1, b1) and not torch.equal(a1, a2)
    assert not torch.allclose(a1[:6], a1[6:])  # per-sample parameters, not one per batch


def test_nt_xent_against_a_loop():
    z = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    loss, hits = nt_xent(z, 0.5)
    zn = z / z.norm(dim=1, keepdim=True)
    total, right = 0.0, []
    for i in range(8):
        partner = (i + 4) % 8
        sims = {j: float(zn[i] @ zn[j]) / 0.5 for j in range(8) if j != i}
        total -= sims[partner] - np.log(sum(np.exp(v) for v in sims.values()))
        right.append(max(sims, key=sims.get) == partner)
    assert float(loss) == pytest.approx(total / 8, rel=1e-5)
    assert hits.tolist() == right
    # Identical views of distinct, orthogonal images: every partner is found.
    views = torch.eye(4).repeat(2, 1)
    assert nt_xent(views, 0.1)[1].all()
    with pytest.raises(ValueError, match="z must be"):
        nt_xent(torch.randn(3, 4), 0.5)


# Rank r's projections (2 n_r, d): rows i and i + n_r are views of one image; n = 3 and 2, so
# the gather's padding to equal sizes is exercised.
_RANK_PAIRS = (3, 2)


def _rank_z(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10 + rank)
    return torch.randn(2 * _RANK_PAIRS[rank], 5, generator=g, dtype=torch.float64)


def _nt_xent_ranks_worker(rank: int, out_dir: str) -> None:
    z = _rank_z(rank).requires_grad_()
    loss, hits = nt_xent(z, 0.5, across_ranks=True)
    loss.backward()
    torch.save({"loss": loss.detach(), "hits": hits, "grad": z.grad},
               os.path.join(out_dir, f"rank{rank}.pt"))  # fmt: skip


def test_nt_xent_across_ranks_contrasts_every_ranks_views(tmp_path):
    """Each rank's loss and hits are those of its rows within the global batch (a loop over
    every rank's rows), and its gradient that of the sum of the ranks' losses: DDP's average of
    it is the gradient of the global mean."""
    spawn(_nt_xent_ranks_worker, str(tmp_path))
    z = [_rank_z(r).requires_grad_() for r in range(2)]
    rows = [(r, i) for r in range(2) for i in range(2 * _RANK_PAIRS[r])]
    zn = {(r, i): z[r][i] / z[r][i].norm() for r, i in rows}
    losses, right = [], []
    for r in range(2):
        terms, hits = [], []
        for i in range(2 * _RANK_PAIRS[r]):
            partner = (r, (i + _RANK_PAIRS[r]) % (2 * _RANK_PAIRS[r]))
            sims = {v: zn[(r, i)] @ zn[v] / 0.5 for v in rows if v != (r, i)}
            terms.append(torch.logsumexp(torch.stack(list(sims.values())), 0) - sims[partner])
            hits.append(max(sims, key=lambda v: float(sims[v].detach())) == partner)
        losses.append(torch.stack(terms).mean())
        right.append(hits)
    sum(losses).backward()
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        torch.testing.assert_close(got["loss"], losses[r].float(), rtol=1e-5, atol=1e-6)
        assert got["hits"].tolist() == right[r]
        torch.testing.assert_close(got["grad"], z[r].grad, rtol=1e-4, atol=1e-6)
    # One process: the option changes nothing.
    one = _rank_z(0)
    assert torch.equal(nt_xent(one, 0.5, across_ranks=True)[0], nt_xent(one, 0.5)[0])


# -- networks ----------------------------------------------------------------------------------


def test_pretext_nets_share_one_backbone_over_their_inputs():
    seed_everything(0)
    backbone = build_backbone("small-cnn", 1, 28).eval()
    settings = PretextSettings()
    outputs = {"rotation": 4, "jigsaw": 100, "context": 8, "contrastive": 64}
    for task, k in outputs.items():
        net = build_pretext_net(task, backbone, settings).eval()
        assert net.backbone is backbone and net.head[-1].out_features == k
    net = build_pretext_net("context", backbone, settings).eval()
    pair = _images(6, 7).reshape(3, 2, 1, 7, 7)
    with torch.no_grad():
        expected = net.head(torch.cat([backbone(pair[:, 0]), backbone(pair[:, 1])], 1))
        torch.testing.assert_close(net(pair), expected)
    with pytest.raises(ValueError, match=r"expected \(N, 2, C, h, w\)"):
        net(_images(2, 7))
    with pytest.raises(ValueError, match="odd grid"):
        build_pretext_net("context", backbone, PretextSettings(grid=4))
    # Your own backbone: it states its output width (it used to fail with AttributeError).
    own = torch.nn.Sequential(torch.nn.Conv2d(1, 5, 3), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten())  # fmt: skip
    with pytest.raises(TypeError, match=r"int feature_dim >= 1 \(a Sequential has None\)"):
        build_pretext_net("rotation", own, settings)
    own.feature_dim = 5
    assert build_pretext_net("jigsaw", own, settings)(torch.empty(0, 9, 1, 7, 7)).shape == (0, 100)
    assert build_pretext_net("jigsaw", own, settings)(
        _images(18, 7).reshape(2, 9, 1, 7, 7)
    ).shape == (2, 100)


def test_square_only_tasks_refuse_other_images_before_training(tmp_path):
    """Rotation and the contrastive views turn the image about its center: non-square images
    are refused up front (they failed in the first batch, after the earlier tasks trained)."""
    from labelkit_ext.data import DatasetInfo, DataSplits
    from labelkit_ext.methods.pretext import train_pretext

    wide = torch.utils.data.TensorDataset(
        torch.rand(8, 1, 12, 18), torch.zeros(8, dtype=torch.int64)
    )
    info = DatasetInfo("wide", "multiclass", ("a", "b"), 1, 18, (0.0,), (1.0,))
    splits = DataSplits(wide, wide, wide, wide, info)
    quick = TrainConfig(epochs=1, batch_size=4, **CPU)
    for task in ("rotation", "contrastive"):
        with pytest.raises(ValueError, match=rf"the {task} pretext needs square images, got 12x18"):
            run_study(splits, tasks=["jigsaw", task], pretext_config=quick, eval_config=quick,
                      scratch_config=quick, out_dir=tmp_path, quiet=True)  # fmt: skip
        with pytest.raises(ValueError, match="needs square images"):
            train_pretext(task, build_backbone("small-cnn", 1, 18), wide, None, quick)
    assert not any(tmp_path.iterdir())  # nothing trained


# -- linear evaluation: the backbone is frozen ---------------------------------------------------


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("cached", [True, False])
def test_linear_eval_leaves_the_backbone_weights_and_batchnorm_statistics_unchanged(
    tiny_splits, cached
):
    seed_everything(0)
    backbone = build_backbone("small-cnn", 1, 28)
    backbone.train()
    before = _state(backbone)
    assert any("running_mean" in k for k in before)
    config = TrainConfig(epochs=2, batch_size=16, optimizer="adam", lr=1e-2, **CPU)
    features = extract_features(backbone, tiny_splits, config) if cached else None
    result = linear_eval(backbone, tiny_splits, config, features=features)
    after = backbone.state_dict()
    assert before.keys() == after.keys()
    frozen = result.model.backbone.backbone
    for key, value in before.items():
        assert torch.equal(value, after[key]), key  # weights, running stats, batch counters
        assert torch.equal(value, frozen.state_dict()[key]), key
    assert all(not p.requires_grad for p in frozen.parameters())
    # The model holds a frozen copy: the caller's backbone can still be fine-tuned.
    assert all(p.requires_grad for p in backbone.parameters()) and backbone.training
    head = result.model.head
    assert any(p.requires_grad for p in head.parameters())
    assert result.metrics["test"]["n"] == 16 and 0 <= result.metrics["test"]["auc"] <= 1


def test_frozen_backbone_stays_in_eval_mode_inside_the_engine_loop(tiny_splits):
    seed_everything(0)
    backbone = build_backbone("small-cnn", 1, 28)
    model = LinearEvalModel(backbone, eval_head(backbone.feature_dim, 2))
    frozen = model.backbone.backbone
    model.train()
    assert model.training and model.head.training and not frozen.training
    assert all(not m.training for m in frozen.modules())
    before = _state(backbone)
    head_before = _state(model.head)
    fit(
        model,
        tiny_splits.train_eval,
        None,
        "multiclass",
        TrainConfig(epochs=1, batch_size=16, **CPU),
    )
    assert all(torch.equal(v, frozen.state_dict()[k]) for k, v in before.items())
    assert any(not torch.equal(v, model.head.state_dict()[k]) for k, v in head_before.items())


def test_cached_features_train_the_same_head_as_the_images(tiny_splits):
    seed_everything(1)
    backbone = build_backbone("small-cnn", 1, 28)
    config = TrainConfig(epochs=3, batch_size=16, optimizer="adam", lr=1e-2, **CPU)
    features = extract_features(backbone, tiny_splits, config)
    cached = linear_eval(backbone, tiny_splits, config, features=features)
    direct = linear_eval(backbone, tiny_splits, config)
    for key, value in cached.model.head.state_dict().items():
        torch.testing.assert_close(value, direct.model.head.state_dict()[key], rtol=1e-4, atol=1e-5)
    assert cached.metrics["test"]["accuracy"] == direct.metrics["test"]["accuracy"]


# -- label fractions -----------------------------------------------------------------------------


def test_label_fraction_indices_keep_every_class_and_are_seeded():
    targets = torch.tensor([0] * 40 + [1] * 360)
    one = label_fraction_indices(targets, 0.01, seed=0)
    assert torch.bincount(targets[one]).tolist() == [1, 4]  # round(0.4) -> at least 1, round(3.6)
    ten = label_fraction_indices(targets, 0.1, seed=0)
    assert torch.bincount(targets[ten]).tolist() == [4, 36]
    assert np.array_equal(ten, label_fraction_indices(targets, 0.1, seed=0))
    assert not np.array_equal(ten, label_fraction_indices(targets, 0.1, seed=1))
    assert np.array_equal(label_fraction_indices(targets, 1.0, seed=3), np.arange(400))
    assert np.all(np.diff(ten) > 0)
    multi = torch.randint(0, 2, (50, 3))
    assert len(label_fraction_indices(multi, 0.2, seed=0)) == 10
    with pytest.raises(ValueError, match=r"label fraction must be in \(0, 1\]"):
        label_fraction_indices(targets, 0.0, seed=0)


def test_epochs_for_small_subsets_guarantee_the_minimum_steps():
    assert epochs_for(30, 3882, 128, 200) == 30  # 31 steps an epoch: 930 steps already
    assert epochs_for(30, 39, 128, 200) == 200  # one batch an epoch
    assert epochs_for(30, 388, 128, 200) == 50  # 4 steps an epoch
    assert epochs_for(5, 10, 4, 0) == 5


# -- pretext training ----------------------------------------------------------------------------


def test_train_pretext_records_accuracy_and_resumes_like_an_uninterrupted_run(
    tiny_splits, tmp_path, monkeypatch
):
    import labelkit_ext.methods.pretext.training as training

    config = TrainConfig(epochs=2, batch_size=16, optimizer="adam", lr=1e-3, **CPU)
    settings = PretextSettings(num_permutations=10)

    def train(out, resume=False, task="jigsaw", settings=settings, images=None):
        seed_everything(0)
        backbone = build_backbone("small-cnn", 1, 28)
        images = tiny_splits.train_eval if images is None else images
        return training.train_pretext(task, backbone, images, tiny_splits.val,
                                      config, settings, out_dir=out, resume=resume)  # fmt: skip

    full = train(tmp_path / "full")
    assert [r["epoch"] for r in full.history] == [1, 2]
    assert all(0 <= r["val_accuracy"] <= 1 and r["train_loss"] > 0 for r in full.history)
    # Interrupt a run in epoch 2 (its validation), after epoch 1's checkpoint was written.
    evaluate, calls = training.evaluate_pretext, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(training, "evaluate_pretext", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "cut")
    monkeypatch.setattr(training, "evaluate_pretext", evaluate)
    resumed = train(tmp_path / "cut", resume=True)
    assert resumed.resumed_from == 1 and len(resumed.history) == 2
    for key, value in full.net.state_dict().items():
        torch.testing.assert_close(resumed.net.state_dict()[key], value)
    assert resumed.history[1]["val_accuracy"] == full.history[1]["val_accuracy"]
    # Other settings or images: a one-line error naming them (it was a ValueError traceback).
    with pytest.raises(UsageError, match=r"other settings or data \(task='jigsaw' -> 'rotation'\)"):
        train(tmp_path / "cut", resume=True, task="rotation")
    with pytest.raises(UsageError, match=r"\(hidden=256 -> 8\)"):
        train(
            tmp_path / "cut", resume=True, settings=PretextSettings(num_permutations=10, hidden=8)
        )
    fewer = torch.utils.data.Subset(tiny_splits.train_eval, range(len(tiny_splits.train_eval) - 1))
    with pytest.raises(UsageError, match=r"\(other training images \(another --split-seed"):
        train(tmp_path / "cut", resume=True, images=fewer)
    # Another process count (batch_size is per process), until the run is finished.
    for folder, epoch in ((tmp_path / "cut", 1), (tmp_path / "full", 2)):
        state = load_checkpoint(folder / LAST_CHECKPOINT)
        state["epoch"], state["world_size"] = epoch, 2
        save_checkpoint(folder / LAST_CHECKPOINT, state)
    with pytest.raises(UsageError, match=r"processes \(torchrun --nproc_per_node\)=2 -> 1"):
        train(tmp_path / "cut", resume=True)
    assert train(tmp_path / "full", resume=True).resumed_from == 2


def test_train_pretext_does_not_depend_on_the_number_of_workers(tiny_splits):
    """The pretext images are not augmented and the labels are drawn in this process: loading
    them in worker processes trains the same network (it did not, see engine.progress_bar)."""
    from labelkit_ext.methods.pretext.training import train_pretext

    states = []
    for workers in (0, 2):
        config = TrainConfig(epochs=1, batch_size=16, optimizer="adam", lr=1e-3,
                             num_workers=workers, **CPU)  # fmt: skip
        seed_everything(0)
        backbone = build_backbone("small-cnn", 1, 28)
        fitted = train_pretext("rotation", backbone, tiny_splits.train_eval, None, config)
        states.append(_state(fitted.net))
    for key, value in states[0].items():
        assert torch.equal(states[1][key], value), key


def test_pretext_loss_scaling_trains_the_float32_weights(
    tiny_splits, tmp_path, forced_loss_scaling
):
    """train_pretext's float16 path (GradScaler) on CPU, checkpointed with its scale."""
    import labelkit_ext.methods.pretext.training as training

    config = TrainConfig(epochs=1, batch_size=16, optimizer="adam", lr=1e-3, **CPU)

    def train(out=None):
        seed_everything(0)
        backbone = build_backbone("small-cnn", 1, 28)
        return train_pretext("rotation", backbone, tiny_splits.train_eval, None, config,
                             out_dir=out)  # fmt: skip

    plain = train()
    scalers = forced_loss_scaling(training)
    scaled = train(tmp_path)
    for key, value in plain.net.state_dict().items():
        assert torch.equal(scaled.net.state_dict()[key], value), key
    assert scalers[0].get_scale() > 2.0**8
    saved = load_checkpoint(tmp_path / LAST_CHECKPOINT)["scaler"]
    assert saved["scale"] == scalers[0].get_scale()


@pytest.mark.parametrize("task", ["rotation", "context", "contrastive"])
def test_each_pretext_task_trains_and_changes_the_backbone(tiny_splits, task):
    seed_everything(0)
    backbone = build_backbone("small-cnn", 1, 28)
    before = _state(backbone)
    fitted = train_pretext(task, backbone, tiny_splits.train_eval, tiny_splits.val,
                           TrainConfig(epochs=1, batch_size=16, optimizer="adam", lr=1e-3, **CPU))  # fmt: skip
    assert fitted.backbone is backbone and len(fitted.history) == 1
    assert any(not torch.equal(v, backbone.state_dict()[k]) for k, v in before.items())


def _pretext_ddp_worker(rank: int, out_dir: str, task: str) -> None:
    splits = load_dataset("digits", image_size=28, augment=False)
    seed_everything(0)
    backbone = build_backbone("small-cnn", 1, 28)
    config = TrainConfig(epochs=2, batch_size=32, optimizer="adam", lr=1e-3, **CPU)
    fitted = train_pretext(task, backbone, splits.train_eval, splits.val, config,
                           out_dir=out_dir)  # fmt: skip
    history = [{k: v for k, v in r.items() if k != "seconds"} for r in fitted.history]
    torch.save({"state": fitted.net.state_dict(), "history": history},
               os.path.join(out_dir, f"rank{rank}.pt"))  # fmt: skip


@pytest.mark.parametrize("task", ["rotation", "contrastive"])  # contrastive: gathered views
def test_train_pretext_is_data_parallel_on_two_gloo_processes(tmp_path, task):
    spawn(_pretext_ddp_worker, str(tmp_path), task)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    checkpoint = load_checkpoint(tmp_path / "checkpoint_last.pt")
    assert checkpoint["epoch"] == 2
    for key, value in ranks[0]["state"].items():  # parameters and BatchNorm buffers in sync
        assert torch.equal(ranks[1]["state"][key], value), key
        assert torch.equal(checkpoint["model"][key], value), key
    assert ranks[0]["history"] == ranks[1]["history"]  # losses reduced over both ranks


def test_run_pretext_under_torchrun_prints_and_writes_once(tmp_path):
    out = tmp_path / "run"
    done = torchrun_labelkit(
        "run", "pretext", "--dataset", "digits", "--image-size", "28", "--task", "rotation",
        "--pretext-epochs", "1", "--eval-epochs", "1", "--epochs", "1", "--fractions", "1.0",
        "--num-seeds", "1", "--no-random-baseline", "--no-scratch-baseline", "--device", "cpu",
        "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["world_size"] == 2
    assert done.stdout.count("[pretext rotation] epoch 1") == 1  # rank 0 alone logs
    assert done.stdout.count("pretext | digits") == 1
    assert (out / "seed0" / "rotation" / "backbone.pt").is_file()


# -- the whole study -----------------------------------------------------------------------------


def test_run_study_resume_reuses_finished_heads_and_scratch_networks(tiny_splits, tmp_path):
    """A resumed study continues (or, finished, reuses) the heads and scratch networks of its
    checkpoints instead of training every one of them again."""
    quick = TrainConfig(epochs=2, batch_size=16, optimizer="adam", lr=1e-3, **CPU)

    def study(pretext_config=quick, **kwargs):
        return run_study(tiny_splits, tasks=["rotation"], fractions=[0.5, 1.0],
                         pretext_config=pretext_config, eval_config=quick, scratch_config=quick,
                         min_steps=2, out_dir=tmp_path, quiet=True, **kwargs)  # fmt: skip

    first = study()
    head = tmp_path / "seed0" / "eval" / "random-init" / "fraction-0.5"
    assert (head / LAST_CHECKPOINT).is_file()
    again = study(resume=True)
    assert again.evals.keys() == first.evals.keys() and len(first.evals) == 3 * 2
    for key, result in first.evals.items():
        reused = again.evals[key]
        assert result.resumed_from == 0 and reused.resumed_from == result.epochs, key
        assert reused.metrics == result.metrics and reused.history == result.history, key
    assert all(r["resumed_from"] == r["epochs"] > 0 for r in again.results["runs"])
    with pytest.raises(UsageError, match=rf"{head / LAST_CHECKPOINT}: .*balanced"):
        study(resume=True, balanced=False)  # another loss: not the same heads
    # The pretext network's settings by their option names (--epochs is the scratch baseline's)
    longer = replace(quick, epochs=3, lr=1e-2)
    with pytest.raises(UsageError, match=r"\(pretext_epochs=2 -> 3, pretext_lr=0.001 -> 0.01\)"):
        study(resume=True, pretext_config=longer)


def test_a_head_is_not_resumed_on_another_backbone(tiny_splits, tmp_path):
    quick = TrainConfig(epochs=1, batch_size=16, optimizer="adam", lr=1e-3, **CPU)
    for seed in (0, 1):
        seed_everything(seed)
        backbone = build_backbone("small-cnn", 1, 28)
        features = extract_features(backbone, tiny_splits, quick)
        run = {"out_dir": tmp_path, "resume": True, "features": features}
        if seed == 0:
            linear_eval(backbone, tiny_splits, quick, **run)
            continue
        with pytest.raises(UsageError, match=r"\(backbone weights='[0-9a-f]+' -> '[0-9a-f]+'"):
            linear_eval(backbone, tiny_splits, quick, **run)


def test_run_study_python_api_summarises_every_backbone_and_fraction(tiny_splits, tmp_path):
    quick = TrainConfig(epochs=1, batch_size=16, optimizer="adam", lr=1e-3, **CPU)
    fitted = run_study(tiny_splits, tasks=["rotation"], seeds=[0, 1], fractions=[0.25, 1.0],
                       pretext_config=quick, eval_config=quick, scratch_config=quick,
                       min_steps=2, quiet=True)  # fmt: skip
    results = fitted.results
    assert results["backbones"] == ["supervised", "random init", "rotation"]
    assert results["seeds_done"] == [0, 1] and len(results["runs"]) == 3 * 2 * 2
    cell = results["summary"]["by_fraction"]["0.25"]["rotation"]
    accs = [r["metrics"]["test"]["accuracy"] for r in results["runs"]
            if r["backbone"] == "rotation" and r["fraction"] == 0.25]  # fmt: skip
    assert cell["accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert cell["accuracy"]["std"] == pytest.approx(np.std(accs, ddof=1))
    assert cell["train_size"] == 12 and cell["seeds"] == 2  # 25 % of 24 + 24
    sup = results["summary"]["by_fraction"]["1"]["supervised"]
    assert sup["pct_of_supervised"]["auc"] == pytest.approx(100.0)
    row = results["summary"]["table1"][2]
    assert row["backbone"] == "rotation"
    assert row["pct_of_supervised"]["accuracy"] == pytest.approx(
        100 * row["accuracy"]["mean"] / sup["accuracy"]["mean"]
    )
    # The label subset of a (seed, fraction) is the same for every backbone.
    sizes = {(r["seed"], r["fraction"]): r["train_size"] for r in results["runs"]}
    assert all(sizes[(r["seed"], r["fraction"])] == r["train_size"] for r in results["runs"])
    with pytest.raises(ValueError, match="tasks must be among"):
        run_study(tiny_splits, tasks=["colour"])


def test_run_pretext_cli_end_to_end(tmp_path, capsys):
    write_medmnist(tmp_path / "pneumoniamnist.npz", sizes=(48, 12, 16))
    out = tmp_path / "run"
    argv = ["run", "pretext", "--dataset", "pneumoniamnist", "--data-dir", str(tmp_path),
            "--task", "all", "--pretext-epochs", "1", "--eval-epochs", "1", "--epochs", "1",
            "--min-steps", "1", "--fractions", "0.5", "1", "--batch-size", "16",
            "--permutations", "10", "--device", "cpu", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "pretext | pneumoniamnist | small-cnn" in printed and "Table 1" in printed
    for name in ("supervised", "random init", "rotation", "jigsaw", "context", "contrastive"):
        assert name in printed
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "pretext" and results["config"]["tile_size"] == 7
    assert results["config"]["settings"]["num_permutations"] == 10
    assert set(results["pretext"]) == {"rotation", "jigsaw", "context", "contrastive"}
    for plot in (
        "label_fractions.png",
        "pretext_curves.png",
        "jigsaw_batch.png",
        "context_pair.png",
    ):
        assert plot in results["plots"] and (out / plot).read_bytes()[:4] == b"\x89PNG"
    # A pretext-trained backbone loads into a classifier of the same model, e.g. to fine-tune.
    classifier = build_model("small-cnn", 2, 1, 28)
    report = load_pretrained(classifier, out / "seed0" / "jigsaw" / "backbone.pt")
    assert report["skipped"] == [] and all(k.startswith("classifier.") for k in report["missing"])


@pytest.mark.parametrize(
    ("option", "message"),
    [(["--task", "context", "--grid", "4"], "odd --grid"),
     (["--fractions", "0"], r"fractions must be in \(0, 1\]"),
     (["--task", "jigsaw", "--tile-size", "100"], "tile_size 100 is larger than a cell"),
     (["--task", "jigsaw", "--permutations", "10000000"], r"permutations \(num_permutations\)"),
     (["--tile-size", "0"], "tile_size must be >= 1"),
     (["--pretext-epochs", "0"], "pretext_epochs must be >= 1"),
     (["--eval-lr", "0"], "eval_lr must be > 0"),
     (["--task", "jigsaw", "--grid", "10"], "too small for a 10x10 grid")],
)  # fmt: skip
def test_run_pretext_bad_options_are_clear_errors(tmp_path, capsys, option, message):
    write_medmnist(tmp_path / "pneumoniamnist.npz", sizes=(8, 4, 4))
    argv = ["run", "pretext", "--dataset", "pneumoniamnist", "--data-dir", str(tmp_path),
            "--device", "cpu", "--quiet", "--out", str(tmp_path / "run"), *option]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("labelkit: error:") and len(err.strip().splitlines()) == 1
    assert re.search(message, err)


def test_label_fractions_are_shown_with_the_digits_they_need():
    """A 0.001 % fraction was shown as "0%" in the table header and plot ticks."""
    from labelkit_ext.methods.pretext.report import percent

    fractions = (1.0, 0.1, 0.025, 0.00001)
    assert [percent(f) for f in fractions] == ["100%", "10%", "2.5%", "0.001%"]
