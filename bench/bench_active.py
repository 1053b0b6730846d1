"""Benchmark one active-learning selection round: entropy, core-set and BADGE on the same pool,
ours (the ``labelkit_ext.methods.active`` strategies on our scoring ops: ``uncertainty``,
``kcenter_greedy`` and ``badge_select``, the benchmark of the last two) vs the peers that have
the strategy: baal (entropy), modAL (entropy), scikit-activeml (entropy, core-set, BADGE).

    python bench/bench_active.py                          # pools of 50,000 and 200,000 x 128
    python bench/bench_active.py --n 50000 --peers skactiveml --strategies coreset

The pool is N embeddings (D = 128, Gaussian clusters) with C-class logits; ``--labeled``
samples are already labeled and ``--budget`` are selected. Every provider gets the same inputs
(peers: softmax probabilities as NumPy arrays, computed outside the timed region; ours: the
logits, softmax inside). Before timing, the picks are compared: entropy must select the same
set as ours, core-set the same sequence (both are deterministic), BADGE (randomised) a valid
batch. Peak memory: the larger of torch's allocator (profiler) and Python's tracemalloc (NumPy)
peaks above the baseline. The peers are benchmark-only extras, not dependencies:
``pip install baal modAL-python scikit-activeml`` (a missing one is reported and skipped).

Writes ``<out>/<device>/active.csv`` and ``active.md``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # an installed labelkit_ext, if any, still wins

import numpy as np  # noqa: E402
import torch  # noqa: E402

import labelkit_ext  # noqa: E402
from bench import common  # noqa: E402
from labelkit_ext.methods.active import PoolScores, SelectionContext, build_strategy, select  # noqa: E402

STRATEGIES = ("entropy", "coreset", "badge")
PEERS = ("baal", "modal", "skactiveml")
PEER_MODULES = {"baal": "baal", "modal": "modAL", "skactiveml": "skactiveml"}
COLUMNS = (
    "strategy", "provider", "device", "n", "d", "c", "labeled", "budget", "time_ms", "iqr_ms",
    "samples", "speedup_vs_provider", "peak_mem_mb", "check", "ours_native", "other_cpu_pct",
    "torch", "threads",
)  # fmt: skip
KEY = ("strategy", "n", "d", "c", "labeled", "budget")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", type=common.size_list, default=[50_000, 200_000], help="pool sizes")
    p.add_argument("--d", type=int, default=128, help="embedding size")
    p.add_argument("--c", type=int, default=10, help="classes")
    p.add_argument("--labeled", type=int, default=1_000, help="already labeled samples")
    p.add_argument("--budget", type=int, default=100, help="samples selected")
    p.add_argument("--strategies", type=common.choice_list(STRATEGIES), default=list(STRATEGIES))
    p.add_argument("--peers", type=common.choice_list(PEERS), default=list(PEERS))
    p.add_argument(
        "--device", type=common.device_arg, default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--min-run-time", type=float, default=0.5)
    p.add_argument(
        "--min-samples",
        type=int,
        default=1,
        help="peers take seconds: one timed call is the default",
    )
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    return p.parse_args(argv)


def make_pool(n: int, d: int, c: int, labeled: int, seed: int) -> dict:
    """Clustered embeddings, logits of a noisy linear head, and a random labeled set."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(c, d, generator=g) * 3
    y = torch.randint(0, c, (n,), generator=g)
    emb = centres[y] + torch.randn(n, d, generator=g) * 2
    logits = emb @ centres.T / d + torch.randn(n, c, generator=g)
    lab = torch.randperm(n, generator=g)[:labeled]
    return {"embeddings": emb, "logits": logits, "labeled": lab, "targets": y}


# ---- providers: each returns the selected pool indices (a 1-D int array) -----------------------------


def ours(strategy: str, pool: dict, budget: int, device: torch.device) -> Callable[[], np.ndarray]:
    scores = PoolScores(logits=pool["logits"].to(device), embeddings=pool["embeddings"].to(device))
    labels = pool["targets"][pool["labeled"]]
    n, c = pool["logits"].shape
    ctx = SelectionContext(scores, pool["labeled"], labels, budget, n, c)
    chosen = build_strategy(strategy)
    return lambda: select(chosen, ctx).numpy()


