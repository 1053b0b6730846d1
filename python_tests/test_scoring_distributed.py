"""labelkit_ext.distributed: the pool sharded over 2 CPU processes (gloo) gives exactly the
single-process answer for top-k, reductions, k-center and BADGE."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from labelkit_ext import badge_select, cosine_reduce, cosine_topk, distributed, kcenter_greedy
from labelkit_ext.distributed import (
    shard_bounds,
    sharded_badge_select,
    sharded_cosine_reduce,
    sharded_cosine_topk,
    sharded_kcenter_greedy,
)
from labelkit_ext.engine.distributed import DistInfo

WORLD = 2


def _pool():
    """float64 data whose ties are exact: keys are random vectors plus scaled basis vectors and a
    zero vector (similarities with a basis vector are exact, so equal ones tie bit for bit; two
    similarities that are only mathematically equal may round apart in a GEMM, and then rank by
    their rounded values). k-center euclidean runs on integer coordinates (exact distances, many
    ties and duplicates), cosine on random ones."""
    g = torch.Generator().manual_seed(0)
    queries = torch.randn(17, 5, generator=g, dtype=torch.float64)
    queries[0] = torch.tensor([1.0, 2.0, 0.0, 0.0, 0.0])
    queries[1] = 0.0
    basis = torch.eye(5, dtype=torch.float64)
    keys = torch.cat(
        [torch.randn(30, 5, generator=g, dtype=torch.float64), basis * 2, basis, torch.zeros(1, 5)]
    )
    emb = torch.randint(-4, 5, (61, 6), generator=g).double()
    emb[30] = emb[31]
    emb_cos = torch.randn(61, 6, generator=g, dtype=torch.float64)
    probs = torch.softmax(torch.randn(61, 4, generator=g, dtype=torch.float64) * 2, 1)
    return queries, keys, emb, emb_cos, probs


@contextlib.contextmanager
def _gloo_group(rank: int, init_file: str):
    """This process as ``rank`` of a WORLD-process gloo group, one thread, left on exit."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    with _gloo_group(rank, init_file):
        queries, keys, emb, emb_cos, probs = _pool()
        ks, ke = shard_bounds(keys.shape[0])
        es, ee = shard_bounds(emb.shape[0])
        result = {}
        for largest in (True, False):
            top = sharded_cosine_topk(queries, keys[ks:ke], 7, largest, tile_size=5)
            result[f"topk_{largest}"] = (top.values, top.indices)
        for reduce in ("max", "min", "mean", "sum"):
            result[f"reduce_{reduce}"] = sharded_cosine_reduce(queries, keys[ks:ke], reduce)
        for metric, x in (("euclidean", emb), ("cosine", emb_cos)):
            result[f"kcenter_{metric}"] = sharded_kcenter_greedy(x[es:ee], 20, None, metric)
            result[f"kcenter_lab_{metric}"] = sharded_kcenter_greedy(
                x[es:ee], 20, [3, 50, 31], metric
            )
        # Labeled centers folded one per block (a pool too large for the whole set at once).
        distributed._FOLD_ENTRIES = 1
        result["kcenter_lab_blocks"] = sharded_kcenter_greedy(emb[es:ee], 20, [3, 50, 31, 7])
        for seed in (0, 1, 2):
            result[f"badge_{seed}"] = sharded_badge_select(probs[es:ee], emb[es:ee], 15, seed)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def _single_process():
    queries, keys, emb, emb_cos, probs = _pool()
    result = {}
    for largest in (True, False):
        top = cosine_topk(queries, keys, 7, largest)
        result[f"topk_{largest}"] = (top.values, top.indices)
    for reduce in ("max", "min", "mean", "sum"):
        result[f"reduce_{reduce}"] = cosine_reduce(queries, keys, reduce)
    for metric, x in (("euclidean", emb), ("cosine", emb_cos)):
        result[f"kcenter_{metric}"] = kcenter_greedy(x, 20, None, metric)
        result[f"kcenter_lab_{metric}"] = kcenter_greedy(x, 20, [3, 50, 31], metric)
    result["kcenter_lab_blocks"] = kcenter_greedy(emb, 20, [3, 50, 31, 7])
    for seed in (0, 1, 2):
        result[f"badge_{seed}"] = badge_select(probs, emb, 15, seed)
    return result


def test_shard_bounds_cover_the_pool():
    bounds = [shard_bounds(11, DistInfo(rank=r, world_size=3)) for r in range(3)]
    assert bounds == [(0, 4), (4, 8), (8, 11)]
    assert shard_bounds(5) == (0, 5)  # one process


def test_sharded_equals_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    expected = _single_process()
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got.keys() == expected.keys()
        for key, want in expected.items():
            if isinstance(want, tuple):
                torch.testing.assert_close(got[key][0], want[0], rtol=1e-12, atol=1e-12)
                assert torch.equal(got[key][1], want[1]), key
            elif want.dtype == torch.int64:
                assert got[key].tolist() == want.tolist(), key
            else:
                torch.testing.assert_close(got[key], want, rtol=1e-12, atol=1e-12)


def _nan_worker(rank: int, init_file: str, out_dir: str) -> None:
    """Rank 1's shard holds a NaN: every helper must raise on both ranks (the plain op would
    raise on rank 1 alone and leave rank 0 waiting in the next collective)."""
    with _gloo_group(rank, init_file):
        queries, keys, emb, emb_cos, probs = _pool()
        ks, ke = shard_bounds(keys.shape[0])
        es, ee = shard_bounds(emb.shape[0])
        keys, emb, probs = keys.clone(), emb.clone(), probs.clone()
        if rank == 1:
            keys[ke - 1, 0] = emb[ee - 1, 0] = float("nan")
            probs[ee - 1, 0] = float("inf")
        calls = {
            "topk": lambda: sharded_cosine_topk(queries, keys[ks:ke], 3),
            "reduce": lambda: sharded_cosine_reduce(queries, keys[ks:ke], "mean"),
            "kcenter": lambda: sharded_kcenter_greedy(emb[es:ee], 5),
            "badge_probs": lambda: sharded_badge_select(probs[es:ee], emb_cos[es:ee], 5),
            "badge_emb": lambda: sharded_badge_select(
                torch.softmax(emb_cos[es:ee, :4], 1), emb[es:ee], 5
            ),
        }
        errors = {}
        for name, call in calls.items():
            try:
                call()
                errors[name] = None
            except ValueError as exc:
                errors[name] = str(exc)
        torch.save(errors, os.path.join(out_dir, f"nan{rank}.pt"))


def test_a_non_finite_shard_is_an_error_on_every_rank(tmp_path):
    mp.spawn(_nan_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        errors = torch.load(tmp_path / f"nan{rank}.pt", weights_only=True)
        assert len(errors) == 5
        for name, message in errors.items():
            assert message is not None, (rank, name)
            assert "the inputs must be finite (NaN or inf on rank(s) [1])" in message, message
