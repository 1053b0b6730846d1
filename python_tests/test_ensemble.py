"""Label-embedding stacking ensemble: each step (embeddings, clustering, routing, the grid,
sub-classifiers) against hand-computed values, then the method end to end through the CLI."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from labelkit_ext.cli import main
from labelkit_ext.data import ArraySplit, TensorImageDataset, load_dataset
from labelkit_ext.engine import TrainConfig, predict, save_checkpoint, seed_everything
from labelkit_ext.methods.ensemble import (
    ClusterRestricted,
    GridPoint,
    LabelEmbeddingEnsemble,
    cluster_grid_for,
    cluster_members,
    cluster_subset,
    cosine_similarity,
    default_cluster_grid,
    fine_tune_subclassifiers,
    fit_ensemble,
    hard_route,
    label_embeddings,
    load_baseline,
    mask_to_clusters,
    mix_subclassifiers,
    paired_comparison,
    per_cluster_rows,
    route_nothing_threshold,
    search_grid,
    select_best,
    similarity_to_affinity,
    soft_route,
    spectral_clusters,
    threshold_grid,
)
from labelkit_ext.methods.supervised import fit_supervised
from labelkit_ext.models import build_model

LN = math.log
QUIET_CPU = {"batch_size": 64, "device": "cpu", "quiet": True}


@pytest.fixture(scope="module")
def digits8():
    return load_dataset("digits", image_size=8)


def _tiny_model(seed: int, classes: int = 10) -> torch.nn.Module:
    seed_everything(seed)
    return build_model("small-cnn", classes, in_channels=1, image_size=8, width=4)


# -- label embeddings and similarity ------------------------------------------------------------


def test_label_embeddings_are_the_final_weight_matrix():
    model = _tiny_model(0, classes=7)
    emb = label_embeddings(model)
    assert emb.shape == (7, model.feature_dim) and emb.dtype == torch.float32
    assert torch.equal(emb, model.classifier.weight.detach())
    emb.zero_()  # a copy: the model's weights are untouched
    assert model.classifier.weight.abs().sum() > 0


def test_cosine_similarity_against_numpy():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(6, 5))
    expected = (emb @ emb.T) / np.outer(np.linalg.norm(emb, axis=1), np.linalg.norm(emb, axis=1))
    sim = cosine_similarity(torch.from_numpy(emb).float())
    np.testing.assert_allclose(sim.numpy(), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(sim, sim.T) and torch.all(sim.diagonal() > 1 - 1e-6)
    with pytest.raises(ValueError, match="embeddings must be"):
        cosine_similarity(torch.zeros(5))


def test_affinity_maps_cosine_onto_zero_one():
    sim = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.5], [0.0, 0.5, 1.0]])
    expected = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.75], [0.5, 0.75, 1.0]])
    np.testing.assert_array_equal(similarity_to_affinity(sim), expected)


# -- clustering ---------------------------------------------------------------------------------


def _planted_embeddings(seed: int = 0) -> torch.Tensor:
    """9 classes in 3 planted groups, interleaved: class c belongs to group c % 3."""
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(16, 3)))[0].T * 5.0  # orthogonal directions
    return torch.from_numpy(centres[np.arange(9) % 3] + rng.normal(scale=0.3, size=(9, 16)))


def test_spectral_clusters_recover_planted_groups_in_canonical_order():
    sim = cosine_similarity(_planted_embeddings())
    clusters = spectral_clusters(sim, 3, seed=0)
    assert clusters.dtype == torch.int64
    # Numbered by each cluster's smallest class: class 0 -> 0, class 1 -> 1, class 2 -> 2.
    assert clusters.tolist() == [0, 1, 2] * 3
    assert cluster_members(clusters) == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]


def test_spectral_clusters_are_deterministic_for_a_seed():
    rng = np.random.default_rng(1)
    sim = cosine_similarity(torch.from_numpy(rng.normal(size=(12, 8))))  # no clear structure
    for s in (2, 4, 5):
        first = spectral_clusters(sim, s, seed=3)
        assert torch.equal(first, spectral_clusters(sim, s, seed=3))
        assert sorted(set(first.tolist())) == list(range(s))


@pytest.mark.parametrize(
    ("num_clusters", "message"),
    [(1, "num_clusters must be >= 2"), (9, "num_clusters must be < the number of classes"),
     (12, "num_clusters must be < the number of classes"), (2.0, "num_clusters must be an int")],
)  # fmt: skip
def test_spectral_clusters_reject_bad_num_clusters(num_clusters, message):
    sim = cosine_similarity(_planted_embeddings())
    with pytest.raises(ValueError, match=message):
        spectral_clusters(sim, num_clusters)
    with pytest.raises(ValueError, match="similarity must be square"):
        spectral_clusters(sim[:4], 2)


def test_cluster_grids():
    assert default_cluster_grid(10) == [2, 3, 4]
    assert default_cluster_grid(100) == [6, 9, 12]
    assert default_cluster_grid(20) == [3, 4, 5]
    assert default_cluster_grid(3) == [2]
    with pytest.raises(ValueError, match="at least 3 classes"):
        default_cluster_grid(2)
    assert cluster_grid_for(10, [5, 2, 5]) == [2, 5]
    assert cluster_grid_for(10) == [2, 3, 4]
    with pytest.raises(ValueError, match="at least one S"):
        cluster_grid_for(10, [])
    with pytest.raises(ValueError, match=r"clusters \(--clusters\) must be < the number of"):
        cluster_grid_for(10, [3, 10])  # the S values come from --clusters


def test_cluster_subset_with_and_without_a_targets_attribute():
    targets = torch.tensor([0, 3, 1, 3, 2, 0])
    images = torch.zeros(6, 1, 2, 2, dtype=torch.uint8)
    for dataset in (
        TensorImageDataset(ArraySplit(images, targets)),
        TensorDataset(images, targets),
    ):
        subset = cluster_subset(dataset, [0, 3])
        assert subset.indices == [0, 1, 3, 5]
        assert [int(subset[i][1]) for i in range(len(subset))] == [0, 3, 3, 0]


# -- routing ------------------------------------------------------------------------------------

# Four classes in two clusters {0, 1} and {2, 3}; baseline probabilities chosen for hand math.
CLUSTERS = torch.tensor([0, 0, 1, 1])
BASE_PROBS = torch.tensor(
    [
        [0.97, 0.01, 0.01, 0.01],  # H = 0.97 ln(1/0.97) + 0.03 ln 100 = 0.168: confident
        [1 / 6, 1 / 6, 1 / 3, 1 / 3],  # H = 1.330, cluster mass (1/3, 2/3): cluster 1
        [3 / 7, 2 / 7, 1 / 7, 1 / 7],  # H = 1.277, cluster mass (5/7, 2/7): cluster 0
        [0.30, 0.25, 0.25, 0.20],  # H = 1.376, cluster mass (0.55, 0.45): cluster 0
    ],
    dtype=torch.float64,
)
SUB_LOGITS = torch.tensor(
    [
        [  # sub-classifier of cluster {0, 1}
            [0.0, 9.0, 0.0, 0.0],  # row 0 is confident: this answer (1) is never used
            [0.0, 0.0, 0.0, 0.0],
            [1.0, 2.0, 50.0, 0.0],  # class 2 is outside the cluster: masked, answer 1
            [0.1, 0.0, 0.0, 0.0],  # answer 0, barely: p = (0.525, 0.475)
        ],
        [  # sub-classifier of cluster {2, 3}
            [0.0, 0.0, 0.0, 9.0],
            [30.0, 0.0, 1.0, 2.0],  # class 0 is outside: masked, answer 3
            [0.0, 0.0, 20.0, 0.0],
            [0.0, 0.0, 10.0, 0.0],  # sure of class 2
        ],
    ]
)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_hard_routing_matches_a_hand_computed_example():
    routed = hard_route(BASE_PROBS.log().float(), SUB_LOGITS, CLUSTERS, threshold=1.0)
    assert routed.uncertain.tolist() == [False, True, True, True]
    assert routed.cluster.tolist() == [0, 1, 0, 0]
    assert routed.prediction.tolist() == [0, 3, 1, 0]
    expected = torch.tensor(
        [
            [0.97, 0.01, 0.01, 0.01],  # the baseline's own probabilities
            [0.0, 0.0, 1 - _sigmoid(1.0), _sigmoid(1.0)],  # softmax of (1, 2) over {2, 3}
            [1 - _sigmoid(1.0), _sigmoid(1.0), 0.0, 0.0],  # softmax of (1, 2) over {0, 1}
            [_sigmoid(0.1), 1 - _sigmoid(0.1), 0.0, 0.0],
        ]
    )
    torch.testing.assert_close(routed.scores, expected, rtol=1e-5, atol=1e-6)
    # A threshold between the entropies 1.277 and 1.330 routes rows 1 and 3 only.
    partial = hard_route(BASE_PROBS.log().float(), SUB_LOGITS, CLUSTERS, threshold=1.3)
    assert partial.uncertain.tolist() == [False, True, False, True]
    assert partial.prediction.tolist() == [0, 3, 0, 0]


def test_soft_routing_matches_a_hand_computed_example():
    routed = soft_route(BASE_PROBS.log().float(), SUB_LOGITS, CLUSTERS, threshold=1.0)
    # Row 3: cluster 0 (mass 0.55) is unsure, cluster 1 (mass 0.45) is sure of class 2:
    # 0.45 * 0.99995 > 0.55 * 0.525, so soft routing answers 2 where hard routing answers 0.
    assert routed.prediction.tolist() == [0, 3, 1, 2]
    s1, s01, s10 = _sigmoid(1.0), _sigmoid(0.1), _sigmoid(10.0)
    s20 = _sigmoid(20.0)
    expected = torch.tensor(
        [
            [0.97, 0.01, 0.01, 0.01],
            [1 / 6, 1 / 6, 2 / 3 * (1 - s1), 2 / 3 * s1],
            [5 / 7 * (1 - s1), 5 / 7 * s1, 2 / 7 * s20, 2 / 7 * (1 - s20)],
            [0.55 * s01, 0.55 * (1 - s01), 0.45 * s10, 0.45 * (1 - s10)],
        ]
    )
    torch.testing.assert_close(routed.scores, expected, rtol=1e-5, atol=1e-6)


def test_routing_extremes_route_everything_or_nothing():
    base = BASE_PROBS.log().float()
    nothing = route_nothing_threshold(4)
    assert nothing == pytest.approx(LN(4) + 1)
    for fn in (hard_route, soft_route):
        kept = fn(base, SUB_LOGITS, CLUSTERS, threshold=nothing)
        # The baseline's argmax (row 1 ties 2 and 3 at 1/3: the first wins).
        assert not kept.uncertain.any() and kept.prediction.tolist() == [0, 2, 0, 0]
        assert fn(base, SUB_LOGITS, CLUSTERS, threshold=0.0).uncertain.all()


def test_mask_to_clusters_keeps_each_sub_classifier_in_its_cluster():
    masked = mask_to_clusters(SUB_LOGITS, CLUSTERS)
    assert torch.isinf(masked[0, :, 2:]).all() and torch.isinf(masked[1, :, :2]).all()
    assert torch.equal(masked[0, :, :2], SUB_LOGITS[0, :, :2])
    with pytest.raises(ValueError, match="sub_logits must be"):
        mask_to_clusters(SUB_LOGITS[:, :, :3], CLUSTERS)


def test_soft_routing_is_hard_routing_at_a_one_hot_cluster_distribution():
    gen = torch.Generator().manual_seed(0)
    clusters = torch.tensor([0, 1, 2, 0, 1, 2])
    sub = torch.randn(3, 40, 6, generator=gen) * 3
    chosen = torch.randint(0, 3, (40,), generator=gen)
    one_hot = torch.nn.functional.one_hot(chosen, 3).float()
    mixed = mix_subclassifiers(one_hot, sub, clusters)
    torch.testing.assert_close(
        mixed, mask_to_clusters(sub, clusters)[chosen, torch.arange(40)].softmax(1)
    )
    # Through the gate: baseline logits of -inf outside one cluster give a one-hot mass.
    base = torch.randn(40, 6, generator=gen).masked_fill(clusters != chosen[:, None], -math.inf)
    hard = hard_route(base, sub, clusters, threshold=0.0)
    soft = soft_route(base, sub, clusters, threshold=0.0)
    assert torch.equal(hard.cluster, chosen)
    assert torch.equal(hard.prediction, soft.prediction)
    torch.testing.assert_close(hard.scores, soft.scores)


def test_routing_rejects_bad_arguments():
    base = BASE_PROBS.log().float()
    with pytest.raises(ValueError, match="sub_logits must be"):
        hard_route(base, SUB_LOGITS[:, :3], CLUSTERS, 1.0)
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        soft_route(base, SUB_LOGITS, CLUSTERS, -0.5)
    with pytest.raises(ValueError, match="num_clusters must be < the number of classes"):
        hard_route(base, SUB_LOGITS.repeat(2, 1, 1), torch.tensor([0, 1, 2, 3]), 1.0)


# -- the validation grid ------------------------------------------------------------------------


def test_threshold_grid_brackets_the_quantiles():
    entropy = torch.linspace(0.0, 2.0, 101)
    grid = threshold_grid(entropy, 10, quantiles=(0.5, 0.25))
    assert grid == pytest.approx([0.0, 0.5, 1.0, LN(10) + 1])
    with pytest.raises(ValueError, match=r"quantiles must lie in \(0, 1\)"):
        threshold_grid(entropy, 10, quantiles=(0.5, 1.0))


def test_search_grid_and_selection():
    base = BASE_PROBS.log().float()
    targets = torch.tensor([0, 3, 1, 2])
    grid = search_grid(base, {2: SUB_LOGITS}, {2: CLUSTERS}, targets, [0.0, 1.0, 1.3, 5.0])
    assert [p.threshold for p in grid] == [0.0, 1.0, 1.3, 5.0]
    # Rows 0 and 3 (entropy 0.168, 1.376) decide: hard gets row 3 wrong, soft right.
    assert [p.hard_accuracy for p in grid] == [0.5, 0.75, 0.5, 0.25]
    assert [p.soft_accuracy for p in grid] == [0.75, 1.0, 0.75, 0.25]
    assert [p.routed_share for p in grid] == [1.0, 0.75, 0.5, 0.0]
    assert select_best(grid, "soft").threshold == 1.0
    with pytest.raises(ValueError, match="thresholds must be finite and >= 0"):
        search_grid(base, {2: SUB_LOGITS}, {2: CLUSTERS}, targets, [0.5, math.inf])
    with pytest.raises(ValueError, match="thresholds must not be empty"):
        search_grid(base, {2: SUB_LOGITS}, {2: CLUSTERS}, targets, [])


def test_selection_breaks_ties_towards_routing_less_then_fewer_clusters():
    grid = [
        GridPoint(3, 0.5, 0.8, 0.7, 0.6),
        GridPoint(2, 0.5, 0.8, 0.7, 0.6),
        GridPoint(2, 1.5, 0.8, 0.9, 0.2),
        GridPoint(4, 1.5, 0.8, 0.6, 0.2),
        GridPoint(4, 0.1, 0.7, 0.6, 0.9),
    ]
    assert select_best(grid, "hard") == grid[2]
    assert select_best(grid, "soft") == grid[2]
    assert select_best(grid[:2], "hard") == grid[1]
    with pytest.raises(ValueError, match="mode must be one of"):
        select_best(grid, "mixed")


def test_per_cluster_rows_by_hand():
    targets = torch.tensor([0, 3, 1, 2])
    rows = per_cluster_rows(
        BASE_PROBS.log().float(), SUB_LOGITS, CLUSTERS, targets, "abcd", [True, True]
    )
    assert [r["n"] for r in rows] == [2, 2] and rows[1]["class_names"] == ["c", "d"]
    # Cluster {0, 1}: rows 0 and 2 (true 0, 1). Baseline argmax 0 and 0; sub 1 and 1.
    assert rows[0]["baseline_top1"] == 0.5 and rows[0]["sub_top1"] == 0.5
    assert rows[0]["baseline_top3"] == 1.0 and rows[0]["sub_top3"] is None  # 2 classes
    # Cluster {2, 3}: rows 1 and 3 (true 3, 2). Baseline over all: class 2 (tie 2/3 at row 1
    # goes to the first), class 0; within {2, 3}: 2, 2. Sub: 3, 2.
    assert rows[1]["baseline_top1"] == 0.0
    assert rows[1]["baseline_in_cluster_top1"] == 0.5 and rows[1]["sub_top1"] == 1.0


def test_paired_comparison_counts_and_exact_mcnemar_p():
    targets = torch.tensor([0, 1, 2, 3, 4, 5])
    base = torch.tensor([0, 9, 9, 9, 4, 9])  # right on 0, 4
    ens = torch.tensor([0, 1, 2, 3, 9, 9])  # fixes 1, 2, 3; breaks 4
    paired = paired_comparison(base, ens, targets)
    # Two-sided exact binomial of 1 vs 3 out of 4: 2 * (1 + 4) / 16.
    assert paired == {"fixed": 3, "broke": 1, "mcnemar_p": 0.625}
    assert paired_comparison(base, base, targets) == {"fixed": 0, "broke": 0, "mcnemar_p": 1.0}
    assert paired_comparison(base, targets, targets)["mcnemar_p"] == pytest.approx(2 / 2**4)


# -- the ensemble module and the sub-classifiers ------------------------------------------------


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_ensemble_module_equals_routing_of_precomputed_logits(mode):
    baseline = _tiny_model(0).eval()
    subs = [_tiny_model(s).eval() for s in (1, 2, 3)]
    clusters = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 1, 2])
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = baseline(x)
        sub_logits = torch.stack([m(x) for m in subs])
    threshold = float(torch.quantile(torch.special.entr(base.softmax(1)).sum(1), 0.5))
    seen: list[int] = []
    for m in subs:
        m.register_forward_hook(lambda _m, inputs, _o: seen.append(len(inputs[0])))
    ensemble = LabelEmbeddingEnsemble(baseline, subs, clusters, threshold, mode).eval()
    out = ensemble(x)
    expected = (hard_route if mode == "hard" else soft_route)(base, sub_logits, clusters, threshold)
    assert 0 < int(expected.uncertain.sum()) < 32
    assert torch.equal(out.prediction, expected.prediction)
    torch.testing.assert_close(out.scores, expected.scores)
    # Sub-classifiers only see the samples that need them.
    routed = expected.uncertain
    if mode == "hard":
        assert seen == [int((routed & (expected.cluster == k)).sum()) for k in range(3)
                        if (routed & (expected.cluster == k)).any()]  # fmt: skip
    else:
        assert seen == [int(routed.sum())] * 3


def test_ensemble_module_answers_in_eval_mode_whatever_train_says():
    # Members with BatchNorm, left in train mode by their caller: the ensemble must still use
    # running statistics, so an answer does not depend on the batch or on train().
    baseline = _tiny_model(0).train()
    subs = [_tiny_model(s).train() for s in (1, 2, 3)]
    clusters = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 1, 2])
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    members = [baseline, *subs]
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in baseline.modules())
    for m in members:  # running statistics away from the initial (0, 1)
        with torch.no_grad():
            m(x * 3 + 1)
    with torch.no_grad():
        entropy = torch.special.entr(baseline.eval()(x).softmax(1)).sum(1)
    threshold = float(torch.quantile(entropy, 0.5))
    ensemble = LabelEmbeddingEnsemble(baseline.train(), subs, clusters, threshold, "hard")
    assert not any(m.training for member in members for m in member.modules())
    full = ensemble(x)
    assert 0 < int(full.uncertain.sum()) < 16
    ensemble.train()
    assert ensemble.training and not any(m.training for m in baseline.modules())
    alone = [ensemble(x[i : i + 1]) for i in range(4)]
    assert torch.equal(ensemble(x).prediction, full.prediction)
    for i, one in enumerate(alone):
        torch.testing.assert_close(one.scores[0], full.scores[i], rtol=1e-5, atol=1e-6)


def test_cluster_restricted_masks_outside_its_classes_and_trains_within():
    model = _tiny_model(0).eval()
    restricted = ClusterRestricted(model, [2, 7], 10).eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        full, kept = model(x), restricted(x)
    assert restricted.num_classes == 10
    assert torch.equal(kept[:, [2, 7]], full[:, [2, 7]])
    assert torch.isneginf(kept[:, [0, 1, 3, 4, 5, 6, 8, 9]]).all()
    # Cross-entropy is over the two classes only, and gradients stay finite.
    loss = torch.nn.functional.cross_entropy(restricted(x), torch.tensor([2, 7, 7, 2]))
    pair = torch.nn.functional.cross_entropy(full[:, [2, 7]], torch.tensor([0, 1, 1, 0]))
    torch.testing.assert_close(loss, pair)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_ensemble_module_rejects_bad_arguments():
    model = _tiny_model(0)
    clusters = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 1, 2])
    with pytest.raises(ValueError, match="one per sub_model"):
        LabelEmbeddingEnsemble(model, [model, model], clusters, 1.0)
    with pytest.raises(ValueError, match="thresholds must be finite"):
        LabelEmbeddingEnsemble(model, [model] * 3, clusters, math.nan)
    with pytest.raises(ValueError, match="mode must be one of"):
        LabelEmbeddingEnsemble(model, [model] * 3, clusters, 1.0, mode="mean")


def test_fine_tune_shares_repeated_clusters_skips_singletons_and_guards_resume(digits8, tmp_path):
    baseline = _tiny_model(0)
    config = TrainConfig(epochs=1, lr=0.01, **QUIET_CPU)
    first = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 2])  # class 9 alone
    cache: dict = {}
    subs = fine_tune_subclassifiers(
        baseline, digits8.train, digits8.val, first, config, out_dir=tmp_path / "a", cache=cache
    )
    assert [s.fine_tuned for s in subs] == [True, True, False] and subs[2].model is baseline
    assert [s.train_size for s in subs] == [
        int(torch.isin(digits8.train.targets, torch.tensor(m)).sum())
        for m in ([0, 1, 2, 3, 4], [5, 6, 7, 8], [9])
    ]
    assert len(subs[0].history) == 1 and isinstance(subs[0].model, ClusterRestricted)
    # The tuned copy moved away from the baseline, whose weights are untouched.
    tuned = subs[0].model.model.classifier.weight
    assert not torch.equal(tuned, baseline.classifier.weight)
    assert torch.equal(baseline.classifier.weight, _tiny_model(0).classifier.weight)
    # Its logged accuracy is within the cluster: restricted logits never leave it.
    with torch.no_grad():
        logits = subs[0].model.eval()(torch.randn(8, 1, 8, 8))
    assert torch.isinf(logits[:, 5:]).all() and torch.isfinite(logits[:, :5]).all()
    assert json.loads((tmp_path / "a" / "cluster0" / "cluster.json").read_text()) == {
        "classes": [0, 1, 2, 3, 4]
    }
    again = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 2, 2])  # {0..4} again: shared, not retrained
    shared = fine_tune_subclassifiers(
        baseline, digits8.train, None, again, config, cache=cache, log=lambda _: None
    )
    assert shared[0].shared and shared[0].model is subs[0].model
    assert not shared[1].shared and shared[1].classes == [5, 6, 7]
    with pytest.raises(ValueError, match="cannot resume .* fine-tuned on classes"):
        fine_tune_subclassifiers(
            baseline, digits8.train, digits8.val, again, config, out_dir=tmp_path / "a",
            resume=True, log=lambda _: None,
        )  # fmt: skip
    # Cluster 0 itself (same classes) on other validation data: the engine's run identity.
    with pytest.raises(ValueError, match=r"cannot resume .*cluster0.* \(val_samples=\d+ -> None\)"):
        fine_tune_subclassifiers(
            baseline, digits8.train, None, again, config, out_dir=tmp_path / "a", resume=True,
            log=lambda _: None,
        )  # fmt: skip
    # Another baseline with the same clusters: its sub-classifiers start from other weights.
    with pytest.raises(ValueError, match=r"cannot resume .*cluster0.* \(baseline weights="):
        fine_tune_subclassifiers(
            _tiny_model(9), digits8.train, digits8.val, again, config, out_dir=tmp_path / "a",
            resume=True, log=lambda _: None,
        )  # fmt: skip
    # Another sub-classifier epoch count is named as the option that sets it.
    with pytest.raises(ValueError, match=r"cannot resume .*cluster0.* \(sub_epochs=\d+ -> 7\)"):
        fine_tune_subclassifiers(
            baseline, digits8.train, digits8.val, again, replace(config, epochs=7),
            out_dir=tmp_path / "a", resume=True, log=lambda _: None,
        )  # fmt: skip


def test_load_baseline_from_a_checkpoint(tmp_path):
    trained = _tiny_model(5)
    save_checkpoint(tmp_path / "ck.pt", {"model": trained.state_dict()})
    loaded = load_baseline(_tiny_model(6), tmp_path / "ck.pt")
    assert torch.equal(label_embeddings(loaded), label_embeddings(trained))
    with pytest.raises(
        ValueError,
        match=r"does not fit this run's model \(7 classes\): model tensors differ: other shapes "
        r"for classifier\.weight, classifier\.bias$",
    ):  # the reason, not the first line of torch's message ("Error(s) in loading ...:")
        load_baseline(_tiny_model(0, classes=7), tmp_path / "ck.pt")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_baseline(_tiny_model(0), tmp_path / "absent.pt")
    with pytest.raises(ValueError, match=r"is a folder: pass the checkpoint file in it"):
        load_baseline(_tiny_model(0), tmp_path)
    # A size-agnostic network loads weights trained at another size: refused by the input shape.
    save_checkpoint(tmp_path / "ck8.pt", {"model": trained.state_dict(),
                                          "run": {"input_shape": [1, 8, 8]}})  # fmt: skip
    assert load_baseline(_tiny_model(0), tmp_path / "ck8.pt", (1, 8, 8)) is not None
    with pytest.raises(ValueError, match=r"trained on inputs \[1, 8, 8\], this run's are "
                       r"\[1, 16, 16\]: pass a baseline trained at this --image-size"):  # fmt: skip
        load_baseline(_tiny_model(0), tmp_path / "ck8.pt", (1, 16, 16))


# -- end to end ---------------------------------------------------------------------------------


def test_grid_table_keeps_close_thresholds_apart():
    """Entropy quantiles may agree to three digits: their columns get the digits that tell them
    apart (the report printed e=2.27 twice)."""
    from labelkit_ext.methods.ensemble.report import grid_table

    grid = [GridPoint(2, e, 0.5, 0.5, 0.1) for e in (0.0, 2.2712, 2.2738, 3.3)]
    header = grid_table(grid).splitlines()[0]
    assert all(f"e={label}" in header for label in ("0", "2.271", "2.274", "3.3")), header


def test_fit_ensemble_python_api_matches_its_ensembles(digits8):
    seed_everything(0)
    config = TrainConfig(epochs=2, **QUIET_CPU)
    baseline = fit_supervised(digits8, "small-cnn", config).model
    fitted = fit_ensemble(
        digits8,
        config=config,
        sub_config=TrainConfig(epochs=1, lr=0.01, **QUIET_CPU),
        cluster_grid=[2, 3],
        quantiles=(0.5,),
        baseline=baseline,
    )
    with pytest.raises(ValueError, match=r"at most one of baseline, baseline_file, pretrained"):
        fit_ensemble(digits8, config=config, baseline=baseline, pretrained="weights.pt")
    results = fitted.results
    assert results["baseline"]["trained_here"] is False and "plots" not in results
    assert results["config"]["model"] == "Classifier"  # the module given, not the default name
    assert results["timings"]["total_seconds"] >= results["timings"]["grid search"] > 0
    for mode in ("hard", "soft"):
        ensemble = getattr(fitted, mode).eval()
        pick = results["selected"][mode]
        assert ensemble.num_clusters == pick["num_clusters"]
        assert ensemble.threshold == pick["threshold"]
        loader = torch.utils.data.DataLoader(digits8.test, batch_size=100)
        hits = sum(int((ensemble(x).prediction == y).sum()) for x, y in loader)
        assert hits / len(digits8.test) == pytest.approx(results["metrics"]["test"][mode])
    base = predict(baseline, digits8.test, torch.device("cpu"))
    assert results["metrics"]["test"]["baseline"] == pytest.approx(
        float((base.logits.argmax(1) == base.targets).double().mean())
    )


def test_run_ensemble_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "ensemble", "--dataset", "digits", "--image-size", "8", "--epochs", "2",
            "--sub-epochs", "1", "--clusters", "2", "3", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "ensemble | digits | small-cnn" in printed
    assert "hard ensemble" in printed and "soft ensemble" in printed and "per cluster" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "ensemble" and results["config"]["cluster_grid"] == [2, 3]
    assert results["config"]["affinity"] == "(1 + cos) / 2"
    thresholds = results["config"]["thresholds"]
    assert thresholds[0] == 0.0 and thresholds[-1] == pytest.approx(LN(10) + 1)
    for split, n in (("val", 144), ("test", 360)):
        grid = results["grid"][split]
        assert len(grid) == 2 * len(thresholds)
        baseline = results["metrics"][split]["baseline"]
        for point in grid:
            if point["threshold"] == 0.0:
                assert point["routed_share"] == 1.0
            if point["threshold"] == thresholds[-1]:  # nothing routed: the baseline's answers
                assert point["routed_share"] == 0.0
                assert point["hard_accuracy"] == point["soft_accuracy"] == baseline
        assert results["baseline"]["metrics"][split]["n"] == n
    # The selected points are the best of the validation grid.
    for mode in ("hard", "soft"):
        best = max(p[f"{mode}_accuracy"] for p in results["grid"]["val"])
        assert results["selected"][mode][f"{mode}_accuracy"] == best
        assert results["metrics"]["val"][mode] == best
        assert results["ensemble_metrics"][mode]["test"]["accuracy"] == pytest.approx(
            results["metrics"]["test"][mode]
        )
        for split, n in (("val", 144), ("test", 360)):
            paired = results["metrics"][split][f"{mode}_vs_baseline"]
            difference = (paired["fixed"] - paired["broke"]) / n
            metrics = results["metrics"][split]
            assert metrics[mode] - metrics["baseline"] == pytest.approx(difference)
    chosen = results["per_cluster"]["num_clusters"]
    assert chosen == results["selected"]["hard"]["num_clusters"]
    rows = results["per_cluster"]["test"]
    assert len(rows) == chosen == len(results["clusters"])
    assert sum(r["n"] for r in rows) == 360
    members = sorted(c for cluster in results["clusters"] for c in cluster["classes"])
    assert members == list(range(10))
    assert results["clusters"][0]["class_names"][0] == "0"
    assert len(results["label_embeddings"]["cosine_similarity"]) == 10
    assert set(results["clusterings"]) == {"2", "3"}
    assert results["clusterings"][str(chosen)]["per_cluster"]["test"] == rows
    assert len(results["clusterings"]["3"]["per_cluster"]["val"]) == 3
    assert {"baseline", "grid search", "sub-classifiers S=2", "total_seconds"} <= set(
        results["timings"]
    )
    for plot in ("embedding_similarity.png", "accuracy_vs_threshold.png", "grid_search.png"):
        assert plot in results["plots"] and (out / plot).read_bytes()[:4] == b"\x89PNG"
    assert (out / "baseline" / "checkpoint_last.pt").is_file()
    assert (out / "subclassifiers" / "S2" / "cluster0" / "checkpoint_last.pt").is_file()

    # A trained baseline from a file: nothing retrained, the same baseline answers.
    reuse = tmp_path / "reuse"
    checkpoint = str(out / "baseline" / "checkpoint_last.pt")
    argv = [*argv[:-1], str(reuse), "--baseline", checkpoint, "--clusters", "2"]
    assert main(argv) == 0
    again = json.loads((reuse / "results.json").read_text())
    assert again["baseline"]["trained_here"] is False and again["baseline"]["history"] == []
    assert again["metrics"]["test"]["baseline"] == results["metrics"]["test"]["baseline"]
    assert again["config"]["baseline_file"] == checkpoint
    assert main([*argv, "--pretrained", checkpoint]) == 2
    assert (
        "give --baseline (a trained baseline, used as is) or --pretrained"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("option", "message"),
    [(["--clusters", "1"], "error: clusters must be >= 2"),  # the option, not num_clusters
     (["--clusters", "3", "10"], r"clusters \(--clusters\) must be < the number of classes"),
     (["--baseline", "missing.pt"], "baseline checkpoint missing.pt not found"),
     (["--quantiles", "1.5"], r"quantiles must lie in \(0, 1\)"),
     (["--sub-epochs", "0"], "sub_epochs must be >= 1"),
     (["--sub-lr", "0"], "sub_lr must be > 0")],
)  # fmt: skip
def test_run_ensemble_bad_options_are_clear_errors(tmp_path, capsys, option, message):
    argv = ["run", "ensemble", "--dataset", "digits", "--image-size", "8", "--epochs", "1",
            "--sub-epochs", "1", "--quiet", "--out", str(tmp_path / "run"), *option]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("labelkit: error:") and len([line for line in err.splitlines() if line]) == 1
    )
    assert re.search(message, err)
