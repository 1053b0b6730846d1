"""Benchmark ``softmax_entropy`` and ``entropy_gate``: ours vs the eager reference vs
``torch.compile(reference)``, modes forward / backward / full.

    python bench/bench_entropy.py                      # the issue's sizes, CPU or the GPU
    python bench/bench_entropy.py --n 4096 --c 1000 --dtypes float32 --no-compile

Writes ``<out>/<device>/entropy.csv`` and ``entropy.md`` (default out: bench/results).
backward = the gradient w.r.t. the logits of ``entropy.sum()`` (plus a fixed random weighting
of ``cluster_probs`` for entropy_gate with clusters), taken on a graph built once.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # an installed labelkit_ext, if any, still wins

import torch  # noqa: E402

import labelkit_ext  # noqa: E402
from bench import common  # noqa: E402
from labelkit_ext.reference.entropy import entropy_gate_ref, softmax_entropy_ref  # noqa: E402

OPS = ("softmax_entropy", "entropy_gate")
DEFAULT_N = (65_536,)
DEFAULT_C = (10, 100, 1_000, 32_000)
DEFAULT_CLUSTERS = (0, 10)
LOGIT_SCALE = 2.0  # std of the random logits: entropies well below log(C), not saturated
KEY = ("op", "clusters", "dtype", "n", "c", "mode")
COLUMNS = (
    "op", "mode", "provider", "device", "dtype", "n", "c", "clusters", "time_ms", "iqr_ms",
    "samples", "gbps", "pct_peak", "speedup_vs_eager", "speedup_vs_compile", "peak_mem_mb",
    "correct", "ours_native", "other_cpu_pct", "torch", "threads",
)  # fmt: skip


@dataclass(frozen=True)
class Case:
    """One op at one size: ``call(x)`` per provider returns the differentiable outputs."""

    op: str
    dtype: torch.dtype
    n: int
    c: int
    clusters: int  # S for entropy_gate; 0 = no clusters


# ----------------------------------------------------------------------------- arguments


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_common_args(p, n=DEFAULT_N, c=DEFAULT_C)
    p.add_argument(
        "--ops", type=common.choice_list(OPS), default=list(OPS), help="default " + ",".join(OPS)
    )
    p.add_argument("--clusters", type=common.int_list, default=list(DEFAULT_CLUSTERS),
                   help="entropy_gate cluster counts S, 0 = without clusters (default 0,10)")  # fmt: skip
    return p.parse_args(argv)


def cases(args: argparse.Namespace, max_elements: int) -> list[Case]:
    """Every (op, S, dtype, C, N) to run, N capped so that N*C <= ``max_elements`` (0: no cap)."""
    rows = {
        (n, c): common.cap_rows(n, c, max_elements) if max_elements else n
        for n in args.n
        for c in args.c
    }
    for (n, c), n_run in rows.items():
        if n_run != n:
            print(f"note: N={n} x C={c} is over --max-elements={max_elements}; running N={n_run}")
    return [
        Case(op, common.DTYPES[name], rows[n, c], c, s)
        for op in args.ops
        for s in (args.clusters if op == "entropy_gate" else [0])
        for name in args.dtypes
        for c in args.c
        for n in args.n
    ]


# ----------------------------------------------------------------------------- inputs, providers


def make_inputs(
    case: Case, device: torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random logits [N, C] and, with clusters, a random class -> cluster map [C]."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = (torch.randn(case.n, case.c, generator=g, device=device) * LOGIT_SCALE).to(case.dtype)
    clusters = None
    if case.clusters:
        clusters = torch.randint(0, case.clusters, (case.c,), generator=g, device=device)
    return x, clusters


def grad_outputs(case: Case, device: torch.device, seed: int) -> list[torch.Tensor]:
    """ones for entropy (grad of entropy.sum()); fixed random weights for cluster_probs."""
    grads = [torch.ones(case.n, device=device)]
    if case.op == "entropy_gate" and case.clusters:
        g = torch.Generator(device=device).manual_seed(seed + 1)
        grads.append(torch.rand(case.n, case.clusters, generator=g, device=device))
    return grads


def providers(
    case: Case, names: Sequence[str], threshold: float, clusters: torch.Tensor | None
) -> dict[str, Callable]:
    """name -> call(x) returning the differentiable outputs, for every provider asked for."""
    if case.op == "softmax_entropy":
        fns = {"ours": labelkit_ext.softmax_entropy, "eager": softmax_entropy_ref}
        if "compile" in names:
            fns["compile"] = torch.compile(softmax_entropy_ref, dynamic=False)
        return {k: (lambda x, f=f: [f(x)]) for k, f in fns.items() if k in names}

    fns = {"ours": labelkit_ext.entropy_gate, "eager": entropy_gate_ref}
    if "compile" in names:
        fns["compile"] = torch.compile(entropy_gate_ref, dynamic=False)
    s = case.clusters or None

    def gate(f: Callable) -> Callable:
        def call(x: torch.Tensor) -> list[torch.Tensor]:
            out = f(x, threshold, clusters, s)
            return [out.entropy, out.cluster_probs] if s else [out.entropy]

        call.full = lambda x: f(x, threshold, clusters, s)  # every field, for the check
        return call

    return {k: gate(f) for k, f in fns.items() if k in names}


def ours_is_native(op: str, device: torch.device) -> bool:
    """True when labelkit_ext runs a compiled kernel for ``op`` on ``device``."""
    if not labelkit_ext.HAS_OPS:
        return False
    has_kernel = getattr(getattr(labelkit_ext, "_ext", None), "has_kernel", None)
    return has_kernel is None or has_kernel(op, device.type)


# ----------------------------------------------------------------------------- correctness


def check_entropy_outputs(
    got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor], case: Case, who: str
) -> None:
    for i, (a, b) in enumerate(zip(got, ref, strict=True)):
        if a.dtype != b.dtype or a.shape != b.shape:
            raise common.Mismatch(
                f"{who} output {i}: {a.dtype}{tuple(a.shape)} vs reference {b.dtype}{tuple(b.shape)}"
            )
        common.assert_close(a, b, what=f"{who} output {i}", dtype=case.dtype)


def check_gate(got, ref, x: torch.Tensor, threshold: float, case: Case, who: str) -> None:
    """entropy / cluster_probs close; uncertain equal away from the threshold; prediction and
    cluster any arg-max (ties are legal either way)."""
    fields = ["entropy", "cluster_probs"] if case.clusters else ["entropy"]
    check_entropy_outputs(
        [getattr(got, f) for f in fields],
        [getattr(ref, f) for f in fields],
        case,
        f"{who} {fields}",
    )
    rtol, atol = common.tolerance(case.dtype)
    near = (ref.entropy - threshold).abs() <= atol + rtol * abs(threshold)
    flips = (got.uncertain != ref.uncertain) & ~near
    if got.uncertain.dtype != torch.bool or flips.any():
        raise common.Mismatch(
            f"{who} uncertain: {int(flips.sum())} rows differ away from the threshold ({got.uncertain.dtype})"
        )
    top = x.gather(1, got.prediction.view(-1, 1)).squeeze(1)
    if got.prediction.dtype != torch.int64 or not torch.equal(top, x.amax(1)):
        raise common.Mismatch(
            f"{who} prediction: {int((top != x.amax(1)).sum())} rows not an arg-max"
        )
    if case.clusters:
        picked = ref.cluster_probs.gather(1, got.cluster.view(-1, 1)).squeeze(1)
        best = ref.cluster_probs.amax(1)
        if got.cluster.dtype != torch.int64 or (picked < best - (atol + rtol * best)).any():
            raise common.Mismatch(f"{who} cluster: not an arg-max of cluster_probs")


def check_provider(
    name: str, calls: dict, case: Case, x: torch.Tensor, grads, threshold: float
) -> None:
    """Forward outputs and gradients of provider ``name`` against the eager reference."""
    ref, got = calls["eager"], calls[name]
    if case.op == "entropy_gate":
        check_gate(got.full(x), ref.full(x), x, threshold, case, name)
    else:
        check_entropy_outputs(got(x), ref(x), case, f"{name} forward")
    g_got = common.mode_task("full", got, x, grads)()
    g_ref = common.mode_task("full", ref, x, grads)()
    check_entropy_outputs(g_got, g_ref, case, f"{name} grad")


# ----------------------------------------------------------------------------- measuring


def bytes_moved(case: Case, mode: str) -> int:
    """Ideal bytes read + written by one call: the logits once per pass, the small outputs,
    and for backward the incoming grads and the logits' gradient."""
    n, c, s = case.n, case.c, case.clusters
    logits = n * c * case.dtype.itemsize
    if case.op == "softmax_entropy":
        small_out = n * 4
    else:
        small_out = n * (4 + 1 + 8) + (n * s * 4 + n * 8 + c * 8 if s else 0)
    grad_in = n * 4 + n * s * 4
    fwd = logits + small_out
    bwd = logits + grad_in + logits
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def measure(
    case: Case, mode: str, name: str, task: common.Task, device: torch.device, args, extra: dict
) -> dict:
    with common.OtherCpu() as other:
        mem = None if args.no_memory else common.peak_memory_mb(task, device)
        t = common.time_task(
            task, device, min_run_time=args.min_run_time, min_samples=args.min_samples
        )
    gbps = bytes_moved(case, mode) / (t.median_ms * 1e-3) / 1e9
    peak = common.peak_gbps(device)
    row = {
        "op": case.op, "mode": mode, "provider": name, "dtype": str(case.dtype).removeprefix("torch."),
        "n": case.n, "c": case.c, "clusters": case.clusters, "time_ms": round(t.median_ms, 4),
        "iqr_ms": round(t.iqr_ms, 4), "samples": t.samples, "gbps": round(gbps, 2),
        "pct_peak": round(100 * gbps / peak, 1) if peak else "",
        "peak_mem_mb": round(mem, 1) if mem is not None else "", "other_cpu_pct": other.percent, **extra,
    }  # fmt: skip
    mem_txt = f", {mem:.0f} MiB" if mem is not None else ""
    busy = (
        f"  (others used {other.percent:.0f}% CPU)" if other.percent and other.percent > 5 else ""
    )
    print(
        f"  {mode:8s} {name:8s} {t.median_ms:10.3f} ms  iqr {t.iqr_ms:8.3f}  {gbps:7.2f} GB/s{mem_txt}{busy}",
        flush=True,
    )
    return row


