"""Benchmark the pool-scoring ops against the ways active-learning code does it today.

    python bench/bench_scoring.py                                # the issue's CPU sizes
    python bench/bench_scoring.py --cases topk --topk-n 20000    # one case, smaller
    python bench/bench_scoring.py --device cuda --topk-n 1000000 --topk-m 100000 --topk-d 512 \\
        --kcenter-n 1000000 --kcenter-budget 10000             # the issue's GPU sizes

Cases and providers (one run, side by side):
- topk:    ``cosine_topk`` top-k of N queries over M keys (D features). ours | chunked (normalise,
           then ``mm`` + ``topk`` per chunk of 4,096 queries) | full (``mm`` + ``topk`` on the
           whole N x M matrix, only where it fits in --full-limit-gb).
- reduce:  ``cosine_reduce(mean)`` (density of every pool sample within the pool).
           ours | chunked (``mm`` + ``mean`` per chunk).
- kcenter: ``kcenter_greedy`` picking --kcenter-budget of N x D. ours | loop (a torch loop that
           keeps the running minimum with one ``mv`` per pick, |x|^2 - 2 x.c + |c|^2), on clustered
           data (a Gaussian mixture, like real embeddings) and on isotropic Gaussian noise (where
           no pruning applies).
- uncertainty: ``uncertainty(bald)`` of S x N x C MC logits. ours | eager (the reference).

Before timing, every provider is checked: top-k values against chunked torch (and the indices
against our reference on a slice), k-center picks against our reference on a slice and for
agreement with the loop. Writes ``<out>/<device>/scoring.csv`` and ``scoring.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import labelkit_ext  # noqa: E402
from bench import common  # noqa: E402
from labelkit_ext.reference.scoring import cosine_topk_ref, kcenter_greedy_ref, uncertainty_ref  # noqa: E402

CASES = ("topk", "reduce", "kcenter", "uncertainty")
CHUNK = 4096
COLUMNS = (
    "case", "data", "provider", "device", "dtype", "n", "m", "d", "k", "time_ms", "iqr_ms", "samples",
    "speedup", "peak_mem_mb", "correct", "ours_native", "other_cpu_pct", "torch", "threads",
)  # fmt: skip
KEY = ("case", "data", "dtype", "n", "m", "d", "k")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cases", type=common.choice_list(CASES), default=list(CASES))
    p.add_argument("--topk-n", type=int, default=200_000)
    p.add_argument("--topk-m", type=int, default=20_000)
    p.add_argument("--topk-d", type=int, default=128)
    p.add_argument("--topk-k", type=int, default=10)
    p.add_argument("--kcenter-n", type=int, default=200_000)
    p.add_argument("--kcenter-d", type=int, default=128)
    p.add_argument("--kcenter-budget", type=int, default=1_000)
    p.add_argument(
        "--kcenter-data",
        type=common.choice_list(("mixture", "gaussian")),
        default=["mixture", "gaussian"],
    )
    p.add_argument(
        "--mc",
        type=common.size_list,
        default=[20, 65_536, 10],
        help="S,N,C of the uncertainty case",
    )
    p.add_argument(
        "--full-limit-gb", type=float, default=4.0, help="run 'full' only if N*M*4 bytes fit"
    )
    p.add_argument(
        "--device", type=common.device_arg, default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--runs", type=int, default=3, help="timed calls per provider (median reported)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- providers


def chunked_topk(q: torch.Tensor, k: torch.Tensor, kk: int):
    """What active-learning code does when N x M does not fit: mm + topk per chunk of queries."""
    kn = F.normalize(k.float(), dim=1)
    vs, ids = [], []
    for i in range(0, q.shape[0], CHUNK):
        v, ix = (F.normalize(q[i : i + CHUNK].float(), dim=1) @ kn.t()).topk(kk, dim=1)
        vs.append(v)
        ids.append(ix)
    return torch.cat(vs), torch.cat(ids)


def full_topk(q: torch.Tensor, k: torch.Tensor, kk: int):
    return (F.normalize(q.float(), dim=1) @ F.normalize(k.float(), dim=1).t()).topk(kk, dim=1)


def chunked_mean(q: torch.Tensor, k: torch.Tensor):
    kn = F.normalize(k.float(), dim=1)
    return torch.cat(
        [
            (F.normalize(q[i : i + CHUNK].float(), dim=1) @ kn.t()).mean(1)
            for i in range(0, q.shape[0], CHUNK)
        ]
    )


def kcenter_loop(x: torch.Tensor, budget: int) -> torch.Tensor:
    """Core-set greedy as a torch loop keeping the running minimum (one mv per pick)."""
    x = x.float()
    sq = (x * x).sum(1)
    first = int(((x - x.mean(0)) ** 2).sum(1).argmin())
    picks = [first]
    min_d = (sq - 2 * (x @ x[first]) + sq[first]).clamp_min_(0)
    min_d[first] = -1.0
    for _ in range(budget - 1):
        c = int(min_d.argmax())
        picks.append(c)
        torch.minimum(min_d, (sq - 2 * (x @ x[c]) + sq[c]).clamp_min_(0), out=min_d)
        min_d[picks] = -1.0
    return torch.tensor(picks)


# ----------------------------------------------------------------------------- data


def mixture(n: int, d: int, device, seed: int, clusters: int = 100) -> torch.Tensor:
    """Clustered embeddings: 100 Gaussian clusters with within-cluster std 0.3 x the spread."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, d, generator=g)
    labels = torch.randint(0, clusters, (n,), generator=g)
    return (centers[labels] + 0.3 * torch.randn(n, d, generator=g)).to(device)