def _numpy_inputs(pool: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    # float64, as the peers' NumPy code computes; ours runs float32 (docs/methods/active.md).
    probs = pool["logits"].double().softmax(1).numpy()
    mask = np.ones(len(probs), dtype=bool)
    mask[pool["labeled"].numpy()] = False
    return probs, pool["embeddings"].double().numpy(), mask, np.flatnonzero(mask)


def baal_entropy(pool: dict, budget: int) -> Callable[[], np.ndarray]:
    from baal.active.heuristics import Entropy

    probs, _, _, unlabeled = _numpy_inputs(pool)
    heuristic = Entropy()
    candidates = probs[unlabeled][:, :, None]  # baal's [N, C, iterations]
    return lambda: unlabeled[np.asarray(heuristic(candidates))[:budget]]


def modal_entropy(pool: dict, budget: int) -> Callable[[], np.ndarray]:
    from modAL.uncertainty import entropy_sampling

    probs, _, _, unlabeled = _numpy_inputs(pool)

    class Precomputed:  # modAL asks a fitted estimator for predict_proba(X)
        def predict_proba(self, x: np.ndarray) -> np.ndarray:
            return probs[x[:, 0]]

    rows = unlabeled[:, None]

    def run() -> np.ndarray:
        picked = entropy_sampling(Precomputed(), rows, n_instances=budget)
        picked = picked[0] if isinstance(picked, tuple) else picked  # (indices, rows) in 0.4
        return unlabeled[np.asarray(picked)]

    return run


def _skactiveml_classifier(probs: np.ndarray, embeddings: np.ndarray, classes: int):
    from skactiveml.base import SkactivemlClassifier

    class Precomputed(SkactivemlClassifier):
        """Serves the pool's precomputed probabilities (and embeddings, for BADGE); X holds row ids."""

        def __init__(self, classes=None, missing_label=-1):
            super().__init__(classes=classes, missing_label=missing_label)

        def fit(self, X, y, sample_weight=None):
            self._validate_data(X, y)
            return self

        def predict_proba(self, X, return_embeddings=False):
            rows = np.asarray(X)[:, 0].astype(np.int64)
            return (probs[rows], embeddings[rows]) if return_embeddings else probs[rows]

    return Precomputed(classes=np.arange(classes), missing_label=-1)


def _skactiveml_labels(pool: dict, mask: np.ndarray) -> np.ndarray:
    y = np.full(len(mask), -1, dtype=np.int64)
    y[~mask] = pool["targets"].numpy()[~mask]
    return y


def skactiveml_select(strategy: str, pool: dict, budget: int) -> Callable[[], np.ndarray]:
    from skactiveml.pool import Badge, CoreSet, UncertaintySampling

    probs, emb, mask, _ = _numpy_inputs(pool)
    y = _skactiveml_labels(pool, mask)
    n, c = probs.shape
    rows = np.arange(n)[:, None].astype(np.float64)
    if strategy == "coreset":
        qs = CoreSet(missing_label=-1, random_state=0)
        return lambda: np.asarray(qs.query(emb, y, batch_size=budget))
    clf = _skactiveml_classifier(probs, emb, c).fit(rows, y)
    if strategy == "entropy":
        qs = UncertaintySampling(method="entropy", missing_label=-1, random_state=0)
    else:
        qs = Badge(missing_label=-1, random_state=0, clf_embedding_flag_name="return_embeddings")
    return lambda: np.asarray(qs.query(rows, y, clf, fit_clf=False, batch_size=budget))


def peer_callable(
    peer: str, strategy: str, pool: dict, budget: int
) -> Callable[[], np.ndarray] | None:
    """The peer's selection, or None where it has no such strategy."""
    if peer == "skactiveml":
        return skactiveml_select(strategy, pool, budget)
    if strategy != "entropy":
        return None  # baal and modAL have neither core-set nor BADGE
    return baal_entropy(pool, budget) if peer == "baal" else modal_entropy(pool, budget)


# ---- checks, timing, memory ---------------------------------------------------------------------------


def check(strategy: str, picks: np.ndarray, reference: np.ndarray, pool: dict, budget: int) -> str:
    picks = np.asarray(picks).astype(np.int64)
    labeled = set(pool["labeled"].tolist())
    if len(picks) != budget or len(set(picks.tolist())) != budget or labeled & set(picks.tolist()):
        raise common.Mismatch(f"{strategy}: not {budget} distinct unlabeled picks")
    if strategy == "entropy" and set(picks.tolist()) != set(reference.tolist()):
        raise common.Mismatch("entropy: a different set than ours")
    if strategy == "coreset":
        return "same sequence" if np.array_equal(picks, reference) else "valid, other sequence"
    return "same set" if strategy == "entropy" else "valid batch"


@functools.cache
def _warm_profiler() -> None:
    """One empty memory profile: the imports of the profiler's first use (~70 MiB of Python
    objects) happen here, outside any measured call's tracemalloc window."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with common._quiet_stderr(), torch.profiler.profile(activities=activities, profile_memory=True):
        torch.zeros(1)


def first_call(
    run: Callable[[], np.ndarray], device: torch.device, measure_memory: bool
) -> tuple[np.ndarray, float | None, float]:
    """One untimed-by-the-harness call: (picks, peak MiB or None, wall ms). The peak is the
    larger of torch's allocator (profiler / CUDA stats) and Python's tracemalloc (NumPy) peaks
    above the baseline, so one call serves the correctness check and the memory figure."""
    if not measure_memory:
        tic = time.perf_counter()
        picks = run()
        return picks, None, 1e3 * (time.perf_counter() - tic)
    if device.type == "cpu":
        _warm_profiler()  # its first use imports modules: not the strategy's memory
    tracemalloc.start()
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            tic = time.perf_counter()
            picks = run()
            torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - tic
            torch_peak = torch.cuda.max_memory_allocated(device) - base
        else:
            activities = [torch.profiler.ProfilerActivity.CPU]
            with (
                common._quiet_stderr(),
                torch.profiler.profile(activities=activities, profile_memory=True) as prof,
            ):
                tic = time.perf_counter()
                picks = run()
                elapsed = time.perf_counter() - tic
            torch_peak = common._cpu_peak_bytes(prof)
        _, numpy_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return picks, round(max(torch_peak, numpy_peak) / 2**20, 1), 1e3 * elapsed


def measure(
    name: str, run: Callable[[], np.ndarray], device: torch.device, args: argparse.Namespace
) -> dict:
    task = common.Task(run=lambda _: run())
    with common.OtherCpu() as other:
        timing = common.time_task(
            task, device, min_run_time=args.min_run_time, min_samples=args.min_samples, label=name
        )
    return {"time_ms": round(timing.median_ms, 3), "iqr_ms": round(timing.iqr_ms, 3), "samples": timing.samples,
            "other_cpu_pct": other.percent}  # fmt: skip


def finish(rows: list[dict], folder: Path) -> str:
    """Speed-ups (time of the row / time of ours, same pool and strategy), CSV and markdown;
    called after every strategy so an interrupted run keeps what it measured."""
    times: dict[tuple, dict[str, float]] = {}
    for r in rows:
        times.setdefault(tuple(r[k] for k in KEY), {})[r["provider"]] = r["time_ms"]
    for r in rows:  # how many times faster ours is than this row's provider
        r["speedup_vs_provider"] = round(r["time_ms"] / times[tuple(r[k] for k in KEY)]["ours"], 2)
    common.write_csv(rows, folder / "active.csv", COLUMNS)
    table = common.markdown_table(
        rows,
        [("strategy", "strategy"), ("n", "N"), ("provider", "provider"), ("time_ms", "ms"),
         ("speedup_vs_provider", "ours faster by"), ("peak_mem_mb", "peak MiB"), ("check", "picks vs ours"),
         ("other_cpu_pct", "other CPU %")],
    )  # fmt: skip
    (folder / "active.md").write_text(table + "\n")
    return table


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    common.warn_if_busy(device)
    available = []
    for peer in args.peers:
        try:
            importlib.import_module(PEER_MODULES[peer])
            available.append(peer)
        except ImportError as exc:
            print(f"skipping {peer}: not installed ({exc})", flush=True)
    rows: list[dict] = []
    env = common.environment(device)
    folder = args.out / common.device_slug(device)
    table = ""
    for n in args.n:
        pool = make_pool(n, args.d, args.c, args.labeled, args.seed)
        for strategy in args.strategies:
            base = {"strategy": strategy, "n": n, "d": args.d, "c": args.c, "labeled": args.labeled,
                    "budget": args.budget, **env, "ours_native": labelkit_ext.HAS_OPS}  # fmt: skip
            run_ours = ours(strategy, pool, args.budget, device)
            reference, peak, ms = first_call(run_ours, device, not args.no_memory)
            print(f"{strategy} n={n}: ours {ms:.1f} ms (first call)", flush=True)
            rows.append({**base, "provider": "ours", "check": "reference", "peak_mem_mb": peak,
                         **measure(f"ours {strategy}", run_ours, device, args)})  # fmt: skip
            for peer in available:
                run_peer = peer_callable(peer, strategy, pool, args.budget)
                if run_peer is None:
                    continue
                picks, peak, ms = first_call(run_peer, device, not args.no_memory)
                verdict = check(strategy, picks, reference, pool, args.budget)
                print(f"{strategy} n={n}: {peer} {ms:.1f} ms (first call), {verdict}", flush=True)
                rows.append({**base, "provider": peer, "check": verdict, "peak_mem_mb": peak,
                             **measure(f"{peer} {strategy}", run_peer, device, args)})  # fmt: skip
            common.release_memory(device)
            table = finish(rows, folder)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
