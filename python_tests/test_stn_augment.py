"""STN auto-augmentation: the augmenter and its parameterisations against independent matrix
constructions, gradients through our warp, the frozen classifier of stage 2, bounded warps,
equal step budgets, and the method end to end (Python API and CLI)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ddp_helpers import spawn

import labelkit_ext.nn.affine as affine_module
from labelkit_ext import softmax_entropy
from labelkit_ext.cli import main
from labelkit_ext.data import load_dataset
from labelkit_ext.engine import TrainConfig, load_checkpoint, save_checkpoint, seed_everything
from labelkit_ext.methods.stn_augment import (
    VARIANTS,
    AugmentConfig,
    MixedAugmentation,
    StnAugmentRunConfig,
    check_variants,
    fit_stn_augment,
    probe_entropy,
    summary_rows,
    summary_table,
    train_augmenter,
    warp_statistics,
)
from labelkit_ext.models import build_model
from labelkit_ext.nn.stn import (
    AffineBounds,
    RandomAffineWarp,
    STNAugmenter,
    WarpDiscriminator,
    affine_from_unit,
    random_affine_theta,
    theta_deviation,
    theta_penalty,
)

QUIET_CPU = {"batch_size": 64, "device": "cpu", "quiet": True}


@pytest.fixture(scope="module")
def digits8():
    return load_dataset("digits", image_size=8)


def _classifier(seed: int = 0) -> torch.nn.Module:
    seed_everything(seed)
    return build_model("small-cnn", 10, in_channels=1, image_size=8, width=4)


def _decompose(theta: torch.Tensor) -> dict[str, np.ndarray]:
    """Rotation (deg), scales, shear and translation of ``A = R @ [[1, h], [0, 1]] @ diag(sx, sy)``
    by QR of A (numpy, independent of the code under test)."""
    th = theta.detach().double().numpy()
    a, t = th[:, :, :2], th[:, :, 2]
    sx = np.linalg.norm(a[:, :, 0], axis=1)
    phi = np.arctan2(a[:, 1, 0], a[:, 0, 0])
    cos, sin = np.cos(phi), np.sin(phi)
    # R^T A = [[sx, h*sy], [0, sy]]
    upper01 = cos * a[:, 0, 1] + sin * a[:, 1, 1]
    sy = -sin * a[:, 0, 1] + cos * a[:, 1, 1]
    return {"rotation": np.degrees(phi), "sx": sx, "sy": sy, "shear": upper01 / sy, "t": t}


def _assert_within(theta: torch.Tensor, bounds: AffineBounds, slack: float = 1e-5) -> None:
    parts = _decompose(theta)
    assert np.all(np.abs(parts["rotation"]) <= bounds.rotation + slack)
    for key in ("sx", "sy"):
        assert np.all(np.abs(parts[key] - 1) <= bounds.scale + slack)
    assert np.all(np.abs(parts["shear"]) <= bounds.shear + slack)
    assert np.all(np.abs(parts["t"]) <= bounds.translation + slack)


# -- parameterisation ---------------------------------------------------------------------------


def test_affine_from_unit_against_matrix_products():
    bounds = AffineBounds(rotation=40, scale=0.3, shear=0.25, translation=0.15)
    unit = (
        torch.rand(16, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    )
    theta = affine_from_unit(unit, bounds)
    for u, th in zip(unit.numpy(), theta.numpy(), strict=True):
        phi = math.radians(40) * u[0]
        rot = np.array([[math.cos(phi), -math.sin(phi)], [math.sin(phi), math.cos(phi)]])
        shear = np.array([[1.0, 0.25 * u[3]], [0.0, 1.0]])
        scale = np.diag([1 + 0.3 * u[1], 1 + 0.3 * u[2]])
        np.testing.assert_allclose(th[:, :2], rot @ shear @ scale, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(th[:, 2], [0.15 * u[4], 0.15 * u[5]], rtol=1e-12)
    assert torch.equal(affine_from_unit(torch.zeros(3, 6), bounds), torch.eye(2, 3).expand(3, 2, 3))
    _assert_within(affine_from_unit(torch.tensor([[1.0] * 6, [-1.0] * 6]), bounds), bounds)
    with pytest.raises(ValueError, match=r"unit must have shape \(N, 6\)"):
        affine_from_unit(torch.zeros(3, 5), bounds)


def test_theta_deviation_and_penalty_by_hand():
    theta = torch.eye(2, 3).repeat(3, 1, 1)
    theta[1, 0, 2] = 0.3  # ||theta - I|| = 0.3
    theta[2, 0, 0], theta[2, 1, 2] = 1.6, 0.8  # sqrt(0.36 + 0.64) = 1
    np.testing.assert_allclose(theta_deviation(theta).numpy(), [0.0, 0.3, 1.0], atol=1e-7)
    # relu(dev - 0.5)^2: 0, 0, 0.25 -> mean 0.25 / 3
    assert theta_penalty(theta, 0.5).item() == pytest.approx(0.25 / 3, rel=1e-6)
    assert theta_penalty(theta, 1.0).item() == 0.0
    with pytest.raises(ValueError, match="radius must be >= 0"):
        theta_penalty(theta, -0.1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"rotation": -1}, "rotation bound"), ({"rotation": 181}, "<= 180"),
     ({"scale": 1.0}, "scale bound must be < 1"), ({"translation": float("nan")}, "translation bound"),
     ({"shear": 1.01}, r"shear bound must be <= 1.0 \(45 degrees\)"),
     ({"translation": 2.5}, "translation bound must be <= 2.0")],
)  # fmt: skip
def test_bounds_reject_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AffineBounds(**kwargs)


def test_random_affine_covers_and_respects_the_same_bounds():
    bounds = AffineBounds(rotation=20, scale=0.1, shear=0.3, translation=0.25)
    seed_everything(0)
    theta = random_affine_theta(4000, bounds)
    _assert_within(theta, bounds)
    parts = _decompose(theta)
    assert parts["rotation"].max() > 19 and parts["rotation"].min() < -19  # the whole range
    assert np.abs(parts["t"]).max() > 0.24
    out = RandomAffineWarp(bounds)(torch.randn(5, 3, 12, 12))
    assert out.image.shape == (5, 3, 12, 12) and out.theta.shape == (5, 2, 3)


# -- the augmenter --------------------------------------------------------------------------------


@pytest.mark.parametrize("parameterisation", ["free", "bounded"])
def test_augmenter_starts_at_identity(parameterisation):
    seed_everything(0)
    augmenter = STNAugmenter(3, parameterisation=parameterisation)
    x = torch.randn(4, 3, 16, 20)
    out = augmenter(x)
    assert torch.equal(out.theta, torch.eye(2, 3).expand(4, 2, 3))
    torch.testing.assert_close(out.image, x, rtol=0, atol=1e-5)
    # and the same as torch's own warp by the identity
    grid = F.affine_grid(out.theta, list(x.shape), align_corners=False)
    oracle = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    torch.testing.assert_close(out.image, oracle, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("parameterisation", ["free", "bounded"])
def test_gradients_reach_theta_through_our_warp(monkeypatch, parameterisation):
    calls = []
    ours = affine_module.affine_grid_sample

    def counting(*args, **kwargs):
        calls.append(args[1])
        return ours(*args, **kwargs)

    monkeypatch.setattr(affine_module, "affine_grid_sample", counting)
    seed_everything(1)
    augmenter = STNAugmenter(1, parameterisation=parameterisation).double()
    with torch.no_grad():  # off the identity: there every sample sits on a pixel centre, a
        augmenter.head.bias.normal_(0, 0.05)  # kink of bilinear interpolation (one-sided slopes)
    x = torch.rand(3, 1, 10, 10, dtype=torch.float64)
    weights = torch.randn(3, 1, 10, 10, dtype=torch.float64)
    out = augmenter(x)
    out.theta.retain_grad()
    (out.image * weights).sum().backward()
    assert len(calls) == 1 and calls[0].grad_fn is not None  # theta went through our op
    # d loss / d theta equals autograd through torch's affine_grid + grid_sample
    theta = out.theta.detach().clone().requires_grad_(True)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    (F.grid_sample(x, grid, align_corners=False) * weights).sum().backward()
    torch.testing.assert_close(out.theta.grad, theta.grad, rtol=1e-7, atol=1e-9)
    assert out.theta.grad.abs().sum() > 0
    # ... and on into the localisation head (zero-initialised, so its weight gets the signal)
    assert augmenter.head.weight.grad.abs().sum() > 0 and augmenter.head.bias.grad.abs().sum() > 0


def test_bounded_augmenter_keeps_theta_inside_its_bounds_at_any_output():
    bounds = AffineBounds(rotation=15, scale=0.1, shear=0.1, translation=0.1)
    seed_everything(2)
    augmenter = STNAugmenter(3, parameterisation="bounded", bounds=bounds)
    with torch.no_grad():
        augmenter.head.weight.normal_(0, 50.0)  # saturate tanh in both directions
        augmenter.head.bias.copy_(torch.tensor([1e3, -1e3, 1e3, -1e3, 1e3, -1e3]))
    theta = augmenter(torch.randn(64, 3, 16, 16)).theta
    _assert_within(theta, bounds)
    parts = _decompose(theta)
    assert np.abs(parts["rotation"]).max() > 14.9  # saturated at the bound, not inside it


def test_augmenter_and_discriminator_reject_bad_arguments():
    with pytest.raises(ValueError, match="parameterisation must be one of"):
        STNAugmenter(3, parameterisation="projective")
    with pytest.raises(ValueError, match="in_channels and width must be >= 1"):
        STNAugmenter(0)
    with pytest.raises(ValueError, match="in_channels and width must be >= 1"):
        WarpDiscriminator(3, width=0)
    with pytest.raises(ValueError, match=r"x must be \(N, C, H, W\)"):
        STNAugmenter(3)(torch.zeros(3, 8, 8))
    assert WarpDiscriminator(3)(torch.zeros(5, 3, 9, 9)).shape == (5,)


# -- stage 2 -----------------------------------------------------------------------------------


def _adversaries() -> tuple[STNAugmenter, WarpDiscriminator]:
    seed_everything(0)
    return STNAugmenter(1, parameterisation="free"), WarpDiscriminator(1, width=8)


def _train_adversarially(classifier, augmenter, discriminator, data, epochs, batch_size):
    """Stage 2 with the discriminator and the theta penalty, 32 val images as the probe."""
    probe = torch.stack([data.val[i][0] for i in range(32)])
    return train_augmenter(
        classifier, augmenter, data.train, probe,
        AugmentConfig(epochs=epochs, batch_size=batch_size, device="cpu", quiet=True),
        discriminator=discriminator, penalty=True,
    )  # fmt: skip


def test_stage2_loss_scaling_trains_the_float32_weights(digits8, forced_loss_scaling):
    """Stage 2's float16 path on CPU: one GradScaler for the discriminator and augmenter."""
    import labelkit_ext.methods.stn_augment.training as training

    def stage2():
        augmenter, discriminator = _adversaries()
        _train_adversarially(_classifier(), augmenter, discriminator, digits8, 1, 128)
        return augmenter.state_dict(), discriminator.state_dict()

    plain = stage2()
    scalers = forced_loss_scaling(training)
    scaled = stage2()
    for want, got in zip(plain, scaled, strict=True):
        assert all(torch.equal(got[k], v) for k, v in want.items())
    assert len(scalers) == 1 and scalers[0].get_scale() > 2.0**8