def gaussian(n: int, d: int, device, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g).to(device)


# ----------------------------------------------------------------------------- measuring


def measure(
    name: str, fn: Callable[[], object], device: torch.device, runs: int, memory: bool
) -> dict:
    """Median/IQR of ``runs`` calls (after one warm-up call), the busy share of other processes,
    and the peak memory of one more call."""
    fn()
    times = []
    with common.OtherCpu() as other:
        for _ in range(runs):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append((time.perf_counter() - t0) * 1e3)
    q25, q50, q75 = np.percentile(times, [25, 50, 75])
    row = {
        "provider": name,
        "time_ms": round(float(q50), 2),
        "iqr_ms": round(float(q75 - q25), 2),  # interquartile range, as the other benchmarks
        "samples": runs,
        "other_cpu_pct": other.percent,
    }
    if memory:
        row["peak_mem_mb"] = round(
            common.peak_memory_mb(common.Task(run=lambda _: fn()), device), 1
        )
    common.release_memory(device)
    print(f"  {name:8s} {row['time_ms']:10.1f} ms  (IQR {row['iqr_ms']:.1f})  "
          f"peak {row.get('peak_mem_mb', '-')} MiB  other cpu {other.percent}%", flush=True)  # fmt: skip
    return row


def topk_case(args, device) -> list[dict]:
    n, m, d, kk = args.topk_n, args.topk_m, args.topk_d, args.topk_k
    q, k = gaussian(n, d, device, args.seed), gaussian(m, d, device, args.seed + 1)
    print(f"topk: N={n} M={m} D={d} k={kk}", flush=True)
    ours = labelkit_ext.cosine_topk(q, k, kk)
    base = chunked_topk(q, k, kk)
    torch.testing.assert_close(ours.values, base[0], rtol=1e-5, atol=1e-5)
    sl = slice(0, min(n, 2048))
    if not torch.equal(ours.indices[sl], cosine_topk_ref(q[sl], k, kk).indices):
        # Values agree (checked above): another GEMM's rounding may order near-equal keys apart.
        print("WARNING: top-k indices differ from the reference among near-equal similarities")
    providers = [
        ("ours", lambda: labelkit_ext.cosine_topk(q, k, kk)),
        ("chunked", lambda: chunked_topk(q, k, kk)),
    ]
    if n * m * 4 <= args.full_limit_gb * 2**30:
        providers.append(("full", lambda: full_topk(q, k, kk)))
    common_cols = dict(
        case="topk", data="gaussian", dtype="float32", n=n, m=m, d=d, k=kk, correct=True
    )
    return [
        dict(common_cols, **measure(name, fn, device, args.runs, not args.no_memory))
        for name, fn in providers
    ]


def reduce_case(args, device) -> list[dict]:
    n, m, d = args.topk_n, args.topk_m, args.topk_d
    q, k = gaussian(n, d, device, args.seed), gaussian(m, d, device, args.seed + 1)
    print(f"reduce(mean): N={n} M={m} D={d}", flush=True)
    torch.testing.assert_close(
        labelkit_ext.cosine_reduce(q, k, "mean"), chunked_mean(q, k), rtol=1e-4, atol=1e-5
    )
    common_cols = dict(
        case="reduce_mean", data="gaussian", dtype="float32", n=n, m=m, d=d, k="", correct=True
    )
    providers = [
        ("ours", lambda: labelkit_ext.cosine_reduce(q, k, "mean")),
        ("chunked", lambda: chunked_mean(q, k)),
    ]
    return [
        dict(common_cols, **measure(name, fn, device, args.runs, not args.no_memory))
        for name, fn in providers
    ]