def run_case(
    case: Case, args, device: torch.device, names: Sequence[str], env: dict
) -> tuple[list[dict], list[str]]:
    """Check every provider, then time every (mode, provider). Returns rows and failures."""
    if "compile" in names:
        torch._dynamo.reset()  # fresh compile caches: no recompile limit across sizes
    x, clusters = make_inputs(case, device, args.seed)
    grads = grad_outputs(case, device, args.seed)
    threshold = float(softmax_entropy_ref(x).median()) if case.op == "entropy_gate" else 0.0
    calls = providers(case, names, threshold, clusters)
    s_txt = f" S={case.clusters}" if case.clusters else ""
    print(
        f"\n{case.op}{s_txt}  {str(case.dtype).removeprefix('torch.')}  N={case.n} C={case.c}",
        flush=True,
    )

    failures, ok = [], {"eager": True}
    for name in (p for p in names if p != "eager"):
        t0 = time.perf_counter()
        try:
            check_provider(name, calls, case, x, grads, threshold)
            ok[name] = True
        except common.Mismatch as exc:
            ok[name] = False
            failures.append(f"{case}: {exc}")
            print(f"  MISMATCH {exc}", flush=True)
            if not args.keep_going:
                raise
        if name == "compile":
            print(f"  (compile + check took {time.perf_counter() - t0:.1f} s)", flush=True)

    native = ours_is_native(case.op, device)
    rows = []
    for mode in args.modes:
        for name in names:
            task = common.mode_task(mode, calls[name], x, grads)
            extra = {"correct": ok[name], "ours_native": native if name == "ours" else "", **env}
            rows.append(measure(case, mode, name, task, device, args, extra))
            del task
    del calls, x
    common.release_memory(device)
    return rows, failures