def test_stage2_freezes_the_classifier_and_trains_augmenter_and_discriminator(digits8):
    classifier = _classifier()
    classifier.train()  # stage 2 must put it in eval mode (BN statistics frozen) ...
    before = {k: v.clone() for k, v in classifier.state_dict().items()}
    augmenter, discriminator = _adversaries()
    aug_before = [p.clone() for p in augmenter.parameters()]
    disc_before = [p.clone() for p in discriminator.parameters()]
    fitted = _train_adversarially(classifier, augmenter, discriminator, digits8, 1, 128)
    # The step records stay on the device during an epoch; they end as plain numbers.
    assert all(type(v) in (int, float) for r in fitted.steps for v in r.values())
    after = classifier.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN buffers
    assert classifier.training and all(p.requires_grad for p in classifier.parameters())  # restored
    assert any(
        not torch.equal(a, b) for a, b in zip(aug_before, augmenter.parameters(), strict=True)
    )
    assert any(
        not torch.equal(a, b) for a, b in zip(disc_before, discriminator.parameters(), strict=True)
    )
    steps = math.ceil(len(digits8.train) / 128)
    assert len(fitted.steps) == steps and [e["epoch"] for e in fitted.epochs] == [0, 1]
    assert {"d_loss", "d_accuracy", "g_adversarial", "penalty", "max_entropy", "g_loss",
            "warped_entropy", "theta_deviation"} <= set(fitted.steps[0])  # fmt: skip
    assert fitted.epochs[0]["theta_deviation"]["q95"] == 0.0  # identity before training