def kcenter_case(args, device) -> list[dict]:
    n, d, b = args.kcenter_n, args.kcenter_d, args.kcenter_budget
    rows = []
    for data in args.kcenter_data:
        x = (mixture if data == "mixture" else gaussian)(n, d, device, args.seed)
        print(f"kcenter ({data}): N={n} D={d} budget={b}", flush=True)
        small = x[: min(n, 20_000)]
        picks, ref = labelkit_ext.kcenter_greedy(small, 100), kcenter_greedy_ref(small, 100)
        if not torch.equal(picks, ref):  # equal on CPU (tested); a GPU may round a near-tie apart
            first = int((picks != ref).nonzero()[0])
            print(f"WARNING: k-center picks differ from the reference from pick {first} on")
        ours = labelkit_ext.kcenter_greedy(x, b)
        agree = (ours.cpu() == kcenter_loop(x, b)).float().mean().item()
        print(
            f"  picks equal to the torch loop's (which rounds differently): {agree:.1%}", flush=True
        )
        common_cols = dict(
            case="kcenter", data=data, dtype="float32", n=n, m="", d=d, k=b, correct=True
        )
        providers = (
            ("ours", lambda x=x: labelkit_ext.kcenter_greedy(x, b)),
            ("loop", lambda x=x: kcenter_loop(x, b)),
        )
        for name, fn in providers:
            rows.append(
                dict(
                    common_cols,
                    **measure(name, fn, device, max(1, args.runs - 2), not args.no_memory),
                )
            )
    return rows


def uncertainty_case(args, device) -> list[dict]:
    S, n, c = args.mc
    z = gaussian(S * n, c, device, args.seed).view(S, n, c) * 2
    print(f"uncertainty(bald): S={S} N={n} C={c}", flush=True)
    torch.testing.assert_close(
        labelkit_ext.uncertainty(z, "bald"), uncertainty_ref(z, "bald"), rtol=1e-4, atol=1e-5
    )
    common_cols = dict(
        case="uncertainty_bald", data="gaussian", dtype="float32", n=n, m=S, d=c, k="", correct=True
    )
    providers = [
        ("ours", lambda: labelkit_ext.uncertainty(z, "bald")),
        ("eager", lambda: uncertainty_ref(z, "bald")),
    ]
    return [
        dict(common_cols, **measure(name, fn, device, args.runs, not args.no_memory))
        for name, fn in providers
    ]


def add_speedups(rows: list[dict]) -> None:
    """speedup = time of this row / time of ours, within a case (> 1: ours is faster)."""
    ours = {tuple(r[k] for k in KEY): r["time_ms"] for r in rows if r["provider"] == "ours"}
    for r in rows:
        t = ours.get(tuple(r[k] for k in KEY))
        r["speedup"] = round(r["time_ms"] / t, 2) if t else ""


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    torch.manual_seed(args.seed)
    env = common.environment(device)
    if not labelkit_ext.HAS_OPS:
        common.banner(
            f"labelkit_ext extension NOT loaded ({labelkit_ext.LOAD_ERROR}): 'ours' is the reference"
        )
    common.warn_if_busy(device)
    run = {
        "topk": topk_case,
        "reduce": reduce_case,
        "kcenter": kcenter_case,
        "uncertainty": uncertainty_case,
    }
    rows: list[dict] = []
    for case in args.cases:
        rows += run[case](args, device)
    add_speedups(rows)
    for r in rows:
        r.update(device=common.device_slug(device), ours_native=labelkit_ext.HAS_OPS if r["provider"] == "ours" else "",
                 torch=env["torch"], threads=env["threads"])  # fmt: skip
    out = args.out / common.device_slug(device)
    csv_path = out / "scoring.csv"
    rows = common.merge_rows(common.read_csv(csv_path), rows, (*KEY, "provider"))
    common.write_csv(rows, csv_path, COLUMNS)
    columns = [("case", "case"), ("data", "data"), ("n", "N"), ("m", "M / S"), ("d", "D / C"), ("k", "k / budget"),
               ("provider", "provider"), ("time_ms", "ms"), ("speedup", "× vs ours"), ("peak_mem_mb", "peak MiB"),
               ("other_cpu_pct", "other CPU %")]  # fmt: skip
    table = common.markdown_table(rows, columns)
    (out / "scoring.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
