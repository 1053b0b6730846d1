"""Coarse-to-fine curriculum: the task builders on hand-made label matrices, co-occurrence
super-classes, schedules and the equal step budget, the stage stream, weight transfer, the
target AUC against scikit-learn, the paired test against a hand-computed t, and the method end
to end (Python API on digit-mosaic, the CLI on an NIH-layout fixture)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from fixtures_data import write_nih
from scipy import stats
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader, TensorDataset

from labelkit_ext.cli import main
from labelkit_ext.data import load_dataset
from labelkit_ext.engine import TrainConfig, fit, seed_everything
from labelkit_ext.methods.curriculum import (
    SCHEDULES,
    CurriculumConfig,
    StageStream,
    allocate_steps,
    binary_task,
    budget_from_epochs,
    build_task,
    cooccurrence_groups,
    cooccurrence_similarity,
    default_num_superclasses,
    findings_matrix,
    fit_curriculum,
    multiclass_task,
    multilabel_task,
    paired_test,
    parse_schedule,
    replace_head,
    superclass_task,
    target_auc,
)
from labelkit_ext.models import Classifier, build_model

# Five findings A..E over eight images. Row 0 and 5 have no finding; rows 1, 2, 6 exactly one;
# rows 3, 4, 7 several. E never occurs alone (only with D), D and E always together.
Y = torch.tensor(
    [
        [0, 0, 0, 0, 0],
        [1, 0, 0, 0, 0],
        [0, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 0, 1, 1],
        [0, 0, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 1, 1, 1, 1],
    ],
    dtype=torch.float32,
)
NAMES = ("A", "B", "C", "D", "E")
QUIET_CPU = {"device": "cpu", "quiet": True}


# -- label matrix ---------------------------------------------------------------------------------


def test_findings_matrix_without_a_no_finding_column_keeps_all_zero_rows():
    findings, names = findings_matrix(Y.numpy().astype(np.uint8), NAMES)
    assert torch.equal(findings, Y) and findings.dtype == torch.float32 and names == NAMES


@pytest.mark.parametrize("no_finding", ["No Finding", 2])
def test_findings_matrix_drops_an_explicit_no_finding_column(no_finding):
    healthy = (Y.sum(1) == 0).float().unsqueeze(1)
    labels = torch.cat([Y[:, :2], healthy, Y[:, 2:]], dim=1)  # "No Finding" in the middle
    names = ("A", "B", "No Finding", "C", "D", "E")
    findings, kept = findings_matrix(labels, names, no_finding=no_finding)
    assert torch.equal(findings, Y) and kept == NAMES


def test_findings_matrix_rejects_bad_labels():
    healthy = (Y.sum(1) == 0).float().unsqueeze(1)
    labels = torch.cat([Y, healthy], dim=1)
    names = (*NAMES, "No Finding")
    contradictory = labels.clone()
    contradictory[1, 5] = 1  # a finding and "no finding"
    with pytest.raises(
        ValueError, match=r"1 label rows say both 'no finding' and a finding, e.g. rows \[1\]"
    ):
        findings_matrix(contradictory, names, "No Finding")
    unlabelled = labels.clone()
    unlabelled[0, 5] = 0
    with pytest.raises(ValueError, match="neither 'no finding' nor a finding"):
        findings_matrix(unlabelled, names, "No Finding")
    with pytest.raises(ValueError, match="not one of the class names"):
        findings_matrix(labels, names, "Normal")
    with pytest.raises(ValueError, match=r"outside \[0, 6\)"):
        findings_matrix(labels, names, 6)
    with pytest.raises(ValueError, match="only 0 and 1"):
        findings_matrix(Y * 2)
    with pytest.raises(ValueError, match="2-D"):
        findings_matrix(Y[0])
    with pytest.raises(ValueError, match="class_names has 4 names for 5"):
        findings_matrix(Y, NAMES[:4])


# -- task builders --------------------------------------------------------------------------------


def test_binary_task_covers_every_image():
    task = binary_task(Y)
    assert len(task) == 8 and torch.equal(task.rows, torch.arange(8))
    assert task.targets.tolist() == [0, 1, 1, 1, 1, 0, 1, 1]
    assert task.class_counts() == [2, 6] and task.engine_task == "multiclass"
    assert task.class_names == ("no finding", "any finding")


def test_multiclass_task_keeps_only_single_finding_images():
    task = multiclass_task(Y, NAMES)
    assert task.rows.tolist() == [1, 2, 6]
    assert task.targets.tolist() == [0, 1, 2]
    # D and E never occur alone: their outputs stay (the head covers every finding), unused.
    assert task.num_outputs == 5 and task.class_counts() == [1, 1, 1, 0, 0]
    with pytest.raises(ValueError, match="no image carries exactly one finding"):
        multiclass_task(Y[[0, 3, 4, 5, 7]])


def test_superclass_task_keeps_images_within_one_group():
    groups = torch.tensor([0, 0, 1, 2, 2])  # {A, B}, {C}, {D, E}
    task = superclass_task(Y, groups, NAMES)
    # 1 (A), 2 (B), 3 (A+B), 4 (D+E), 6 (C) lie in one group; 7 (B, C, D, E) spans three.
    assert task.rows.tolist() == [1, 2, 3, 4, 6]
    assert task.targets.tolist() == [0, 0, 0, 2, 1]
    assert task.class_names == ("A+B", "C", "D+E") and task.class_counts() == [3, 1, 1]
    with pytest.raises(ValueError, match="one super-class id per finding"):
        superclass_task(Y, [0, 1], NAMES)
    with pytest.raises(ValueError, match="every id 0..G-1 with G >= 2"):
        superclass_task(Y, [0, 0, 2, 2, 2], NAMES)
    with pytest.raises(ValueError, match="needs groups"):
        build_task("superclass", Y)


def test_multilabel_task_is_every_image_and_label():
    task = multilabel_task(Y, NAMES)
    assert torch.equal(task.targets, Y) and len(task) == 8
    assert task.class_counts() == [2, 3, 2, 2, 2]
    with pytest.raises(ValueError, match="task kind must be one of"):
        build_task("coarse", Y)


def test_finding_scores_map_each_head_to_the_findings():
    logits = torch.randn(8, 2, dtype=torch.float32)
    any_finding = logits.softmax(1)[:, 1]
    scores = binary_task(Y).finding_scores(logits)
    assert scores.shape == (8, 5)
    torch.testing.assert_close(scores, any_finding.unsqueeze(1).expand(8, 5))
    groups = torch.tensor([0, 0, 1, 2, 2])
    logits = torch.randn(8, 3)
    scores = superclass_task(Y, groups, NAMES).finding_scores(logits)
    torch.testing.assert_close(scores, logits.softmax(1)[:, groups])
    logits = torch.randn(8, 5)
    torch.testing.assert_close(multilabel_task(Y).finding_scores(logits), logits.sigmoid())
    torch.testing.assert_close(multiclass_task(Y).finding_scores(logits), logits.softmax(1))
    with pytest.raises(ValueError, match=r"logits must be \(N, 2\) for the binary task"):
        binary_task(Y).finding_scores(logits)


# -- co-occurrence super-classes ------------------------------------------------------------------


def test_cooccurrence_similarity_against_a_loop():
    y = Y.numpy()
    sim = cooccurrence_similarity(Y).numpy()
    for i in range(5):
        for j in range(5):
            together = sum(y[n, i] * y[n, j] for n in range(8))
            expected = 1.0 if i == j else together / math.sqrt(y[:, i].sum() * y[:, j].sum())
            assert sim[i, j] == pytest.approx(expected)
    never = torch.cat([Y, torch.zeros(8, 1)], dim=1)  # a finding that never occurs
    sim = cooccurrence_similarity(never)
    assert torch.all(sim[5, :5] == 0) and sim[5, 5] == 1


def test_cooccurrence_groups_join_findings_that_occur_together():
    rng = np.random.default_rng(0)
    # 6 findings in two blocks that co-occur within the block only.
    rows = []
    for _ in range(200):
        block = rng.integers(0, 2)
        row = np.zeros(6)
        row[3 * block + rng.choice(3, size=rng.integers(1, 4), replace=False)] = 1
        rows.append(row)
    y = torch.tensor(np.array(rows), dtype=torch.float32)
    groups = cooccurrence_groups(y, 2)
    assert groups.tolist() == [0, 0, 0, 1, 1, 1]
    assert cooccurrence_groups(Y, 3).tolist() == cooccurrence_groups(Y, 3).tolist()
    assert cooccurrence_groups(Y, 3)[0] == 0
    assert cooccurrence_groups(Y, 2)[3] == cooccurrence_groups(Y, 2)[4]  # D, E always together
    for bad in (1, 5):
        with pytest.raises(ValueError, match=r"num_superclasses must be in \[2, 4\]"):
            cooccurrence_groups(Y, bad)
    assert default_num_superclasses(10) == 3 and default_num_superclasses(14) == 4
    assert default_num_superclasses(3) == 2


# -- schedules and the step budget ----------------------------------------------------------------


def test_parse_schedule():
    assert parse_schedule("default") == ("multilabel",)
    assert parse_schedule("1-stage") == ("multiclass", "multilabel")
    assert parse_schedule("2-stage") == ("binary", "multiclass", "multilabel")
    assert parse_schedule("3-stage") == ("binary", "superclass", "multiclass", "multilabel")
    assert parse_schedule("binary, superclass,multilabel") == ("binary", "superclass", "multilabel")
    assert parse_schedule(["binary", "multilabel"]) == ("binary", "multilabel")
    with pytest.raises(ValueError, match="unknown: \\['coarse'\\]"):
        parse_schedule("coarse,multilabel")
    for bad in ("multilabel,binary", "binary,binary,multilabel", ""):
        with pytest.raises(ValueError, match="schedule"):
            parse_schedule(bad)


@pytest.mark.parametrize(
    "total,every,share", [(120, 10, 0.4), (96, 8, 0.25), (7, 1, 0.5), (40, 4, 0.9)]
)
def test_allocate_steps_gives_every_schedule_the_same_budget(total, every, share):
    for stages in SCHEDULES.values():
        steps = allocate_steps(len(stages), total, every, share)
        assert len(steps) == len(stages) and sum(steps) == total
        assert all(s >= every and s % every == 0 for s in steps)
        if len(stages) > 1:  # the target's share is the same for every curriculum
            target = steps[-1] // every
            chunks = total // every
            aux = min(max(round(share * chunks), len(stages) - 1), chunks - 1)
            assert target == chunks - aux
            assert max(steps[:-1]) - min(steps[:-1]) <= every  # auxiliary stages split evenly
    assert allocate_steps(3, 120, 10, 0.4) == [30, 20, 70]  # 5 aux chunks: 3, 2
    assert allocate_steps(4, 120, 10, 0.4) == [20, 20, 10, 70]  # 5 aux chunks: 2, 2, 1


def test_allocate_steps_errors():
    with pytest.raises(ValueError, match="must be a multiple of eval_every"):
        allocate_steps(2, 100, 30)
    with pytest.raises(ValueError, match="cannot give each of 4 stages one"):
        allocate_steps(4, 30, 10)
    with pytest.raises(ValueError, match=r"aux_share must be in \(0, 1\)"):
        allocate_steps(2, 100, 10, 1.0)
    with pytest.raises(ValueError, match="num_stages must be >= 1"):
        allocate_steps(0, 100, 10)


def test_budget_from_epochs():
    # 3000 images, batch 64: 47 steps an epoch; 2 evaluations an epoch: chunks of 24.
    assert budget_from_epochs(3000, 64, 6, 2) == (288, 24)
    assert budget_from_epochs(10, 4, 1, 1) == (3, 3)
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        budget_from_epochs(10, 4, 0)


def test_stage_stream_is_exact_steps_over_fresh_passes():
    images = torch.arange(20, dtype=torch.float32).reshape(20, 1)
    base = TensorDataset(images, torch.zeros(20))
    rows = torch.tensor([1, 4, 6, 9, 11, 15, 17])  # a 7-image task
    targets = torch.arange(7) * 10
    stream = StageStream(base, rows, targets, items_per_epoch=6, seed=3)
    assert len(stream) == 6
    seen = []
    for epoch in range(7):  # 42 items = 6 passes over the 7 rows
        stream.set_epoch(epoch)
        items = [stream[i] for i in range(6)]
        for image, target in items:  # the image of the row, with the task's label
            j = int(target) // 10
            assert int(image) == int(rows[j])
        seen += [int(t) // 10 for _, t in items]
    for p in range(6):  # every pass is a permutation of the task's rows
        assert sorted(seen[7 * p : 7 * (p + 1)]) == list(range(7))
    assert seen[:7] != seen[7:14]  # a fresh order per pass
    stream.set_epoch(0)
    again = [int(stream[i][1]) // 10 for i in range(6)]
    assert again == seen[:6]  # deterministic in (seed, epoch)
    loader = DataLoader(stream, batch_size=3, shuffle=True)
    assert len(list(loader)) == 2  # items_per_epoch = steps * batch size: exactly 2 steps
    with pytest.raises(IndexError):
        stream[6]
    with pytest.raises(ValueError, match="at least one training image"):
        StageStream(base, rows[:0], targets[:0], 6, 0)


def test_fit_tells_the_training_set_its_epoch_also_on_resume(tmp_path):
    class Recording(TensorDataset):
        def __init__(self, *tensors):
            super().__init__(*tensors)
            self.epochs = []

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

    def crash_after_first(end):
        if end.epoch == 1:
            raise KeyboardInterrupt

    data = Recording(torch.randn(8, 1, 8, 8), torch.randint(0, 2, (8,)))
    config = TrainConfig(epochs=3, batch_size=4, **QUIET_CPU)
    with pytest.raises(KeyboardInterrupt):  # stopped after epoch 1's checkpoint
        fit(
            _tiny(2),
            data,
            None,
            "multiclass",
            config,
            out_dir=tmp_path,
            callbacks=[crash_after_first],
        )
    assert data.epochs == [0]
    fit(_tiny(2), data, None, "multiclass", config, out_dir=tmp_path, resume=True)
    assert data.epochs == [0, 1, 2]  # the resumed run goes on at epoch 1


# -- weight transfer ------------------------------------------------------------------------------


def _tiny(classes: int, seed: int = 0) -> Classifier:
    seed_everything(seed)
    return build_model("small-cnn", classes, in_channels=1, image_size=8, width=4)


def test_replace_head_keeps_the_backbone_and_replaces_the_head():
    model = _tiny(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new = replace_head(model, 5, seed=1)
    assert new.num_classes == 5 and new.classifier.in_features == model.feature_dim
    for key, value in new.features.state_dict().items():
        assert torch.equal(value, before[f"features.{key}"]), key
    assert new.features is not model.features  # a copy: training it leaves the old stage alone
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.num_classes == 2
    x = torch.randn(3, 1, 8, 8)
    model.eval(), new.eval()
    torch.testing.assert_close(new.embed(x), model.embed(x))
    again = replace_head(model, 5, seed=1)
    assert torch.equal(again.classifier.weight, new.classifier.weight)  # seeded
    assert not torch.equal(replace_head(model, 5, seed=2).classifier.weight, new.classifier.weight)


# -- metrics and the paired test ------------------------------------------------------------------


def test_target_auc_matches_scikit_learn():
    rng = np.random.default_rng(1)
    y = torch.tensor(rng.random((60, 5)) < 0.3, dtype=torch.float32)
    logits = torch.randn(60, 5) + 1.5 * y
    auc = target_auc(multilabel_task(y), logits, y)
    expected = roc_auc_score(y.numpy(), logits.sigmoid().numpy(), average=None)
    np.testing.assert_allclose(auc["per_class_auc"], expected, rtol=1e-12)
    assert auc["auc"] == pytest.approx(roc_auc_score(y.numpy(), logits.numpy(), average="macro"))
    # The binary head scores every finding by P(any finding).
    logits2 = torch.randn(60, 2)
    auc = target_auc(binary_task(y), logits2, y)
    p_any = logits2.softmax(1)[:, 1].numpy()
    expected = [roc_auc_score(y[:, k].numpy(), p_any) for k in range(5)]
    np.testing.assert_allclose(auc["per_class_auc"], expected, rtol=1e-12)


def test_paired_test_against_a_hand_computed_t():
    a, b = [0.80, 0.83, 0.79, 0.84], [0.78, 0.80, 0.79, 0.81]
    d = np.subtract(a, b)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    result = paired_test(a, b)
    assert result["t"] == pytest.approx(t) and result["n"] == 4
    assert result["p"] == pytest.approx(2 * stats.t.sf(abs(t), df=3))
    assert result["mean_difference"] == pytest.approx(d.mean())
    assert paired_test([0.8], [0.7])["p"] is None  # one pair: undefined
    assert paired_test([0.8, 0.9], [0.7, 0.8])["p"] is None  # identical differences
    with pytest.raises(ValueError, match="equally long"):
        paired_test([0.8, 0.9], [0.7])


def test_summary_of_one_seed_has_no_std():
    """A sample std of one seed is undefined: null in results.json, no "± 0.00" in the table."""
    from labelkit_ext.methods.curriculum.report import schedule_table, summarise_runs

    def run(schedule, seed, auc):
        metrics = {"auc": auc, "per_class_auc": {"a": auc}}
        return {"schedule": schedule, "seed": seed, "val": metrics, "test": metrics}

    one = summarise_runs([run("1-stage", 0, 0.8), run("default", 0, 0.9)],
                         ["1-stage", "default"], "1-stage", ["a"])  # fmt: skip
    assert one["default"]["test_auc_std"] is None and one["default"]["val_auc_std"] is None
    schedules = {n: {"stages": [n], "steps": [10]} for n in ("1-stage", "default")}
    table = schedule_table(one, schedules, "1-stage")
    assert "90.00" in table and "±" not in table
    two = summarise_runs([run("1-stage", s, 0.8) for s in (0, 1)] +
                         [run("default", 0, 0.9), run("default", 1, 0.7)],
                         ["1-stage", "default"], "1-stage", ["a"])  # fmt: skip
    assert two["default"]["test_auc_std"] == pytest.approx(np.std([0.9, 0.7], ddof=1))
    assert "80.00 ± 14.14" in schedule_table(two, schedules, "1-stage")


# -- end to end -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mosaic8():
    return load_dataset("digit-mosaic", image_size=8, n_train=240, n_val=120, n_test=120)


def _count_train_steps():
    """A global forward hook counting the Classifier forwards in training mode (one per step)."""
    calls = []

    def hook(module, args, output):
        if isinstance(module, Classifier) and module.training:
            calls.append(output.shape[1])

    return calls, torch.nn.modules.module.register_module_forward_hook(hook)


@pytest.mark.filterwarnings("ignore:the target stage trains for unequal steps")  # pinned once
def test_fit_curriculum_equal_budgets_and_results(mosaic8, tmp_path):
    config = CurriculumConfig(
        total_steps=12, eval_every=2, schedules=("default", "2-stage", "3-stage"), seeds=(0, 1)
    )
    train = TrainConfig(batch_size=16, lr=0.05, **QUIET_CPU)
    calls, handle = _count_train_steps()
    # 6 chunks: 3-stage's three auxiliary chunks exceed 0.4 of them, so its target trains less
    unequal = r"target stage trains for unequal steps \(2-stage 8, 3-stage 6\): with 6 chunks"
    try:
        with pytest.warns(UserWarning, match=unequal):
            fitted = fit_curriculum(
                mosaic8, config, train, model_kwargs={"width": 4}, out_dir=tmp_path / "run"
            )
    finally:
        handle.remove()
    results = fitted.results
    # Every (schedule, seed) took exactly 12 steps: 6 runs; the heads' sizes show the stages.
    assert len(calls) == 6 * 12
    plan = results["schedules"]
    assert plan["default"] == {"stages": ["multilabel"], "steps": [12]}
    assert plan["2-stage"]["steps"] == [2, 2, 8] and plan["3-stage"]["steps"] == [2, 2, 2, 6]
    per_run = [calls[i : i + 12] for i in range(0, len(calls), 12)]
    assert per_run[0] == [10] * 12  # seed 0, default
    assert per_run[1] == [2] * 2 + [10] * 2 + [10] * 8  # 2-stage: binary, multiclass, multilabel
    assert per_run[2] == [2] * 2 + [3] * 2 + [10] * 2 + [10] * 6  # 3 super-classes
    for run in results["runs"]:
        assert [p["step"] for p in run["curve"]] == list(range(2, 13, 2))
        assert sum(t["steps"] for t in run["tasks"]) == 12
        # The last curve point is the final model's val mean AUC.
        assert run["curve"][-1]["val_target_auc"] == pytest.approx(run["val"]["auc"], abs=1e-6)
        aucs = [v for v in run["test"]["per_class_auc"].values() if v is not None]
        assert run["test"]["auc"] == pytest.approx(np.mean(aucs))
    # The same seed gives every schedule the same initial backbone and is reproducible.
    summary = results["summary"]
    assert summary["default"]["seeds"] == [0, 1] and summary["default"]["improvement_points"] == 0
    for schedule in ("2-stage", "3-stage"):
        s = summary[schedule]
        assert s["improvement_points"] == pytest.approx(
            100 * (s["test_auc_mean"] - summary["default"]["test_auc_mean"])
        )
        paired = s["paired_vs_reference"]
        expected = stats.ttest_rel(s["test_auc"], summary["default"]["test_auc"])
        assert paired["p"] == pytest.approx(expected.pvalue)
    assert (
        results["superclasses"]["groups"][0] == 0 and len(results["superclasses"]["members"]) == 3
    )
    tasks = results["tasks"]
    assert tasks["binary"]["images"] == tasks["multilabel"]["images"] == 240
    y = mosaic8.train.targets
    assert tasks["multiclass"]["images"] == int((y.sum(1) == 1).sum())
    assert tasks["multiclass"]["class_counts"] == y[y.sum(1) == 1].sum(0).int().tolist()
    for plot in ("auc_curve.png", "per_finding_auc.png"):
        assert (tmp_path / "run" / plot).read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["summary"]["2-stage"]["test_auc"] == summary["2-stage"]["test_auc"]
    assert (
        tmp_path / "run" / "2-stage" / "seed1" / "stage1-multiclass" / "checkpoint_last.pt"
    ).is_file()

    # Resuming finished runs trains nothing and gives the same results.
    calls, handle = _count_train_steps()
    try:
        again = fit_curriculum(
            mosaic8, config, train, model_kwargs={"width": 4}, out_dir=tmp_path / "run", resume=True
        )
    finally:
        handle.remove()
    assert calls == []
    for a, b in zip(again.results["runs"], results["runs"], strict=True):
        assert a["test"]["auc"] == pytest.approx(b["test"]["auc"], abs=1e-7)
        assert [p["step"] for p in a["curve"]] == [p["step"] for p in b["curve"]]
    # Validated every 3 steps instead of 2: named by the options, not as the stage's "epochs".
    with pytest.raises(ValueError, match=r"\(validation chunks of the stage \(from --epochs, "
                       r"--evals-per-epoch, --aux-share\)=6 -> 4, samples per chunk"):  # fmt: skip
        fit_curriculum(mosaic8, CurriculumConfig(12, 3, schedules=("default",), seeds=(0,)),
                       train, model_kwargs={"width": 4}, out_dir=tmp_path / "run", resume=True)  # fmt: skip
    # Another split of the images: finished stages are not rescored on images they saw.
    other = load_dataset("digit-mosaic", image_size=8, n_train=240, n_val=120, n_test=120,
                         split_seed=1)  # fmt: skip
    with pytest.raises(ValueError, match=r"\(other training samples or order \(another "):
        fit_curriculum(other, config, train, model_kwargs={"width": 4},
                       out_dir=tmp_path / "run", resume=True)  # fmt: skip


def test_fit_curriculum_checks_before_training(mosaic8):
    with pytest.raises(ValueError, match="multi-label data set"):
        fit_curriculum(load_dataset("digits", image_size=8), CurriculumConfig(8, 2))
    with pytest.raises(ValueError, match="cannot give each of 4 stages one"):
        CurriculumConfig(4, 2, schedules=("default", "3-stage"))
    with pytest.raises(ValueError, match="seeds must be distinct"):
        CurriculumConfig(4, 2, seeds=(0, 0))
    with pytest.raises(ValueError, match="unknown"):
        CurriculumConfig(4, 2, schedules=("default", "binary,coarse,multilabel"))


def test_run_curriculum_cli_on_nih_layout(tmp_path, capsys):
    write_nih(tmp_path / "nih", patients=10, per_patient=4)
    out = tmp_path / "run"
    argv = ["run", "curriculum", "--dataset", "nih-chestxray14", "--data-dir", str(tmp_path / "nih"),
            "--image-size", "16", "--epochs", "2", "--batch-size", "8", "--evals-per-epoch", "2",
            "--num-seeds", "2", "--schedules", "default", "2-stage", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "curriculum | nih-chestxray14 | small-cnn" in printed
    assert "binary > multiclass > multilabel" in printed and "paired p" in printed
    assert "Atelectasis" in printed  # the per-finding table
    results = json.loads((out / "results.json").read_text())
    assert results["findings"][0] == "Atelectasis" and len(results["findings"]) == 14
    budget = results["config"]["curriculum"]
    assert budget["seeds"] == [0, 1] and budget["total_steps"] % budget["eval_every"] == 0
    assert {r["schedule"] for r in results["runs"]} == {"default", "2-stage"}
    assert all(sum(r["steps"]) == budget["total_steps"] for r in results["runs"])
    assert results["dataset"]["sizes"]["test"] == 8  # patients 9 and 10, 4 images each
    assert main([*argv[:-2], "--schedules", "default", "bogus", "--out", str(out)]) == 2
    assert "must be one of" in capsys.readouterr().err
    # (one stage: a budget of 1 epoch x 2 validations is checked, and refused, before the data)
    assert main([*argv[:2], "--dataset", "digits", "--image-size", "8", "--epochs", "1",
                 "--num-seeds", "1", "--schedules", "1-stage",
                 "--out", str(tmp_path / "d")]) == 2  # fmt: skip
    assert "multi-label data set" in capsys.readouterr().err
