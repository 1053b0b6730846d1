"""Active learning: every strategy picks the known answer on tiny synthetic pools, never
re-queries a labeled sample and honours the batch size; state files are atomic, checked and
refused when corrupt; the file oracle round-trips; a run killed with SIGKILL after any step
resumes to the identical labeled set without re-asking the oracle; a tiny end-to-end CLI run."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from ddp_helpers import spawn, torchrun_labelkit

from labelkit_ext.cli import main
from labelkit_ext.data import load_dataset
from labelkit_ext.engine import TrainConfig
from labelkit_ext.methods.active import (
    STEPS,
    ActiveConfig,
    ActiveLoop,
    ActiveState,
    AwaitingAnswers,
    EmbeddingLearner,
    FileOracle,
    NetLearner,
    PoolScores,
    SelectionContext,
    SimulatedOracle,
    StateError,
    area_under_curve,
    available_strategies,
    build_strategy,
    initial_indices,
    labels_to_reach,
    load_state,
    save_state,
    select,
    summarize_strategy,
    summary_table,
)
from labelkit_ext.methods.active.strategies.bald import batchbald_greedy
from labelkit_ext.methods.active.strategies.base import check_selection
from labelkit_ext.methods.active.strategies.cluster_margin import round_robin, spherical_kmeans
from labelkit_ext.models import build_model

REPO = Path(__file__).resolve().parents[1]
BIG = 12.0  # a logit gap that makes a softmax one-hot for all practical purposes


def _ctx(scores: PoolScores, labeled=(), labels=None, budget=1, num_classes=None, **kw):
    t = next(x for x in (scores.logits, scores.embeddings, scores.mc_logits) if x is not None)
    pool = t.shape[-2] if t is scores.mc_logits else t.shape[0]
    classes = num_classes or (scores.logits.shape[1] if scores.logits is not None else 3)
    labels = [0] * len(labeled) if labels is None else labels
    return SelectionContext(scores, torch.tensor(labeled, dtype=torch.long), torch.tensor(labels),
                            budget, pool, classes, **kw)  # fmt: skip


def _probs_to_logits(p) -> torch.Tensor:
    return torch.tensor(p, dtype=torch.float64).log().float()


# ---- single-pick strategies on hand-made pools --------------------------------------------------


UNCERTAIN_LOGITS = _probs_to_logits(
    [
        [0.98, 0.01, 0.01],  # confident
        [0.34, 0.33, 0.33],  # most uncertain by every measure (labeled in one test)
        [0.50, 0.49, 0.01],  # smallest margin after row 1
        [0.40, 0.30, 0.30],  # second highest entropy / lowest confidence
        [0.90, 0.05, 0.05],
    ]
)


@pytest.mark.parametrize("name", ["entropy", "margin", "least-confidence"])
def test_uncertainty_strategies_pick_the_most_uncertain(name):
    scores = PoolScores(logits=UNCERTAIN_LOGITS)
    assert select(build_strategy(name), _ctx(scores, budget=1)).tolist() == [1]
    # With row 1 labeled, each measure's runner-up.
    second = {"entropy": 3, "margin": 2, "least-confidence": 3}[name]
    assert select(build_strategy(name), _ctx(scores, labeled=[1], budget=1)).tolist() == [second]


def test_uncertainty_strategies_against_a_numpy_oracle():
    rng = np.random.default_rng(0)
    logits = torch.tensor(rng.normal(size=(50, 4)) * 2, dtype=torch.float32)
    p = torch.softmax(logits.double(), 1).numpy()
    entropy = -(p * np.log(p)).sum(1)
    top2 = np.sort(p, 1)[:, ::-1]
    expected = {"entropy": entropy, "margin": 1 - (top2[:, 0] - top2[:, 1]),
                "least-confidence": 1 - top2[:, 0]}  # fmt: skip
    labeled = [3, 7, 11]
    for name, score in expected.items():
        score = score.copy()
        score[labeled] = -np.inf
        got = select(build_strategy(name), _ctx(PoolScores(logits=logits), labeled, budget=5))
        assert got.tolist() == np.argsort(-score, kind="stable")[:5].tolist(), name


def _mc(per_sample_probs) -> torch.Tensor:
    """(S, N, C) logits from per-sample probabilities."""
    return torch.stack([_probs_to_logits(p) for p in per_sample_probs])


def test_mc_strategies_pick_disagreement_not_ambiguity():
    # Sample 0: every dropout mask says 50/50 (aleatoric, BALD 0); sample 1: masks disagree
    # confidently (epistemic, BALD ln 2); sample 2: confident and consistent.
    a, b = [0.999, 0.001], [0.001, 0.999]
    half = [0.5, 0.5]
    mc = _mc([[half, a, a], [half, b, a], [half, a, a], [half, b, a]])
    scores = PoolScores(mc_logits=mc)
    for name in ("bald", "variation-ratio", "mean-std", "batchbald"):
        assert select(build_strategy(name), _ctx(scores, budget=1, num_classes=2)).tolist() == [
            1
        ], name


def test_batchbald_avoids_the_duplicate_that_bald_takes():
    # 4 dropout samples. Samples 0 and 1 are identical (BALD ln 2); sample 2 disagrees along
    # other masks with softer outputs (lower BALD). Top-2 BALD takes the duplicates; BatchBALD
    # knows sample 1 adds nothing once sample 0's label is known.
    hi, lo, soft_hi, soft_lo = [0.999, 0.001], [0.001, 0.999], [0.9, 0.1], [0.1, 0.9]
    mc = _mc([[hi, hi, soft_hi], [hi, hi, soft_lo], [lo, lo, soft_hi], [lo, lo, soft_lo]])
    ctx = _ctx(PoolScores(mc_logits=mc), budget=2, num_classes=2)
    assert sorted(select(build_strategy("bald"), ctx).tolist()) == [0, 1]
    assert select(build_strategy("batchbald"), ctx).tolist() == [0, 2]


def test_batchbald_first_pick_is_the_bald_maximum_and_picks_are_distinct():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(8, 30, 5, generator=g) * 2, -1)
    picks = batchbald_greedy(probs, 10, 256, torch.Generator().manual_seed(1))
    mean = probs.mean(0)
    bald = -(mean * mean.log()).sum(-1) + (probs * probs.log()).sum(-1).mean(0)
    assert int(picks[0]) == int(bald.argmax())
    assert picks.unique().numel() == 10


def test_coreset_picks_the_farthest_points():
    emb = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [10.0, 0.0], [0.0, -7.0], [0.5, 0.5]])
    ctx = _ctx(PoolScores(embeddings=emb), labeled=[0], budget=2)
    assert select(build_strategy("coreset"), ctx).tolist() == [3, 4]


def test_similarity_picks_what_the_labeled_set_represents_least():
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.05], [0.7, 0.7]])
    ctx = _ctx(PoolScores(embeddings=emb), labeled=[0], budget=2)
    assert select(build_strategy("similarity"), ctx).tolist() == [3, 2]


def test_density_weighs_uncertainty_by_representativeness():
    # Sample 0 is the most uncertain but an outlier (opposite every other embedding); sample 1
    # is a little less uncertain but sits in the dense cluster.
    logits = _probs_to_logits([[0.5, 0.5], [0.6, 0.4], [0.97, 0.03], [0.98, 0.02], [0.99, 0.01]])
    emb = torch.tensor([[-1.0, 0.0], [1.0, 0.1], [1.0, 0.0], [1.0, -0.1], [0.9, 0.0]])
    scores = PoolScores(logits=logits, embeddings=emb)
    assert select(build_strategy("density", beta=0.0), _ctx(scores, budget=1)).tolist() == [0]
    assert select(build_strategy("density", beta=3.0), _ctx(scores, budget=1)).tolist() == [1]
    # representativeness by hand: (1 + mean cosine to the whole pool) / 2
    x = torch.nn.functional.normalize(emb, dim=1)
    rep = (1 + (x @ x.T).mean(1)) / 2
    p = torch.softmax(logits, 1)
    expected = (-(p * p.log()).sum(1) * rep**2).argsort(descending=True)[:3]
    got = select(build_strategy("density", beta=2.0), _ctx(scores, budget=3))
    assert got.tolist() == expected.tolist()


def test_badge_first_pick_is_the_largest_gradient_embedding():
    probs = torch.tensor([[0.9, 0.1], [0.55, 0.45], [0.6, 0.4], [0.99, 0.01]])
    emb = torch.tensor([[1.0, 0.0], [1.0, 1.0], [3.0, 0.0], [5.0, 5.0]])
    q = probs - torch.nn.functional.one_hot(probs.argmax(1), 2)
    norms = q.norm(dim=1) * emb.norm(dim=1)
    ctx = _ctx(
        PoolScores(logits=probs.log(), embeddings=emb), labeled=[int(norms.argmax())], budget=1
    )
    masked = norms.clone()
    masked[int(norms.argmax())] = -1
    assert select(build_strategy("badge"), ctx).tolist() == [int(masked.argmax())]


def _three_clusters(n_per: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    return torch.cat([c + 0.05 * torch.randn(n_per, 3, generator=g) for c in centres])


def test_spherical_kmeans_recovers_planted_clusters():
    emb = _three_clusters()
    ids = spherical_kmeans(emb, 3)
    groups = [set(ids[i * 6 : (i + 1) * 6].tolist()) for i in range(3)]
    assert all(len(g) == 1 for g in groups) and len(set.union(*groups)) == 3


def test_round_robin_takes_one_per_cluster_smallest_first():
    candidates = torch.tensor([10, 11, 12, 13, 14, 15])
    clusters = torch.tensor([0, 0, 0, 1, 1, 2])
    assert round_robin(candidates, clusters, 3).tolist() == [15, 13, 10]
    assert round_robin(candidates, clusters, 5).tolist() == [15, 13, 10, 14, 11]


def test_cluster_margin_takes_one_per_cluster():
    emb = _three_clusters()
    # Cluster 0 (rows 0-5) holds all of the most uncertain samples; margin alone would take
    # three of them, Cluster-Margin one from each cluster, the most uncertain of each.
    margins = torch.linspace(0.0, 0.9, 18)  # smaller gap = more uncertain, row 0 the most
    p1 = 0.5 + margins / 2
    logits = torch.stack([p1, 1 - p1], 1).double().log().float()
    scores = PoolScores(logits=logits, embeddings=emb)
    strategy = build_strategy("cluster-margin", num_clusters=3, margin_multiple=6)
    assert select(build_strategy("margin"), _ctx(scores, budget=3)).tolist() == [0, 1, 2]
    got = select(strategy, _ctx(scores, budget=3))
    assert sorted(got.tolist()) == [0, 6, 12]
    # the clusters are kept for later rounds (and saved for a resume)
    assert strategy.state_dict()["clusters"].shape == (18,)


def test_prototype_probe_picks_the_sample_between_two_classes():
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.95, 0.05], [0.7, 0.7], [0.05, 0.95]])
    ctx = _ctx(PoolScores(embeddings=emb), labeled=[0, 1], labels=[0, 1], budget=1, num_classes=2)
    assert select(build_strategy("prototype"), ctx).tolist() == [3]


def test_random_is_seeded_by_seed_and_round():
    scores = PoolScores(logits=torch.zeros(100, 3))
    pick = lambda **kw: select(build_strategy("random"), _ctx(scores, [5, 6], budget=10, **kw))  # noqa: E731
    assert torch.equal(pick(seed=1, round=2), pick(seed=1, round=2))
    assert not torch.equal(pick(seed=1, round=2), pick(seed=1, round=3))


# ---- contracts every strategy keeps --------------------------------------------------------------


def _random_scores(n: int = 60, c: int = 4, d: int = 8, s: int = 6, seed: int = 0) -> PoolScores:
    g = torch.Generator().manual_seed(seed)
    return PoolScores(
        logits=torch.randn(n, c, generator=g) * 2,
        embeddings=torch.randn(n, d, generator=g),
        mc_logits=torch.randn(s, n, c, generator=g) * 2,
    )


@pytest.mark.parametrize("name", available_strategies())
@pytest.mark.parametrize("budget", [1, 7, 100])
def test_every_strategy_honours_the_budget_and_skips_labeled(name, budget):
    scores = _random_scores()
    g = torch.Generator().manual_seed(1)
    labeled = torch.randperm(60, generator=g)[:23]
    labels = torch.randint(0, 4, (23,), generator=g)
    ctx = _ctx(scores, labeled.tolist(), labels.tolist(), budget=budget, num_classes=4)
    got = select(build_strategy(name), ctx)
    assert got.numel() == min(budget, 60 - 23)
    assert got.unique().numel() == got.numel()
    assert not torch.isin(got, labeled).any()


def test_check_selection_rejects_a_misbehaving_strategy():
    ctx = _ctx(PoolScores(logits=torch.zeros(10, 2)), labeled=[3], budget=3)
    with pytest.raises(RuntimeError, match="re-queried a labeled sample"):
        check_selection(torch.tensor([1, 2, 3]), ctx, "bad")
    with pytest.raises(RuntimeError, match="returned an index twice"):
        check_selection(torch.tensor([1, 1, 2]), ctx, "bad")
    with pytest.raises(RuntimeError, match="returned 2 indices, expected 3"):
        check_selection(torch.tensor([1, 2]), ctx, "bad")
    with pytest.raises(RuntimeError, match="outside"):
        check_selection(torch.tensor([1, 2, 10]), ctx, "bad")


def test_strategy_errors_are_clear():
    with pytest.raises(ValueError, match="strategy must be one of"):
        build_strategy("nope")
    with pytest.raises(ValueError, match="needs pool mc_logits"):
        select(build_strategy("bald"), _ctx(PoolScores(logits=torch.zeros(4, 2)), budget=1))
    with pytest.raises(ValueError, match="needs at least one labeled"):
        select(
            build_strategy("similarity"), _ctx(PoolScores(embeddings=torch.ones(4, 2)), budget=1)
        )
    with pytest.raises(ValueError, match="beta must be >= 0"):
        build_strategy("density", beta=-1.0)
    # more clusters than the pool is refused, not cut to the pool's size
    with pytest.raises(ValueError, match=r"num_clusters must be in \[1, 60\], got 61"):
        select(build_strategy("cluster-margin", num_clusters=61), _ctx(_random_scores(), budget=2))


# ---- state -----------------------------------------------------------------------------------------

FP = {"dataset": "toy", "seed": 0}


def test_state_round_trips_and_refuses_corruption(tmp_path):
    path = tmp_path / "state.json"
    state = ActiveState(fingerprint=FP, labeled=[4, 2], labels=[1, 0], round=1, pending=[7],
                        records=[{"round": 0, "accuracy": 0.5}])  # fmt: skip
    save_state(path, state)
    assert load_state(path, FP, pool_size=10, num_classes=2) == state
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind

    with pytest.raises(StateError, match="other settings.*seed=0 -> 1"):
        load_state(path, {**FP, "seed": 1}, 10, 2)
    with pytest.raises(StateError, match=r"outside \[0, 5\)"):
        load_state(path, FP, pool_size=5, num_classes=2)
    doc = json.loads(path.read_text())
    doc["state"]["labeled"] = [4, 3]
    path.write_text(json.dumps(doc))
    with pytest.raises(StateError, match="fails its checksum"):
        load_state(path, FP, 10, 2)
    path.write_text(path.read_text()[: len(path.read_text()) // 2])  # a torn write
    with pytest.raises(StateError, match="unreadable or corrupt"):
        load_state(path, FP, 10, 2)
    path.write_text(json.dumps({"hello": 1}))
    with pytest.raises(StateError, match="not a labelkit active-learning state"):
        load_state(path, FP, 10, 2)


# ---- the loop on a fast learner (a linear head on fixed embeddings) --------------------------------


def _embedding_pool(n: int = 300, classes: int = 4, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=g) * 2
    y = torch.randint(0, classes, (n + 200,), generator=g)
    x = centres[y] + torch.randn(n + 200, d, generator=g)
    return x[:n], y[:n], x[n:], y[n:]


def _embedding_loop(out, strategy="entropy", rounds=3, oracle=None, on_step=None, seed=0):
    pool, pool_y, test, test_y = _embedding_pool()
    learner = EmbeddingLearner(
        pool, test, test_y, 4, device="cpu", steps=50, dropout=0.2, seed=seed
    )
    config = ActiveConfig(rounds=rounds, query_size=10, initial_size=8, seed=seed, mc_samples=5)
    return ActiveLoop(learner, build_strategy(strategy), oracle or SimulatedOracle(pool_y), config,
                      out, fingerprint=FP, on_step=on_step)  # fmt: skip


def test_loop_runs_rounds_and_never_asks_twice(tmp_path):
    oracle = SimulatedOracle(_embedding_pool()[1])
    state = _embedding_loop(tmp_path, "coreset", rounds=3, oracle=oracle).run()
    assert [r["labels"] for r in state.records] == [8, 18, 28, 38]
    assert len(set(state.labeled)) == 38 and oracle.asked == 38 and state.pending == []
    assert state.labeled[:8] == initial_indices(300, 8, 0)
    assert state.records[-1]["accuracy"] > 0.5
    assert all("selection_seconds" in r for r in state.records[:-1])
    # a finished run resumed asks nothing more; a longer budget continues from it
    again = _embedding_loop(tmp_path, "coreset", rounds=3, oracle=oracle).run(resume=True)
    assert again.labeled == state.labeled and oracle.asked == 38
    longer = _embedding_loop(tmp_path, "coreset", rounds=4, oracle=oracle).run(resume=True)
    assert longer.labeled[:38] == state.labeled and len(longer.labeled) == 48 and oracle.asked == 48
    # fewer rounds than done: its curve and the requested budget would disagree
    with pytest.raises(StateError, match=r"has 4 rounds done: resume with rounds >= 4"):
        _embedding_loop(tmp_path, "coreset", rounds=2, oracle=oracle).run(resume=True)


@pytest.mark.parametrize("name", ["bald", "batchbald", "mean-std"])
def test_mc_dropout_strategies_refuse_a_single_pass(tmp_path, name):
    with pytest.raises(ValueError, match=rf"strategy '{name}' compares MC-dropout passes: "
                       r"mc_samples must be >= 2, got 1"):  # fmt: skip
        pool, pool_y, test, test_y = _embedding_pool()
        learner = EmbeddingLearner(pool, test, test_y, 4, device="cpu", steps=5, dropout=0.2)
        config = ActiveConfig(rounds=1, query_size=10, initial_size=8, mc_samples=1)
        ActiveLoop(learner, build_strategy(name), SimulatedOracle(pool_y), config, tmp_path)


def test_loop_checks_its_pool_and_oracle_before_any_round(tmp_path):
    """The Python API checks what `labelkit run active` does: a query larger than the unlabeled
    pool (it labelled the whole pool in one round), and a simulated oracle holding other
    targets than the pool's (an IndexError mid-run, or silently other images' labels)."""
    pool, pool_y, test, test_y = _embedding_pool()
    learner = EmbeddingLearner(pool, test, test_y, 4, device="cpu", steps=5)
    config = ActiveConfig(rounds=1, query_size=300, initial_size=8)
    with pytest.raises(ValueError, match=r"query_size \(300\) is larger than the unlabeled pool"):
        ActiveLoop(learner, build_strategy("entropy"), SimulatedOracle(pool_y), config, tmp_path)
    config = ActiveConfig(rounds=1, query_size=10, initial_size=8)
    for wrong in (test_y, torch.cat([pool_y, test_y])):
        with pytest.raises(ValueError, match=rf"has {len(wrong)} targets for a pool of 300"):
            ActiveLoop(learner, build_strategy("entropy"), SimulatedOracle(wrong), config, tmp_path)
    assert not (tmp_path / "state.json").exists()


def test_labeled_subset_states_its_answers_for_the_engine():
    """A round's training set states the oracle's answers (fit checks them before training)
    and fingerprints images and answers (a resumed round needs both unchanged)."""
    from labelkit_ext.engine import check_targets, data_fingerprint
    from labelkit_ext.methods.active import LabeledSubset

    pool = torch.utils.data.TensorDataset(torch.rand(6, 1, 4, 4), torch.arange(6) % 3)
    subset = LabeledSubset(pool, [4, 1], [2, 0])
    assert subset.targets.tolist() == [2, 0]
    fingerprints = {str(data_fingerprint(LabeledSubset(pool, i, y)))
                    for i, y in (([4, 1], [2, 0]), ([4, 1], [2, 1]), ([4, 2], [2, 0]))}  # fmt: skip
    assert len(fingerprints) == 3 and None not in data_fingerprint(subset).values()
    with pytest.raises(ValueError, match=r"targets must be classes in \[0, 2\)"):
        check_targets(subset, "multiclass", 2, "train_set")


def test_an_oracle_of_your_own_need_not_subclass_oracle(tmp_path):
    class Mine:  # answers like SimulatedOracle, without the base class
        def __init__(self, targets):
            self.targets = targets

        def answer(self, indices, round):
            return {i: int(self.targets[i]) for i in indices}

        def describe(self):
            return "mine"

    state = _embedding_loop(tmp_path, rounds=1, oracle=Mine(_embedding_pool()[1])).run()
    assert len(state.labeled) == 18


def test_loop_refuses_to_overwrite_or_mix_runs(tmp_path):
    _embedding_loop(tmp_path, rounds=1).run()
    with pytest.raises(StateError, match="pass --resume"):
        _embedding_loop(tmp_path, rounds=1).run()
    with pytest.raises(StateError, match="other settings.*strategy='entropy' -> 'margin'"):
        _embedding_loop(tmp_path, "margin", rounds=1).run(resume=True)


# ---- the file oracle --------------------------------------------------------------------------------


def _answer(folder: Path, rows: list[tuple[int, str]]) -> None:
    with open(folder / "answers.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "label"])
        writer.writerows(rows)


def test_file_oracle_thumbnails_show_uint8_as_is_and_stretch_other_dtypes(tmp_path):
    """Normalised float images (what a model eats) were cast straight to uint8: wrapped noise.
    They are stretched from their own min..max; uint8 is shown as given; a wrong shape is a
    clear error."""
    from PIL import Image

    ramp = torch.linspace(0, 1, 64).reshape(1, 8, 8)
    images = {0: ramp * 4.0 - 2.0, 1: (ramp * 255).round().to(torch.uint8), 2: torch.zeros(3, 8, 8)}
    oracle = FileOracle(tmp_path, lambda i: images[i], ["a", "b"])
    oracle.write_query([0, 1, 2], 0)

    def pixels(i):
        picture = Image.open(tmp_path / "thumbnails" / f"{i}.png")
        return np.asarray(picture)[:: picture.height // 8, :: picture.width // 8]  # one per pixel

    expected = (ramp[0] * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(pixels(0), expected) and np.array_equal(pixels(1), expected)
    assert pixels(2).shape == (8, 8, 3) and not pixels(2).any()  # constant: black, not NaN
    oracle = FileOracle(tmp_path / "bad", lambda i: torch.zeros(8, 8), ["a", "b"])
    with pytest.raises(ValueError, match=r"\[C, H, W\] tensor with C 1, 3 or 4, got \(8, 8\)"):
        oracle.write_query([0], 0)


def test_file_oracle_round_trips_and_resumes_when_answers_arrive(tmp_path):
    pool, pool_y, *_ = _embedding_pool()
    folder = tmp_path / "oracle"
    images = torch.randint(0, 255, (300, 1, 8, 8), dtype=torch.uint8)
    names = ["cat", "dog", "eel", "fox"]
    oracle = FileOracle(folder, lambda i: images[i], names)

    def run():
        return _embedding_loop(tmp_path / "run", "margin", rounds=1, oracle=oracle).run(resume=True)

    with pytest.raises(AwaitingAnswers, match="waiting for 8 answer"):
        run()
    with open(folder / "queries.csv", newline="") as f:
        query = list(csv.DictReader(f))
    asked = [int(r["index"]) for r in query]
    assert asked == initial_indices(300, 8, 0) and {r["round"] for r in query} == {"0"}
    assert all((folder / r["thumbnail"]).is_file() for r in query)
    # half the answers, as names and as numbers: saved, the run stops again for the rest
    _answer(
        folder,
        [(i, names[int(pool_y[i])]) for i in asked[:3]] + [(asked[3], str(int(pool_y[asked[3]])))],
    )
    with pytest.raises(AwaitingAnswers, match="waiting for 4 answer"):
        run()
    saved = json.loads((tmp_path / "run" / "state.json").read_text())["state"]
    assert saved["labeled"] == asked[:4] and saved["pending"] == asked[4:]
    _answer(folder, [(i, names[int(pool_y[i])]) for i in asked])
    with pytest.raises(AwaitingAnswers, match="waiting for 10 answer"):
        run()  # trained on the 8, queried 10 more
    with open(folder / "queries.csv", newline="") as f:
        query = list(csv.DictReader(f))
    second = [int(r["index"]) for r in query]
    assert len(second) == 10 and not set(second) & set(asked)
    assert {r["round"] for r in query} == {"1"}  # the round its labels complete
    _answer(folder, [(i, names[int(pool_y[i])]) for i in asked + second])
    state = run()
    assert state.labeled == asked + second
    assert state.labels == [int(pool_y[i]) for i in asked + second]


def test_file_oracle_rejects_bad_answers(tmp_path):
    oracle = FileOracle(tmp_path, lambda i: torch.zeros(1, 4, 4, dtype=torch.uint8), ["a", "b"])
    _answer(tmp_path, [(0, "zebra")])
    with pytest.raises(ValueError, match="line 2: label 'zebra' is neither a class name"):
        oracle.read_answers()
    _answer(tmp_path, [(0, "a"), (1, "b"), (0, "0"), (0, "b")])  # the same label twice is fine
    with pytest.raises(ValueError, match="line 5: index 0 is answered differently on line 2"):
        oracle.read_answers()
    (tmp_path / "answers.csv").write_text("idx,lbl\n0,a\n")
    with pytest.raises(ValueError, match="needs the columns 'index' and 'label'"):
        oracle.read_answers()


# ---- kill -9 between any two steps, then resume --------------------------------------------------

KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    sys.path.insert(0, {test_dir!r})
    from test_active import _embedding_loop, _embedding_pool
    from labelkit_ext.methods.active import SimulatedOracle

    out, step, occurrence, log = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    seen = {{}}

    class LoggingOracle(SimulatedOracle):
        def answer(self, indices, round):
            with open(log, "a") as f:  # every index the oracle is asked for, durably
                f.write(" ".join(map(str, indices)) + "\\n")
                f.flush(); os.fsync(f.fileno())
            return super().answer(indices, round)

    def on_step(name, state):
        seen[name] = seen.get(name, 0) + 1
        if name == step and seen[name] == occurrence:
            os.kill(os.getpid(), signal.SIGKILL)

    loop = _embedding_loop(out, "cluster-margin", rounds=3, oracle=LoggingOracle(_embedding_pool()[1]),
                           on_step=on_step)
    loop.run(resume=True)
    """
)