# ----------------------------------------------------------------------------- report


def report(rows: list[dict], device: torch.device, out_dir: Path) -> str:
    columns = [
        ("op", "op"), ("clusters", "S"), ("dtype", "dtype"), ("n", "N"), ("c", "C"), ("mode", "mode"),
        ("ours_ms", "ours ms"), ("eager_ms", "eager ms"), ("compile_ms", "compile ms"),
        ("vs_eager", "ours/eager ×"), ("vs_compile", "ours/compile ×"), ("gbps", "ours GB/s"),
    ]  # fmt: skip
    if common.peak_gbps(device):
        columns.append(("pct_peak", f"% of {common.peak_gbps(device):.0f} GB/s"))
    columns += [("ours_mb", "ours MiB"), ("eager_mb", "eager MiB"), ("compile_mb", "compile MiB")]
    ours_columns = ["speedup_vs_eager", "speedup_vs_compile", "gbps", "pct_peak"]
    table = common.markdown_table(common.side_by_side(rows, KEY, ours_columns), columns)
    head = (f"Device `{common.device_slug(device)}` ({common.device_name(device)}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, labelkit_ext HAS_OPS={labelkit_ext.HAS_OPS}. "
            "× = speed-up of ours (time of the other / time of ours); MiB = peak allocated by one call.")  # fmt: skip
    (out_dir / "entropy.md").write_text(f"{head}\n\n{table}\n")
    return table


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    names = common.selected_providers(args)
    max_elements = (
        common.default_max_elements(device) if args.max_elements is None else args.max_elements
    )
    env = common.environment(device)
    out_dir = args.out / env["device"]
    print(f"labelkit_ext from {Path(labelkit_ext.__file__).parent}, HAS_OPS={labelkit_ext.HAS_OPS}")
    print(f"device {env['device']} ({common.device_name(device)}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, providers {','.join(names)}")  # fmt: skip
    if not labelkit_ext.HAS_OPS:
        common.banner(f"labelkit_ext extension NOT loaded ({labelkit_ext.LOAD_ERROR}): 'ours' is the "
                      "pure-PyTorch fallback, i.e. the eager reference")  # fmt: skip

    common.warn_if_busy(device)
    t0 = time.perf_counter()
    csv_path = out_dir / "entropy.csv"
    previous = common.read_csv(csv_path) if args.update else []
    rows, failures, table = [], [], previous
    for case in cases(args, max_elements):
        if "ours" in names and labelkit_ext.HAS_OPS and not ours_is_native(case.op, device):
            common.banner(
                f"{case.op}: no compiled {device.type} kernel in this build; 'ours' is the fallback"
            )
        case_rows, case_failures = run_case(case, args, device, names, env)
        rows += case_rows
        failures += case_failures
        table = common.merge_rows(previous, rows, (*KEY, "provider"))
        common.add_speedups(table, KEY)  # after every case, so a partial CSV is still useful
        common.write_csv(table, csv_path, COLUMNS)

    print(f"\n{report(table, device, out_dir)}\n")
    print(f"wrote {csv_path} and entropy.md ({time.perf_counter() - t0:.0f} s)")
    for f in failures:
        print(f"MISMATCH {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
