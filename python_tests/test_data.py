"""Data loaders against tiny fixtures in the official formats, the mosaic's label statistics,
splits and transforms; the real shared files when present."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_data import (
    SHARED_DATA,
    cifar_rows,
    write_cifar10,
    write_cifar100,
    write_medmnist,
    write_nih,
)

from labelkit_ext.data import (
    DATA_ENV,
    NIH_FINDINGS,
    DataNotFoundError,
    MosaicStats,
    available_datasets,
    class_prior,
    dataset_targets,
    default_data_dir,
    holdout_indices,
    load_dataset,
    make_digit_mosaic,
)
from labelkit_ext.data.cifar import read_cifar_pickle
from labelkit_ext.data.digits import digit_arrays
from labelkit_ext.data.nih import parse_findings
from labelkit_ext.errors import UsageError

# -- digits -----------------------------------------------------------------------------------


def test_digits_is_the_real_set_split_reproducibly():
    a = load_dataset("digits")
    b = load_dataset("digits")
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert len(a.test) == 360  # 20% stratified
    assert torch.equal(a.test.images, b.test.images) and torch.equal(a.val.targets, b.val.targets)
    assert a.info.num_classes == 10 and a.info.task == "multiclass" and a.info.in_channels == 1
    assert a.test.images.shape[1:] == (1, 32, 32)  # upsampled by default
    counts = torch.bincount(a.test.targets, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 of each digit


def test_digits_native_size_and_split_seed():
    native = load_dataset("digits", image_size=8)
    images, labels = digit_arrays()
    assert native.train.images.shape[1:] == (1, 8, 8)
    assert native.train.images.dtype == torch.uint8 and int(images.max()) == 255
    # Every test image is one of the real digits, unchanged at native size.
    flat = {bytes(x.numpy()) for x in images}
    assert all(bytes(x.numpy()) in flat for x in native.test.images)
    other = load_dataset("digits", image_size=8, split_seed=1)
    assert not torch.equal(native.test.images, other.test.images)


# -- splits and transforms --------------------------------------------------------------------


def test_dataset_targets_of_any_dataset():
    """Every method reads targets this way: labelkit's sets, a TensorDataset, a Subset of
    either, and a user's dataset with items only (read in turn, or None when that is not
    allowed: the resume fingerprint never loads the samples)."""
    splits = load_dataset("digits", image_size=8)
    assert torch.equal(dataset_targets(splits.train), torch.as_tensor(splits.train.targets))
    x, y = torch.rand(5, 1, 2, 2), torch.tensor([2, 0, 1, 1, 0])
    tensors = torch.utils.data.TensorDataset(x, y)
    assert torch.equal(dataset_targets(tensors), y)
    subset = torch.utils.data.Subset(tensors, [4, 1, 2])
    assert torch.equal(dataset_targets(subset), y[[4, 1, 2]])
    items = [(x[i], int(y[i])) for i in range(5)]  # a list is a map-style dataset too
    assert torch.equal(dataset_targets(items), y)
    assert dataset_targets(items, read_items=False) is None
    multi = [(x[i], torch.tensor([1.0, 0.0])) for i in range(2)]
    assert dataset_targets(multi).shape == (2, 2)
    assert torch.equal(dataset_targets(torch.utils.data.Subset(tensors, [])), y[:0])
    assert dataset_targets([]).shape == (0,)


class _Counted(torch.utils.data.Dataset):
    """Items only, counting the reads; ``targets`` / ``target_transform`` set per test."""

    def __init__(self, n: int) -> None:
        self.n, self.reads = n, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        self.reads += 1
        return torch.zeros(1), i % 3


def test_dataset_targets_trusts_only_what_matches_the_items():
    """A Subset of an items-only dataset reads its own items alone; torchvision's raw
    ``targets`` under a ``target_transform`` and attributes one tensor cannot hold (ragged
    label lists, names) are not taken as the targets."""
    counted = _Counted(50)
    assert dataset_targets(torch.utils.data.Subset(counted, [4, 8])).tolist() == [1, 2]
    assert counted.reads == 2
    remapped = _Counted(3)
    remapped.targets, remapped.target_transform = [3, 5, 7], lambda y: y
    assert dataset_targets(remapped, read_items=False) is None
    assert dataset_targets(remapped).tolist() == [0, 1, 2]  # what the items say
    for odd in ([[0, 2], [1], [2]], ["a", "b", "c"]):
        ragged = _Counted(3)
        ragged.targets = odd
        assert dataset_targets(ragged, read_items=False) is None


def test_holdout_is_stratified_grouped_and_checked():
    labels = torch.arange(100) % 4
    keep, held = holdout_indices(labels, 0.2, seed=0)
    assert len(held) == 20 and set(keep).isdisjoint(held)
    assert torch.bincount(labels[held]).tolist() == [5, 5, 5, 5]
    groups = [str(i // 5) for i in range(100)]
    keep, held = holdout_indices(labels, 0.2, 0, groups)
    assert {groups[i] for i in keep}.isdisjoint({groups[i] for i in held})
    with pytest.raises(ValueError, match="val_fraction"):
        holdout_indices(labels, 1.5, 0)
    assert len(holdout_indices(labels, 0.001, 0)[1]) == 1  # scikit-learn rounds the held part up
    with pytest.raises(UsageError, match="val_fraction=0.999 of 100 .* leaves an empty"):
        holdout_indices(labels, 0.999, 0)
    with pytest.raises(UsageError, match="val_fraction=0.5 of 1 .* leaves an empty"):
        holdout_indices(labels[:1], 0.5, 0)
    with pytest.raises(UsageError, match="needs at least 2 groups"):
        holdout_indices(labels, 0.2, 0, ["one patient"] * 100)


def test_transforms_normalise_and_augment():
    splits = load_dataset("digits", image_size=16)
    x_eval = torch.stack([splits.train_eval[i][0] for i in range(len(splits.train_eval))])
    assert x_eval.dtype == torch.float32
    assert abs(float(x_eval.mean())) < 1e-3 and abs(float(x_eval.std()) - 1.0) < 1e-2
    torch.manual_seed(0)
    augmented = torch.stack([splits.train[i][0] for i in range(64)])
    assert augmented.shape == x_eval[:64].shape and not torch.equal(augmented, x_eval[:64])
    assert torch.equal(load_dataset("digits", image_size=16, augment=False).train[3][0], x_eval[3])


@pytest.mark.parametrize(
    ("channels", "size", "padding", "flip"),
    [(1, 16, 2, False), (3, 32, 4, True), (1, 7, 1, True), (2, 1, 1, False), (1, 3, 3, True),
     (3, 9, None, False), (3, 9, None, True)],
)  # fmt: skip
def test_image_transform_is_torchvisions_pipeline_bit_for_bit(channels, size, padding, flip):
    """ImageTransform against the torchvision v2 Compose it replaces: the same outputs from the
    same seed, and the same random draws (the stream is left in the same state)."""
    from torchvision.transforms import v2

    from labelkit_ext.data import ImageTransform

    g = torch.Generator().manual_seed(channels * 100 + size)
    mean, std = tuple(torch.rand(channels, generator=g).tolist()), (0.3, 0.2, 0.1)[:channels]
    steps = [v2.RandomHorizontalFlip()] * flip + [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ]
    if padding is not None:
        steps = [v2.RandomCrop(size, padding=padding)] + steps
    oracle, ours = v2.Compose(steps), ImageTransform(mean, std, padding, flip)
    images = torch.randint(0, 256, (200, channels, size, size), generator=g).to(torch.uint8)
    outputs = []
    for transform in (oracle, ours):
        torch.manual_seed(7)
        outputs.append([transform(x) for x in images] + [torch.rand(3)])
    for want, got in zip(*outputs, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    if padding is not None and size > 1:  # the crops did move the images
        plain = ImageTransform(mean, std)
        crops = outputs[1][:-1]  # the last entry is the random stream's state
        assert sum(not torch.equal(c, plain(x)) for c, x in zip(crops, images, strict=True)) > 100


def test_image_transform_refuses_what_it_cannot_do():
    from labelkit_ext.data import ImageTransform

    for padding in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="padding must be None or an int >= 1"):
            ImageTransform((0.5,), (0.2,), padding)
    with pytest.raises(ValueError, match=r"image must be \(C, H, W\), got \(2, 1, 4, 4\)"):
        ImageTransform((0.5,), (0.2,), 1)(torch.zeros(2, 1, 4, 4, dtype=torch.uint8))


def test_memory_limit_is_the_machines_ram_or_a_lower_cgroup_limit(tmp_path, monkeypatch):
    import labelkit_ext.data.core as core

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 2**28 < core.memory_limit() <= ram
    (tmp_path / "unlimited").write_text("max\n")
    (tmp_path / "limited").write_text("1048576\n")
    monkeypatch.setattr(core, "_CGROUP_LIMITS", (str(tmp_path / "unlimited"), "/nonexistent"))
    assert core.memory_limit() == ram
    monkeypatch.setattr(core, "_CGROUP_LIMITS", (str(tmp_path / "limited"),))
    assert core.memory_limit() == 2**20
    with pytest.raises(UsageError, match=r"take 2 MiB in memory and this process may use 1 MiB"):
        core.check_fits_in_memory(2 * 2**20, "x")


def test_unknown_names_and_options_are_errors():
    assert {
        "digits",
        "digit-mosaic",
        "pneumoniamnist",
        "cifar10",
        "cifar100",
        "nih-chestxray14",
    } <= set(available_datasets())
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['n_train'\]"):
        load_dataset("digits", n_train=5)
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("digits", image_size=0)


# -- MedMNIST ---------------------------------------------------------------------------------


def test_pneumoniamnist_npz_keeps_the_official_splits(tmp_path):
    write_medmnist(tmp_path / "pneumoniamnist.npz")
    splits = load_dataset("pneumoniamnist", tmp_path)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (20, 6, 8)
    assert splits.info.class_names == ("normal", "pneumonia") and splits.info.image_size == 28
    image, label = splits.test[1]
    assert image.shape == (1, 28, 28) and label.dtype == torch.int64 and int(label) == 1
    # Any path to the file works too, e.g. the official download under another name.
    other = write_medmnist(tmp_path / "pneumoniamnist_64.npz", side=64)
    assert load_dataset("pneumoniamnist", other).info.image_size == 64


def test_chestmnist_is_multilabel(tmp_path):
    write_medmnist(tmp_path / "chestmnist.npz", num_labels=14)
    splits = load_dataset("chestmnist", tmp_path)
    assert splits.info.task == "multilabel" and splits.info.class_names == NIH_FINDINGS
    assert splits.train.targets.shape == (20, 14) and splits.train.targets.dtype == torch.float32


def test_missing_medmnist_file_names_file_layout_and_source(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("pneumoniamnist", tmp_path)
    message = str(err.value)
    assert str(tmp_path / "pneumoniamnist.npz") in message
    assert "train_images" in message and "zenodo" in message and "medmnist" in message


def test_medmnist_file_without_the_arrays_is_an_error(tmp_path):
    np.savez(tmp_path / "pneumoniamnist.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="lacks arrays"):
        load_dataset("pneumoniamnist", tmp_path)


@pytest.mark.parametrize(
    "content",
    [b"", b"garbage, not an npz" * 4, b"PK\x03\x04truncated zip"],
    ids=["empty", "garbage", "truncated-zip"],
)
def test_a_malformed_medmnist_file_is_a_usage_error(tmp_path, content):
    file = tmp_path / "pneumoniamnist.npz"
    file.write_bytes(content)
    with pytest.raises(UsageError, match=r"could not read .*pneumoniamnist\.npz \(a MedMNIST file"):
        load_dataset("pneumoniamnist", tmp_path)


def _medmnist_with(tmp_path, num_labels: int = 1, **changes: np.ndarray) -> Path:
    """A valid MedMNIST file with some arrays replaced."""
    name = "chestmnist" if num_labels > 1 else "pneumoniamnist"
    source = write_medmnist(tmp_path / "valid.npz", num_labels=num_labels)
    with np.load(source) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays.update(changes)
    np.savez(tmp_path / f"{name}.npz", **arrays)
    return tmp_path / f"{name}.npz"


_IMAGES = np.random.default_rng(0).integers(0, 256, (20, 28, 28), dtype=np.uint8)
_LABELS = (np.arange(20) % 2).reshape(20, 1)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"train_images": _IMAGES.astype(np.float32) / 255}, "images must be uint8 .* got torch.float32"),
        ({"train_images": _IMAGES.astype(np.int64)}, "images must be uint8"),
        ({"train_labels": _LABELS[:15]}, "the train split has 20 images but 15 labels"),
        ({"train_labels": _LABELS + 6}, r"class ids must lie in \[0, 2\), got \[6, 7\]"),
        ({"train_labels": -_LABELS}, r"class ids must lie in \[0, 2\), got \[-1, 0\]"),
        ({"train_labels": np.hstack([_LABELS, _LABELS])}, "has 20 images but 40 labels"),
        ({"train_images": _IMAGES[:, :, :20]}, r"square with 1 channel\(s\), got shape \(20, 1, 28, 20\)"),
        ({"val_images": np.stack([_IMAGES[:6]] * 3, -1)}, r"val split: images must be square with 1"),
        ({"train_images": _IMAGES[:, 0]}, r"images must be \(N, H, W\) or \(N, H, W, 3\)"),
        ({"train_labels": np.array(["a"] * 20)}, "could not read .*pneumoniamnist.npz"),
        ({"train_images": _IMAGES[:0], "train_labels": _LABELS[:0]}, "the train split is empty"),
    ],
    ids=["float", "int64", "fewer-labels", "id-too-large", "negative-id", "two-columns",
         "not-square", "channels-differ", "2-d", "text-labels", "empty"],
)  # fmt: skip
def test_malformed_arrays_are_refused_naming_the_data(tmp_path, changes, message):
    file = _medmnist_with(tmp_path, **changes)
    with pytest.raises(UsageError, match=message) as err:
        load_dataset("pneumoniamnist", file)
    assert f"from {file}" in str(err.value) or str(file) in str(err.value)


def test_multilabel_rows_must_be_zero_one_of_every_label(tmp_path):
    rows = np.random.default_rng(1).integers(0, 2, (20, 14), dtype=np.uint8)
    for bad, message in (
        (rows * 3, r"0/1 rows of 14 labels.*values \[0, 3\]"),
        (rows[:, :13], r"shape \(20, 13\)"),
    ):
        with pytest.raises(UsageError, match=message):
            load_dataset("chestmnist", _medmnist_with(tmp_path, num_labels=14, train_labels=bad))
    wrong_set = (
        r"chestmnist data from .*: the train split: .* 0/1 rows of 14 labels, got shape \(20, 1\)"
    )
    with pytest.raises(UsageError, match=wrong_set):
        load_dataset("chestmnist", write_medmnist(tmp_path / "pneu.npz"))


def test_a_npy_array_instead_of_the_npz_is_a_usage_error(tmp_path):
    file = tmp_path / "x.npy"
    np.save(file, np.zeros(3))
    with pytest.raises(UsageError, match="a .npy array, not an .npz archive"):
        load_dataset("pneumoniamnist", file)


def test_a_truncated_cifar_pickle_is_a_usage_error(tmp_path):
    folder = write_cifar10(tmp_path)
    batch = folder / "data_batch_1"
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(UsageError, match=r"could not read .*data_batch_1 \(an official CIFAR"):
        load_dataset("cifar10", tmp_path)


def test_load_dataset_checks_argument_types():
    with pytest.raises(TypeError, match=r"image_size must be an int, got '16' \(str\)"):
        load_dataset("digits", image_size="16")
    with pytest.raises(ValueError, match=r"split_seed must be in \[0, 2\*\*32\)"):
        load_dataset("digits", split_seed=-1)


def test_data_dir_env_var(tmp_path, monkeypatch):
    write_medmnist(tmp_path / "pneumoniamnist.npz")
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert default_data_dir() == tmp_path
    assert len(load_dataset("pneumoniamnist").test) == 8


# -- CIFAR ------------------------------------------------------------------------------------


def test_cifar10_official_batches(tmp_path):
    write_cifar10(tmp_path)
    splits = load_dataset("cifar10", tmp_path, val_fraction=0.25)
    assert len(splits.train) + len(splits.val) == 20 and len(splits.test) == 10
    assert (
        splits.info.class_names[0] == "airplane"
        and splits.info.in_channels == 3
        and splits.info.flip
    )
    # Row layout: the R, G and B planes of a 32x32 image.
    row = cifar_rows(10, 99)[3]
    assert torch.equal(splits.test.images[3], torch.from_numpy(row.reshape(3, 32, 32)))
    assert int(splits.test.targets[3]) == 3
    # The folder itself is accepted too.
    assert len(load_dataset("cifar10", tmp_path / "cifar-10-batches-py").test) == 10


def test_cifar10_npz_subset_and_preference_for_the_official_folder(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    np.savez(
        tmp_path / "cifar10_subset.npz",
        x_train=x,
        y_train=np.arange(12) % 10,
        x_test=x[:5],
        y_test=np.arange(5),
        label_names=np.array(["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]),
    )
    splits = load_dataset("cifar10", tmp_path, val_fraction=0.25)
    assert len(splits.test) == 5 and splits.info.class_names[1] == "b"
    assert torch.equal(splits.test.images[2], torch.from_numpy(x[2]).permute(2, 0, 1))
    write_cifar10(tmp_path)
    assert len(load_dataset("cifar10", tmp_path).test) == 10  # the official folder wins


def test_cifar10_missing_names_the_release(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"cs\.toronto\.edu/~kriz/cifar\.html") as err:
        load_dataset("cifar10", tmp_path)
    assert "cifar-10-batches-py" in str(err.value)
    folder = write_cifar10(tmp_path)
    (folder / "data_batch_4").unlink()
    with pytest.raises(DataNotFoundError, match="data_batch_4"):
        load_dataset("cifar10", tmp_path)


def test_cifar100_fine_and_coarse(tmp_path):
    write_cifar100(tmp_path)
    fine = load_dataset("cifar100", tmp_path, val_fraction=0.25)
    coarse = load_dataset("cifar100-coarse", tmp_path, val_fraction=0.25)
    assert fine.info.num_classes == 100 and coarse.info.num_classes == 20
    assert fine.info.class_names[7] == "fine7" and coarse.info.class_names[3] == "coarse3"
    assert torch.equal(coarse.test.targets, fine.test.targets % 20)
    with pytest.raises(DataNotFoundError, match="cifar-100-python"):
        load_dataset("cifar100", tmp_path / "nowhere")


def test_cifar_pickles_cannot_run_code(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "data_batch_1"
    bad.write_bytes(pickle.dumps({b"data": Exploit()}, protocol=2))
    # The refusal is a malformed file for the user: a UsageError naming the file.
    with pytest.raises(
        UsageError, match=r"could not read .*data_batch_1 .*refusing to load .*print"
    ):
        read_cifar_pickle(bad)


# -- NIH ChestX-ray14 -------------------------------------------------------------------------


def test_nih_official_layout(tmp_path):
    findings = write_nih(tmp_path)
    splits = load_dataset("nih-chestxray14", tmp_path, image_size=16, val_fraction=0.34)
    info = splits.info
    assert info.task == "multilabel" and info.class_names == NIH_FINDINGS and info.in_channels == 1
    assert len(splits.test) == 6 and len(splits.train) + len(splits.val) == 18
    # The hold-out is by patient (the name's first 8 digits).
    patients = {
        split: {p.name[:8] for p in getattr(splits, split).paths} for split in ("train", "val")
    }
    assert patients["train"].isdisjoint(patients["val"]) and patients["val"]
    for i, path in enumerate(splits.test.paths):
        assert torch.equal(splits.test.targets[i], parse_findings(findings[path.name]))
    image, target = splits.test[0]
    assert image.shape == (1, 16, 16) and image.dtype == torch.float32 and target.shape == (14,)
    # The RGBA image reads as one channel too.
    for dataset in (splits.train_eval, splits.val):
        names = [p.name for p in dataset.paths]
        if "00000001_000.png" in names:
            assert dataset.load(names.index("00000001_000.png")).shape == (1, 16, 16)


def test_nih_labels():
    assert parse_findings("No Finding").sum() == 0
    target = parse_findings("Effusion|Hernia")
    assert target[NIH_FINDINGS.index("Effusion")] == 1 and target[13] == 1 and target.sum() == 2
    with pytest.raises(ValueError, match="unknown finding"):
        parse_findings("Fracture")


def test_nih_missing_files(tmp_path):
    with pytest.raises(DataNotFoundError, match="nihcc.app.box.com") as err:
        load_dataset("nih-chestxray14", tmp_path)
    assert "Data_Entry_2017.csv" in str(err.value)
    write_nih(tmp_path)
    next(tmp_path.glob("images_002/images/*.png")).unlink()
    with pytest.raises(DataNotFoundError, match="1 of .* images listed"):
        load_dataset("nih-chestxray14", tmp_path)
    whole = tmp_path / "whole"
    write_nih(whole)
    (whole / "test_list.txt").write_text("")
    with pytest.raises(UsageError, match="test_list.txt lists no images"):
        load_dataset("nih-chestxray14", whole)
    csv_file = whole / "Data_Entry_2017.csv"
    with pytest.raises(DataNotFoundError, match=f"{csv_file} is a file, and this data set is read"):
        load_dataset("nih-chestxray14", csv_file)


def test_an_unreadable_data_folder_is_a_usage_error(tmp_path, monkeypatch):
    """Path.is_file raises EACCES inside a folder the user cannot search (root never sees it:
    simulated)."""

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "is_file", denied)
    with pytest.raises(UsageError, match=r"pneumoniamnist data: cannot read .*: permission denied"):
        load_dataset("pneumoniamnist", tmp_path)


def test_a_folder_with_one_sized_medmnist_file_uses_it(tmp_path):
    write_medmnist(tmp_path / "pneumoniamnist_64.npz", side=64)
    assert load_dataset("pneumoniamnist", tmp_path).info.image_size == 64
    write_medmnist(tmp_path / "pneumoniamnist_128.npz", side=128)
    with pytest.raises(
        UsageError, match="holds pneumoniamnist_128.npz, pneumoniamnist_64.npz: pass"
    ):
        load_dataset("pneumoniamnist", tmp_path)
    write_medmnist(tmp_path / "pneumoniamnist.npz")
    assert load_dataset("pneumoniamnist", tmp_path).info.image_size == 28
    with pytest.raises(TypeError, match="data_dir must be a path .* got int"):
        load_dataset("digits", 123)


# -- digit-mosaic -----------------------------------------------------------------------------


def test_mosaic_label_statistics():
    splits = load_dataset("digit-mosaic", n_train=1000, n_val=100, n_test=200)
    y = splits.train.targets
    assert y.shape == (1000, 10) and splits.info.task == "multilabel"
    per_image = y.sum(1)
    assert int((per_image == 0).sum()) == 540  # exactly the chest-X-ray-like 54% "no finding"
    assert int((per_image >= 2).sum()) == 180  # 18% multi-label
    assert int((per_image == 1).sum()) == 280 and int(per_image.max()) <= 4
    # Multi-label images mostly carry two findings, as in NIH.
    multi = per_image[per_image >= 2]
    assert (multi == 2).float().mean() > 0.5
    # Long-tailed digit frequencies: digit 0 far more common than digit 9.
    freq = y.sum(0)
    assert freq[0] > 4 * freq[9] and freq[:5].sum() > freq[5:].sum()


def test_mosaic_cells_match_labels_and_are_deterministic():
    images, labels = digit_arrays()
    cells = torch.nn.functional.interpolate(images.float(), size=16).to(torch.uint8)
    stats = MosaicStats(empty_fraction=0.25, multi_fraction=0.5, imbalance=3.0)
    a = make_digit_mosaic(cells, labels, 200, stats, seed=7)
    b = make_digit_mosaic(cells, labels, 200, stats, seed=7)
    c = make_digit_mosaic(cells, labels, 200, stats, seed=8)
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.images, c.images)
    # Every digit sits in its own cell: non-empty cells == number of labels.
    quads = a.images.unflatten(2, (2, 16)).unflatten(4, (2, 16))  # N, 1, 2, 16, 2, 16
    filled = (quads.amax(dim=(1, 3, 5)) > 0).sum(dim=(1, 2))
    assert torch.equal(filled, a.targets.sum(1).long())
    assert int((a.targets.sum(1) == 0).sum()) == 50


def test_mosaic_splits_use_disjoint_digit_pools_and_validate():
    prior = class_prior(10.0)
    assert prior[0] / prior[9] == pytest.approx(10.0) and prior.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="empty_fraction"):
        load_dataset("digit-mosaic", empty_fraction=1.2)
    with pytest.raises(ValueError, match=r"empty_fraction \+ multi_fraction"):
        MosaicStats(empty_fraction=0.7, multi_fraction=0.5)
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("digit-mosaic", image_size=7)
    small = load_dataset("digit-mosaic", n_train=50, n_val=10, n_test=20, image_size=16)
    assert small.test.images.shape == (20, 1, 16, 16)


# -- the real shared files --------------------------------------------------------------------


@pytest.mark.skipif(
    not (SHARED_DATA / "pneumoniamnist.npz").is_file(),
    reason=f"no {SHARED_DATA}/pneumoniamnist.npz",
)
def test_real_pneumoniamnist():
    splits = load_dataset("pneumoniamnist", SHARED_DATA)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (3882, 524, 624)
    assert int(splits.train.targets.sum()) == 3494  # README: 3,494 pneumonia / 388 normal


@pytest.mark.skipif(
    not (SHARED_DATA / "cifar10_subset.npz").is_file(),
    reason=f"no {SHARED_DATA}/cifar10_subset.npz",
)
def test_real_cifar10_subset():
    splits = load_dataset("cifar10", SHARED_DATA)
    assert len(splits.train) + len(splits.val) == 5438 and len(splits.test) == 1017
    assert splits.info.class_names[:2] == ("airplane", "automobile")


def test_the_own_data_and_model_example_of_the_docs_runs(monkeypatch, capsys):
    """docs/data.md's example as a user pastes it: DataSplits of TensorDatasets, a torchvision
    network registered as a model, the ensemble run on them (and the registry left as it was)."""
    import re

    from labelkit_ext.models import registry

    monkeypatch.setattr(registry, "MODELS", dict(registry.MODELS))
    doc = (Path(__file__).resolve().parent.parent / "docs" / "data.md").read_text()
    code = re.search(r"## Your own data and model.*?```python\n(.*?)```", doc, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "docs/data.md", "exec"), namespace)
    fit = namespace["fit"]
    assert fit.results["config"]["model"] == "mobilenet-v3-small"
    assert fit.results["dataset"]["name"] == "my-xrays"
    assert "num_clusters" in capsys.readouterr().out  # the printed selection
    with pytest.raises(ValueError, match="exists already: pass replace=True"):
        registry.register_model(registry.MODELS["mobilenet-v3-small"])
    not_wrapped = registry.ModelSpec(
        "plain", "no Classifier", lambda c, ch, small: torch.nn.Linear(2, c)
    )
    registry.register_model(not_wrapped)
    with pytest.raises(TypeError, match="not a Classifier"):
        registry.build_model("plain", 3)