@pytest.mark.parametrize(
    "step,occurrence",
    [
        ("initial", 1),
        ("answered", 2),
        ("trained", 2),
        ("evaluated", 3),
        ("scored", 2),
        ("selected", 3),
    ],
)
def test_sigkill_after_any_step_resumes_to_the_identical_run(tmp_path, step, occurrence):
    assert step in STEPS
    reference = _embedding_loop(tmp_path / "reference", "cluster-margin", rounds=3).run()
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT.format(test_dir=str(Path(__file__).parent)))
    out, log = tmp_path / "run", tmp_path / "asked.txt"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    killed = subprocess.run([sys.executable, str(script), str(out), step, str(occurrence), str(log)],
                            env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    finished = subprocess.run([sys.executable, str(script), str(out), "none", "0", str(log)],
                              env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert finished.returncode == 0, finished.stderr
    resumed = load_state(out / "state.json", reference.fingerprint, 300, 4)
    assert resumed.labeled == reference.labeled and resumed.labels == reference.labels
    assert [r["accuracy"] for r in resumed.records] == [r["accuracy"] for r in reference.records]
    asked = [int(i) for i in log.read_text().split()]
    assert sorted(asked) == sorted(reference.labeled)  # nothing asked twice


# ---- report ---------------------------------------------------------------------------------------


def test_area_under_curve_and_labels_to_target_by_hand():
    assert area_under_curve([10, 20, 40], [0.5, 0.7, 0.9]) == pytest.approx(
        ((0.5 + 0.7) / 2 * 10 + (0.7 + 0.9) / 2 * 20) / 30
    )
    assert area_under_curve([10], [0.5]) is None
    assert labels_to_reach([10, 20, 40], [0.5, 0.7, 0.9], 0.7) == 20
    assert labels_to_reach([10, 20, 40], [0.5, 0.7, 0.9], 0.95) is None
    records = {0: [{"labels": 10, "accuracy": 0.5}, {"labels": 20, "accuracy": 0.9, "selection_seconds": 1.0}],
               1: [{"labels": 10, "accuracy": 0.7}, {"labels": 20, "accuracy": 0.7}]}  # fmt: skip
    s = summarize_strategy(records, 0.8)
    assert s["accuracy_mean"] == pytest.approx([0.6, 0.8])
    spread = statistics.stdev([0.5, 0.7])  # the sample std over the seeds, as in every method
    assert s["accuracy_std"] == pytest.approx([spread, spread])
    assert s["final_accuracy_std"] == pytest.approx(statistics.stdev([0.9, 0.7]))
    assert s["aulc_mean"] == pytest.approx(0.7) and s["labels_to_target_per_seed"] == [20, None]
    assert s["aulc_std"] == pytest.approx(statistics.stdev([0.7, 0.7]))
    assert s["seeds_reaching_target"] == 1 and math.isclose(s["mean_selection_seconds"], 1.0)
    one = summarize_strategy({0: records[0]}, 0.8)  # one seed: no std, the table shows the mean
    assert one["accuracy_std"] is None and one["final_accuracy_std"] is None
    assert "0.9000 " in summary_table({"entropy": one}) and "±" not in summary_table(
        {"entropy": one}
    )


# ---- networks and the CLI -------------------------------------------------------------------------


def test_net_learner_scores_mc_dropout_and_resumes_a_round(tmp_path):
    splits = load_dataset("digits", image_size=8)
    config = TrainConfig(epochs=2, batch_size=16, device="cpu", quiet=True)
    learner = NetLearner(splits, "small-cnn", config, workdir=tmp_path, dropout=0.5)
    idx = initial_indices(learner.pool_size, 30, 0)
    y = splits.train_eval.targets[idx].tolist()
    learner.fit(idx, y, round=0)
    scores = learner.score(("logits", "embeddings", "mc_logits"), mc_samples=4)
    n = learner.pool_size
    assert scores.logits.shape == (n, 10) and scores.embeddings.shape == (n, 128)
    assert scores.mc_logits.shape == (4, n, 10)
    assert not torch.equal(scores.mc_logits[0], scores.mc_logits[1])  # masks differ
    # the round's checkpoint makes a refit (after a kill) return the same weights at once
    again = NetLearner(splits, "small-cnn", config, workdir=tmp_path, dropout=0.5)
    assert again.fit(idx, y, round=0)["epochs_resumed"] == 2
    assert torch.equal(again.score(("logits",), 1).logits, scores.logits)
    with pytest.raises(ValueError, match="--dropout needs a model among"):
        NetLearner(splits, "resnet18", config, dropout=0.5)
    without = NetLearner(splits, "small-cnn", config)
    without.fit(idx, y, round=0)
    with pytest.raises(ValueError, match="need dropout layers: build small-cnn with --dropout"):
        without.score(("mc_logits",), 2)
    # a model without the option is told to change model, not to pass --dropout
    resnet = NetLearner(splits, "resnet18", config)
    resnet.model = build_model("resnet18", 10, 1, 8)
    with pytest.raises(ValueError, match=r"resnet18 takes no --dropout: use a model among "
                       r"\('small-cnn', 'wrn-28-10'\) with --dropout > 0"):  # fmt: skip
        resnet.score(("mc_logits",), 2)


TINY = ["--dataset", "digits", "--image-size", "8", "--epochs", "2", "--batch-size", "16",
        "--device", "cpu", "--rounds", "2", "--query-size", "10", "--initial-size", "10",
        "--num-seeds", "2", "--mc-samples", "3", "--quiet"]  # fmt: skip


def test_run_active_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "run",
        "active",
        *TINY,
        "--strategies",
        "random,entropy,bald,cluster-margin",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert (out / "learning_curves.png").stat().st_size > 0
    assert set(results["summary"]) == {"random", "entropy", "bald", "cluster-margin"}
    for name, s in results["summary"].items():
        assert s["labels"] == [10, 20, 30] and s["seeds"] == [0, 1], name
        assert len(s["accuracy_per_seed"]) == 2 and s["aulc_mean"] is not None
        assert name in printed
    # same initial labels for every strategy of a seed
    first = {n: results["records"][n]["0"][0]["accuracy"] for n in results["summary"]}
    assert len(set(first.values())) == 1
    # a finished run resumes to the same numbers; without --resume it is refused
    assert main([*args, "--resume"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert (
        again["summary"]["entropy"]["accuracy_mean"]
        == results["summary"]["entropy"]["accuracy_mean"]
    )
    assert main(args) == 2
    assert "pass --resume" in capsys.readouterr().err
    # another augmentation or validation share is another run (states from before record
    # neither: the defaults)
    assert main([*args, "--resume", "--no-augment"]) == 2
    assert "augment=None -> False" in capsys.readouterr().err
    assert main([*args, "--resume", "--val-fraction", "0.2"]) == 2
    assert "val_fraction=None -> 0.2" in capsys.readouterr().err
    assert main([*args, "--resume", "--num-workers", "2"]) == 2  # other augmentation streams
    assert "num_workers=None -> 2" in capsys.readouterr().err


@pytest.mark.parametrize(
    "option,message",
    [
        (["--strategies", "entropy,nope"], "strategies must name strategies"),
        (["--num-seeds", "0"], "num_seeds must be >= 1"),
        (["--query-size", "0"], "query_size must be >= 1"),
        (["--model", "resnet18", "--dropout", "0.3"], "--dropout needs a model among"),
    ],
)
def test_run_active_bad_options_are_clear_errors(tmp_path, capsys, option, message):
    assert main(["run", "active", *TINY, "--out", str(tmp_path / "x"), *option]) == 2
    assert message in capsys.readouterr().err


def test_run_active_on_an_embedding_pool(tmp_path, capsys):
    pool, pool_y, test, test_y = _embedding_pool()
    file = tmp_path / "pool.pt"
    torch.save({"pool": pool, "pool_targets": pool_y, "test": test, "test_targets": test_y}, file)
    out = tmp_path / "run"
    assert main(["run", "active", "--embeddings", str(file), "--strategies", "coreset,badge,density",
                 "--rounds", "2", "--num-seeds", "1", "--device", "cpu", "--quiet", "--out", str(out)]) == 0  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert results["summary"]["coreset"]["labels"] == [20, 40, 60]


@pytest.mark.parametrize(
    "mend,message",
    [
        (lambda d: d.update(pool_targets=d["pool_targets"][:50]), "but 50 pool_targets"),
        (
            lambda d: d.update(pool_targets=torch.cat([d["pool_targets"]] * 2)),
            "pool embeddings but",
        ),
        (lambda d: d.update(test_targets=d["test_targets"][1:]), "test embeddings but"),
        (
            lambda d: d.update(pool_targets=d["pool_targets"].float()),
            "must be a 1-D integer tensor",
        ),
        (lambda d: d.update(pool_targets=d["pool_targets"] - 1), "holds a negative class (-1)"),
        (lambda d: d.update(test=d["test"].tolist()), "'test' must be a tensor, got list"),
    ],
)
def test_run_active_refuses_a_bad_embedding_file_before_any_round(tmp_path, capsys, mend, message):
    """The oracle answers with pool_targets by row index: a short list failed mid-run with an
    IndexError, a long one silently added classes."""
    pool, pool_y, test, test_y = _embedding_pool()
    data = {"pool": pool, "pool_targets": pool_y, "test": test, "test_targets": test_y}
    mend(data)
    file = tmp_path / "pool.pt"
    torch.save(data, file)
    out = tmp_path / "run"
    assert main(["run", "active", "--embeddings", str(file), "--strategies", "margin",
                 "--rounds", "1", "--num-seeds", "1", "--device", "cpu", "--quiet", "--out", str(out)]) == 2  # fmt: skip
    assert message in capsys.readouterr().err
    assert not list(out.rglob("state.json"))


def test_run_active_with_the_file_oracle_stops_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "active", *TINY, "--strategies", "margin", "--num-seeds", "1", "--rounds", "1",
            "--oracle", "file", "--out", str(out), "--resume"]  # fmt: skip
    targets = load_dataset("digits", image_size=8).train_eval.targets
    folder = out / "runs" / "margin" / "seed_0" / "oracle"
    answered: list[int] = []
    for expected in (10, 10):  # the initial query, then the round-0 query
        assert main(args) == 0
        assert "stopped cleanly: waiting for 10 answer(s)" in capsys.readouterr().out
        with open(folder / "queries.csv", newline="") as f:
            asked = [int(r["index"]) for r in csv.DictReader(f)]
        assert len(asked) == expected and not set(asked) & set(answered)
        answered += asked
        _answer(folder, [(i, str(int(targets[i]))) for i in answered])
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["summary"]["margin"]["labels"] == [10, 20]
    state = json.loads((out / "runs" / "margin" / "seed_0" / "state.json").read_text())["state"]
    assert state["labeled"] == answered


def _torchrun_active(args: list[str]):
    return torchrun_labelkit("run", "active", *args)


def _score_worker(rank: int, out_dir: str) -> None:
    learner = _scoring_learner()
    scores = learner.score(("logits", "embeddings", "mc_logits"), mc_samples=3)
    torch.save(scores.__dict__, os.path.join(out_dir, f"scores{rank}.pt"))


def _scoring_learner() -> NetLearner:
    """A NetLearner holding a fixed (untrained, seeded) small-cnn with dropout."""
    from labelkit_ext.models import build_model

    splits = load_dataset("digits", image_size=8)
    learner = NetLearner(splits, "small-cnn", TrainConfig(device="cpu", quiet=True,
                                                          eval_batch_size=64), dropout=0.5)  # fmt: skip
    torch.manual_seed(0)
    learner.model = build_model("small-cnn", 10, 1, 8, dropout=0.5).eval()
    return learner


def test_net_learner_scores_the_pool_in_shards_under_torchrun(tmp_path):
    """Two gloo ranks score strided shards; gathered, they are one process's pool scores."""
    spawn(_score_worker, str(tmp_path))
    single = _scoring_learner().score(("logits", "embeddings"), mc_samples=1)
    for rank in range(2):
        got = torch.load(tmp_path / f"scores{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["logits"], single.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["embeddings"], single.embeddings, rtol=1e-5, atol=1e-5)
        assert got["mc_logits"].shape == (3, *single.logits.shape)
    # Every rank holds the same gathered MC samples (each row drawn by the rank that owns it).
    ranks = [torch.load(tmp_path / f"scores{r}.pt", weights_only=True) for r in range(2)]
    assert torch.equal(ranks[0]["mc_logits"], ranks[1]["mc_logits"])


# The pairwise strategies under torchrun: (name, strategy options, the rows each rank reads
# of the pairwise input: the whole pool's, the unlabeled or the labeled samples' share).
SHARDED = [
    ("coreset", {}, "pool"),
    ("coreset", {"metric": "cosine"}, "pool"),
    ("badge", {}, "unlabeled"),
    ("similarity", {}, "labeled"),
    ("density", {"max_references": 40}, None),  # its references overlap the queries
]


def _sharded_pool() -> tuple[PoolScores, list[int], list[int]]:
    """A float32 pool of 61 with 9 labeled samples, seeded (no near-ties)."""
    g = torch.Generator().manual_seed(5)
    scores = PoolScores(logits=torch.randn(61, 4, generator=g) * 2,
                        embeddings=torch.randn(61, 6, generator=g))  # fmt: skip
    labeled = [3, 7, 8, 20, 33, 34, 41, 50, 60]
    return scores, labeled, [i % 4 for i in range(len(labeled))]


def _sharded_select(name, options, scores, labeled, labels, dist_info=None, checked=True):
    """The strategy's query; ``checked=False`` skips ``select``'s finite-scores check (for
    scores with NaN rows the strategy must not read)."""
    kw = {} if dist_info is None else {"dist_info": dist_info}
    ctx = _ctx(scores, labeled, labels, budget=12, seed=3, round=1, **kw)
    strategy = build_strategy(name, **options)
    if checked:
        return select(strategy, ctx).tolist()
    return check_selection(strategy.select(ctx), ctx, name).tolist()


def _poison_other_shards(scores: PoolScores, rows: str, labeled: list[int]) -> PoolScores:
    """The scores with every row of the strategy's pairwise input outside this rank's share set
    to NaN: a strategy that reads them would pick differently (or fail)."""
    from labelkit_ext.distributed import shard_bounds

    index = torch.arange(61)
    if rows == "unlabeled":
        index = index[~torch.isin(index, torch.tensor(labeled))]
    elif rows == "labeled":
        index = torch.tensor(labeled)
    start, end = shard_bounds(len(index))
    others = torch.cat([index[:start], index[end:]])
    poisoned = PoolScores(scores.logits.clone(), scores.embeddings.clone())
    poisoned.embeddings[others] = float("nan")
    if rows == "unlabeled":
        poisoned.logits[others] = float("nan")
    return poisoned


def _sharded_strategy_worker(rank: int, out_dir: str) -> None:
    from labelkit_ext.engine import current_dist

    scores, labeled, labels = _sharded_pool()
    picks = {}
    for name, options, rows in SHARDED:
        key = f"{name}-{options}"
        # Without dist_info a context is one process's, whatever else runs: no collective.
        picks[key] = _sharded_select(name, options, scores, labeled, labels)
        picks[f"{key}-sharded"] = _sharded_select(
            name, options, scores, labeled, labels, current_dist()
        )
        if rows is not None:
            poisoned = _poison_other_shards(scores, rows, labeled)
            picks[f"{key}-own-rows"] = _sharded_select(
                name, options, poisoned, labeled, labels, current_dist(), checked=False
            )
    Path(out_dir, f"picks{rank}.json").write_text(json.dumps(picks))


def test_pairwise_strategies_split_the_pool_over_ranks_and_select_as_one_process(tmp_path):
    """With the ranks' dist_info every rank runs the pairwise strategies on its share of the
    rows (rows outside it may be NaN) and gets one process's query; without it, each rank
    selects alone."""
    spawn(_sharded_strategy_worker, str(tmp_path))
    scores, labeled, labels = _sharded_pool()
    for rank in range(2):
        picks = json.loads((tmp_path / f"picks{rank}.json").read_text())
        for name, options, rows in SHARDED:
            key = f"{name}-{options}"
            expected = _sharded_select(name, options, scores, labeled, labels)
            assert len(expected) == 12 and not set(expected) & set(labeled)
            assert picks[key] == expected and picks[f"{key}-sharded"] == expected, key
            if rows is not None:
                assert picks[f"{key}-own-rows"] == expected, key


def _cluster_margin_worker(rank: int, out_dir: str) -> None:
    import labelkit_ext.distributed as sharded
    from labelkit_ext.engine import current_dist

    keys_seen = []
    plain_topk = sharded.cosine_topk

    def counting_topk(queries, keys, *args, **kwargs):
        keys_seen.append(keys.shape[0])
        return plain_topk(queries, keys, *args, **kwargs)

    sharded.cosine_topk = counting_topk
    scores, labeled, labels = _sharded_pool()
    picks = _sharded_select("cluster-margin", {"num_clusters": 7}, scores, labeled, labels,
                            current_dist())  # fmt: skip
    Path(out_dir, f"picks{rank}.json").write_text(json.dumps([picks, keys_seen]))


def test_cluster_margin_splits_its_k_means_over_ranks_and_clusters_as_one_process(tmp_path):
    """Under torchrun each rank assigns the pool to its share of the 7 centres (4 or 3 of
    them); the clusters, and so the query, are one process's."""
    spawn(_cluster_margin_worker, str(tmp_path))
    scores, labeled, labels = _sharded_pool()
    expected = _sharded_select("cluster-margin", {"num_clusters": 7}, scores, labeled, labels)
    assert len(expected) == 12 and not set(expected) & set(labeled)
    for rank in range(2):
        picks, keys_seen = json.loads((tmp_path / f"picks{rank}.json").read_text())
        assert picks == expected
        assert keys_seen and set(keys_seen) == {4 - rank}


def test_non_finite_pool_scores_are_refused_before_selection():
    scores, labeled, labels = _sharded_pool()
    scores.embeddings[30, 2] = float("inf")
    with pytest.raises(
        ValueError, match=r"strategy 'coreset': the pool's embeddings hold NaN or inf"
    ):
        _sharded_select("coreset", {}, scores, labeled, labels)
    assert len(_sharded_select("margin", {}, scores, labeled, labels)) == 12  # logits are fine


def test_torchrun_two_gloo_processes_with_a_simulated_and_a_file_oracle(tmp_path):
    """Under torchrun rank 0 alone keeps the state and asks the oracle; every rank trains (DDP)
    on the same labeled set and selects (core-set split over the ranks); a run stops, resumes
    and refuses like one process."""
    out = tmp_path / "sim"
    done = _torchrun_active([*TINY, "--strategies", "margin,coreset", "--num-seeds", "1",
                             "--out", str(out)])  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2
    assert results["summary"]["coreset"]["labels"] == [10, 20, 30]
    assert done.stdout.count("active | digits") == 1  # rank 0 alone prints
    again = _torchrun_active([*TINY, "--strategies", "margin,coreset", "--num-seeds", "1",
                              "--out", str(out)])  # fmt: skip
    assert (
        again.returncode != 0
        and "holds a previous run (results.json): pass --resume" in again.stderr
    )

    out = tmp_path / "file"
    args = [*TINY, "--strategies", "margin", "--num-seeds", "1", "--rounds", "1",
            "--oracle", "file", "--out", str(out), "--resume"]  # fmt: skip
    targets = load_dataset("digits", image_size=8).train_eval.targets
    folder = out / "runs" / "margin" / "seed_0" / "oracle"
    answered: list[int] = []
    for _ in range(2):  # the initial query, then the round-0 query
        done = _torchrun_active(args)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("stopped cleanly: waiting for 10 answer(s)") == 1
        with open(folder / "queries.csv", newline="") as f:
            asked = [int(r["index"]) for r in csv.DictReader(f)]
        assert len(asked) == 10 and not set(asked) & set(answered)
        answered += asked
        _answer(folder, [(i, str(int(targets[i]))) for i in answered])
    done = _torchrun_active(args)
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((out / "runs" / "margin" / "seed_0" / "state.json").read_text())["state"]
    assert state["labeled"] == answered and len(state["records"]) == 2