def _stage2_ddp_worker(rank: int, out_dir: str) -> None:
    data = load_dataset("digits", image_size=8)
    classifier = _classifier()
    augmenter, discriminator = _adversaries()
    fitted = _train_adversarially(classifier, augmenter, discriminator, data, 2, 64)
    torch.save({"augmenter": augmenter.state_dict(), "discriminator": discriminator.state_dict(),
                "epochs": fitted.epochs, "steps": len(fitted.steps)},
               os.path.join(out_dir, f"rank{rank}.pt"))  # fmt: skip


def test_stage2_is_data_parallel_on_two_gloo_processes(tmp_path, digits8):
    """Augmenter and discriminator stay identical on both ranks (DDP, buffers broadcast), each
    rank takes half the batches, and the probe's warp statistics agree."""
    spawn(_stage2_ddp_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for name in ("augmenter", "discriminator"):
        for key, value in ranks[0][name].items():
            assert torch.equal(ranks[1][name][key], value), (name, key)
    assert ranks[0]["epochs"] == ranks[1]["epochs"]
    assert ranks[0]["steps"] == 2 * math.ceil(math.ceil(len(digits8.train) / 2) / 64)
    assert ranks[0]["epochs"][-1]["theta_deviation"]["q95"] > 0.0  # it trained


def test_stage2_raises_the_classifier_entropy_within_bounds(digits8):
    """Without a discriminator the augmenter maximises L_ME: the warped images' entropy must
    rise (the sign of the loss is right) while theta stays inside the bounds."""
    classifier = _classifier()
    seed_everything(0)
    from labelkit_ext.engine import fit

    fit(classifier, digits8.train, None, "multiclass", TrainConfig(epochs=3, lr=0.05, **QUIET_CPU))
    bounds = AffineBounds(rotation=20, scale=0.15, shear=0.15, translation=0.15)
    augmenter = STNAugmenter(1, parameterisation="bounded", bounds=bounds)
    probe = torch.stack([digits8.val[i][0] for i in range(len(digits8.val))])
    fitted = train_augmenter(
        classifier, augmenter, digits8.train, probe,
        AugmentConfig(epochs=3, batch_size=64, lr=5e-3, device="cpu", quiet=True),
    )  # fmt: skip
    first, last = fitted.epochs[0], fitted.epochs[-1]
    assert last["warped_entropy"]["mean"] > first["warped_entropy"]["mean"] + 0.05
    assert last["theta_deviation"]["q50"] > 0.05
    with torch.no_grad():
        _assert_within(augmenter(probe).theta, bounds)
    stats = warp_statistics(classifier, augmenter, probe[:10])
    assert stats["theta_deviation"]["q50"] == pytest.approx(
        float(np.median(theta_deviation(augmenter(probe[:10]).theta.detach()).numpy())), rel=1e-5
    )
    # Stage 2 passes the originals' entropies, computed once: the same statistics.
    original = probe_entropy(classifier, probe[:10])
    with torch.no_grad():
        by_hand = softmax_entropy(classifier.eval()(probe[:10]), base=2)
    torch.testing.assert_close(original, by_hand)
    assert warp_statistics(classifier, augmenter, probe[:10], original_entropy=original) == stats
    assert fitted.epochs[0]["original_entropy"] == last["original_entropy"]  # frozen classifier


def test_augment_config_rejects_bad_values():
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        AugmentConfig(epochs=0)
    with pytest.raises(ValueError, match="disc_lr must be > 0"):
        AugmentConfig(disc_lr=0)
    with pytest.raises(ValueError, match="lambda_me must be >= 0"):
        AugmentConfig(lambda_me=-1)
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        AugmentConfig(num_workers=-1)


def test_numpy_seeds_and_mix_become_python_numbers(digits8):
    """mix is recorded in the stage-3 checkpoints, read back with weights_only: a NumPy scalar
    there made them unreadable at resume."""
    from labelkit_ext.methods.stn_augment.pipeline import _check_arguments

    seeds, mix = _check_arguments(np.arange(2), np.float64(0.5), digits8)
    assert seeds == [0, 1] and type(mix) is float and all(type(s) is int for s in seeds)


def test_an_augment_config_of_your_own_must_use_the_classifiers_device(monkeypatch, digits8):
    """AugmentConfig's device defaults to 'auto': on a GPU machine, with config.device='cpu', stage
    2 moved the shared stage-1 classifier to the GPU. Refused before any training (a pretend GPU
    stands in for 'auto')."""
    from labelkit_ext.methods.stn_augment import pipeline

    devices = {"auto": torch.device("cuda", 0), "cpu": torch.device("cpu")}
    monkeypatch.setattr(pipeline, "select_device", lambda spec: devices[spec])
    with pytest.raises(ValueError, match=r"augment_config.device='auto' \(cuda:0\) is not "
                       r"config.device='cpu' \(cpu\)"):  # fmt: skip
        pipeline.fit_stn_augment(digits8, config=TrainConfig(device="cpu", quiet=True),
                                 augment_config=AugmentConfig(lambda_me=1.0))  # fmt: skip


class _WorkerOnly(torch.utils.data.Dataset):
    """Training images that refuse to be loaded outside a DataLoader worker process."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        if torch.utils.data.get_worker_info() is None:
            raise RuntimeError("loaded in the main process")
        return self.dataset[index]


def test_stage2_loads_its_training_images_in_num_workers_processes(digits8):
    """``--num-workers`` reaches stage 2 (its augmented images were once always loaded in the
    main process, starving a GPU)."""
    probe = torch.stack([digits8.val[i][0] for i in range(8)])
    train = _WorkerOnly(digits8.train)

    def stage2(workers: int):
        config = AugmentConfig(epochs=1, batch_size=512, device="cpu", quiet=True,
                               num_workers=workers)  # fmt: skip
        return train_augmenter(_classifier(), _adversaries()[0], train, probe, config)

    with pytest.raises(RuntimeError, match="main process"):
        stage2(0)
    assert len(stage2(1).steps) == math.ceil(len(train) / 512)
    run = StnAugmentRunConfig(train=TrainConfig(num_workers=3))
    assert run.augment_config().num_workers == 3


# -- stage 3 -----------------------------------------------------------------------------------


def test_mixed_augmentation_replaces_a_share_only_in_training():
    class Recorder(torch.nn.Module):
        num_classes = 2

        def forward(self, x):
            self.seen = x.clone()
            return x.flatten(1)[:, :2]

    class Negate(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(-1.0))

        def forward(self, x):
            return type("Out", (), {"image": x * self.scale})()

    x = torch.rand(1000, 1, 2, 2) + 1  # positive: a negated image is recognisable
    net = MixedAugmentation(Recorder(), Negate(), mix=0.3)
    assert not net.augmenter.scale.requires_grad  # frozen
    net.train()
    assert not net.augmenter.training
    net(x)
    negated = (net.classifier.seen < 0).flatten(1).all(1)
    kept = torch.isclose(net.classifier.seen, x).flatten(1).all(1)
    assert bool((negated | kept).all()) and 0.25 < negated.float().mean() < 0.35
    assert net.train_steps == 1 and net.augmented_images == int(negated.sum())
    net.eval()
    net(x)
    assert torch.equal(net.classifier.seen, x) and net.train_steps == 1
    none = MixedAugmentation(Recorder(), None, mix=0.5).train()
    none(x)
    assert torch.equal(none.classifier.seen, x) and none.augmented_images == 0
    # The counts travel with the state dict (a resumed fine-tuning goes on from them).
    restored = MixedAugmentation(Recorder(), Negate(), mix=0.3)
    restored.load_state_dict(net.state_dict())
    assert restored.train_steps == 1 and restored.augmented_images == int(negated.sum())
    with pytest.raises(ValueError, match=r"mix must be in \[0, 1\]"):
        MixedAugmentation(Recorder(), None, mix=1.5)


# -- end to end ---------------------------------------------------------------------------------


def test_fit_stn_augment_equal_step_budgets_and_results(digits8):
    fitted = fit_stn_augment(
        digits8,
        config=TrainConfig(epochs=2, **QUIET_CPU),
        finetune_config=TrainConfig(epochs=2, lr=0.01, **QUIET_CPU),
        augment_config=AugmentConfig(
            epochs=1, batch_size=64, device="cpu", quiet=True, probe_size=64
        ),
        seeds=[0, 1],
    )
    results = fitted.results
    names = list(VARIANTS)
    assert results["config"]["variants"] == names
    budget = 2 * math.ceil(len(digits8.train) / 64)
    for seed in ("0", "1"):
        variants = results["runs"][seed]["variants"]
        assert set(variants) == set(names)
        for name, record in variants.items():
            assert record["stage3"]["train_steps"] == budget, name  # equal step budgets
            assert len(record["stage3"]["history"]) == 2
            assert (record["stage2"] is not None) == VARIANTS[name].learnt
            assert (record["stage3"]["augmented_images"] > 0) == (name != "no-affine")
        # the same stage-1 classifier feeds every variant of a seed
        assert results["runs"][seed]["stage1"]["metrics"]["test"]["accuracy"] > 0.3
    rows = results["table"]
    assert [r["variant"] for r in rows] == ["stage 1 only", *names]
    by_name = {r["variant"]: r for r in rows}
    accs = [
        results["runs"][s]["variants"]["stn"]["metrics"]["test"]["accuracy"] for s in ("0", "1")
    ]
    assert by_name["stn"]["test_accuracy_mean"] == pytest.approx(np.mean(accs))
    assert by_name["stn"]["test_accuracy_std"] == pytest.approx(np.std(accs, ddof=1))
    assert by_name["no-affine"]["test_gain_mean"] == 0.0
    assert "collapsed_seeds" in by_name["stn"] and "collapsed_seeds" not in by_name["random-affine"]
    assert "stn-nodisc" in summary_table(rows)
    assert set(fitted.classifiers[1]) == set(names) and fitted.augmenters[0]["no-affine"] is None


def test_summary_rows_mean_std_and_collapse_count():
    def record(acc, dev):
        warp = {k: {"q50": v} for k, v in (("theta_deviation", dev), ("warped_entropy", 1.0),
                                           ("original_entropy", 0.5))}  # fmt: skip
        return {"metrics": {"val": {"accuracy": acc}, "test": {"accuracy": acc}},
                "warp": warp, "stage2": {"steps": []}}  # fmt: skip

    base = {
        "metrics": {"val": {"accuracy": 0.5}, "test": {"accuracy": 0.5}},
        "warp": None,
        "stage2": None,
    }
    runs = {
        "0": {"stage1": {"metrics": base["metrics"]}, "variants": {"no-affine": base, "stn": record(0.6, 0.01)}},
        "1": {"stage1": {"metrics": base["metrics"]}, "variants": {"no-affine": base, "stn": record(0.7, 0.2)}},
    }  # fmt: skip
    rows = summary_rows(runs, ["no-affine", "stn"])
    stn = rows[2]
    assert stn["test_accuracy_mean"] == pytest.approx(0.65)
    assert stn["test_accuracy_std"] == pytest.approx(np.std([0.6, 0.7], ddof=1))
    assert stn["test_gain_mean"] == pytest.approx(0.15)
    assert stn["collapsed_seeds"] == 1 and stn["theta_deviation_median"] == pytest.approx(0.105)


def test_fit_stn_augment_rejects_bad_arguments(digits8):
    with pytest.raises(ValueError, match="unknown variants"):
        check_variants(["stn", "autoaugment"])
    with pytest.raises(ValueError, match="at least one variant"):
        check_variants([])
    with pytest.raises(ValueError, match="seeds must be distinct"):
        fit_stn_augment(digits8, seeds=[0, 0])
    with pytest.raises(ValueError, match=r"mix must be in \(0, 1\]"):
        fit_stn_augment(digits8, mix=0.0)


def test_run_stn_augment_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "stn-augment", "--dataset", "digits", "--image-size", "8", "--device", "cpu",
            "--quiet", "--epochs", "1", "--aug-epochs", "1", "--finetune-epochs", "1",
            "--num-seeds", "2", "--variants", "no-affine", "random-affine", "stn-bounded",
            "--probe-size", "32", "--out", str(out)]  # fmt: skip
    code = main(args)
    assert code == 0
    printed = capsys.readouterr().out
    assert "stn-bounded" in printed and "random-affine" in printed and "test acc %" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "stn-augment" and results["config"]["seeds"] == [0, 1]
    for plot in ("stage2_losses.png", "warp_distributions.png", "warp_grid.png", "accuracy.png"):
        assert (out / plot).stat().st_size > 1000, plot
    assert plot in results["plots"]
    assert (out / "seed1" / "stn-bounded" / "augmenter.pt").is_file()
    steps = {r["variants"][v]["stage3"]["train_steps"] for r in results["runs"].values()
             for v in ("no-affine", "random-affine", "stn-bounded")}  # fmt: skip
    assert len(steps) == 1
    # resuming loads the finished stages instead of training them again, also an augmenter
    # saved before stage 2 took num_workers (its settings lack the field)
    augmenter_file = out / "seed1" / "stn-bounded" / "augmenter.pt"
    state = load_checkpoint(augmenter_file)
    assert state["config"].pop("num_workers") == 0
    save_checkpoint(augmenter_file, state)
    saved = augmenter_file.read_bytes()
    code = main([*args, "--resume"])
    again = json.loads((out / "results.json").read_text())
    assert code == 0 and again["table"] == results["table"]
    assert augmenter_file.read_bytes() == saved  # loaded, not trained and written again
    resumed = {v: r["variants"][v]["stage3"]["resumed_from_epoch"]
               for r in again["runs"].values() for v in ("random-affine", "stn-bounded")}  # fmt: skip
    assert resumed == {"random-affine": 1, "stn-bounded": 1}
    # Another stage 2 (--lambda-me): its stage 3 starts again, the other variants' resume.
    code = main([*args, "--resume", "--lambda-me", "1"])
    changed = json.loads((out / "results.json").read_text())["runs"]
    assert code == 0 and augmenter_file.read_bytes() != saved
    for run in changed.values():
        assert run["variants"]["stn-bounded"]["stage3"]["resumed_from_epoch"] == 0
        assert run["variants"]["random-affine"]["stage3"]["resumed_from_epoch"] == 1
    # Another --mix: stage 3 was trained with the old one
    assert main([*args, "--resume", "--lambda-me", "1", "--mix", "1"]) == 2
    assert "mix=0.5 -> 1.0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "message"),
    [(["--num-seeds", "0"], "num_seeds must be >= 1"),
     (["--finetune-epochs", "0"], "finetune_epochs must be >= 1"),
     (["--mix", "0"], r"mix must be in \(0, 1\]"),
     (["--max-scale", "1.5"], "max_scale must be < 1"),  # the option, not AffineBounds.scale
     (["--max-shear", "3"], "max_shear must be <= 1.0"),
     (["--max-translation", "4"], r"max_translation must be <= 2.0 \(the full width"),
     (["--aug-epochs", "0"], "aug_epochs must be >= 1"),  # not the nested "epochs"
     (["--aug-lr", "0"], "aug_lr must be > 0")],
)  # fmt: skip
def test_run_stn_augment_bad_options_are_clear_errors(tmp_path, capsys, option, message):
    code = main(["run", "stn-augment", "--dataset", "digits", "--device", "cpu", "--quiet",
                 "--out", str(tmp_path), *option])  # fmt: skip
    assert code == 2
    import re

    assert re.search(message, capsys.readouterr().err)
