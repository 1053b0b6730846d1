"""Benchmark ``affine_grid_sample``: ours vs the eager two-call composition (``F.affine_grid`` +
``F.grid_sample`` in float32) vs ``torch.compile`` of it vs kornia's ``warp_affine``,
modes forward / backward / full.

    python bench/bench_affine.py                                 # the issue's sizes
    python bench/bench_affine.py --sizes 16,3,64,64 --dtypes float32 --no-compile

Writes ``<out>/<device>/affine.csv`` and ``affine.md`` (default out: bench/results).
θ is a typical STN-augmentation batch (rotations up to ±30°, scales 0.8-1.25, shears, shifts
up to ±0.2), bilinear, zeros padding, align_corners=True (kornia's only convention, so that all
four providers compute the same image). backward/full = the gradients w.r.t. the images *and*
θ of ``(out * w).sum()`` for a fixed random ``w``. kornia is a benchmark-only extra
(``pip install kornia``); without it that provider is skipped. Every provider, eager
included, is first checked against the float64 reference (labelkit_ext.reference). For
bfloat16 input eager/compile/kornia upcast to float32 around the two calls (a bfloat16 grid
would be off by up to a pixel at 224).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # an installed labelkit_ext, if any, still wins

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import labelkit_ext  # noqa: E402
from bench import common  # noqa: E402
from labelkit_ext.reference.affine import affine_grid_sample_ref  # noqa: E402

PROVIDERS = ("ours", "eager", "compile", "kornia")
DEFAULT_SIZES = ((256, 3, 32, 32), (64, 3, 224, 224), (16, 64, 56, 56))
ALIGN = True
KEY = ("op", "dtype", "n", "c", "h", "w", "mode")
COLUMNS = (
    "op", "mode", "provider", "device", "dtype", "n", "c", "h", "w", "time_ms", "iqr_ms",
    "samples", "gbps", "pct_peak", "speedup_vs_eager", "speedup_vs_compile", "speedup_vs_kornia",
    "peak_mem_mb", "correct", "ours_native", "other_cpu_pct", "torch", "threads",
)  # fmt: skip


@dataclass(frozen=True)
class Case:
    dtype: torch.dtype
    n: int
    c: int
    h: int
    w: int


# ----------------------------------------------------------------------------- arguments


def size_list(text: str) -> list[tuple[int, int, int, int]]:
    """'256,3,32,32;64,3,224,224' -> [(256, 3, 32, 32), (64, 3, 224, 224)]."""
    sizes = []
    for part in text.split(";"):
        vals = common.int_list(part)
        if len(vals) != 4 or min(vals) < 1:
            raise argparse.ArgumentTypeError(
                f"expected N,C,H,W groups separated by ';', got {part!r}"
            )
        sizes.append(tuple(vals))
    return sizes


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # The shared flags; --n/--c are replaced by --sizes (an image batch is four numbers).
    common.add_common_args(p, n=(), c=())
    p.set_defaults(providers=list(PROVIDERS))
    for action in p._actions:
        if action.dest == "providers":
            action.type = common.choice_list(PROVIDERS)
            action.help = "default " + ",".join(PROVIDERS)
    p.add_argument("--sizes", type=size_list, default=list(DEFAULT_SIZES),
                   help="N,C,H,W;N,C,H,W... (default the issue's three)")  # fmt: skip
    return p.parse_args(argv)


def kornia_available() -> bool:
    try:
        import kornia  # noqa: F401
    except ImportError:
        return False
    return True


def selected_providers(args: argparse.Namespace) -> list[str]:
    names = common.selected_providers(args)
    if "kornia" in names and not kornia_available():
        common.banner("kornia is not installed (pip install kornia): skipping that provider")
        names.remove("kornia")
    return names


# ----------------------------------------------------------------------------- inputs, providers


def make_theta(n: int, device: torch.device, seed: int) -> torch.Tensor:
    """An STN-augmentation-like batch of θ (float32)."""
    g = torch.Generator().manual_seed(seed)
    u = lambda *s: torch.rand(*s, generator=g) * 2 - 1  # noqa: E731
    angle = u(n) * math.pi / 6
    scale = torch.exp(u(n, 2) * math.log(1.25))
    shear = u(n) * 0.2
    c, s = torch.cos(angle), torch.sin(angle)
    rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    sh = torch.eye(2).repeat(n, 1, 1)
    sh[:, 0, 1] = shear
    A = rot @ sh * scale.unsqueeze(1)
    shift = u(n, 2, 1) * 0.2
    return torch.cat([A, shift], -1).to(device)


def make_inputs(case: Case, device: torch.device, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.rand(case.n, case.c, case.h, case.w, generator=g, device=device).to(case.dtype)
    w = torch.randn(case.n, case.c, case.h, case.w, generator=g, device=device).to(case.dtype)
    return x, make_theta(case.n, device, seed), w


def kornia_warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """kornia.geometry.warp_affine computing the same image as θ: its M maps source to
    destination pixels, so M = denormalise(θ^-1) (kornia normalises with align_corners=True)."""
    from kornia.geometry.conversions import denormalize_homography
    from kornia.geometry.transform import warp_affine

    n, _, h, w = x.shape
    bottom = theta.new_tensor([0.0, 0.0, 1.0]).expand(n, 1, 3)
    dst_from_src = torch.linalg.inv(torch.cat([theta.float(), bottom.float()], 1))
    M = denormalize_homography(dst_from_src, (h, w), (h, w))[:, :2]
    return warp_affine(x.float(), M, (h, w), align_corners=ALIGN).to(x.dtype)


def eager_composition(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """The two calls users write, sampling in float32 (a no-op cast for float32 input; for
    bfloat16 a bfloat16 grid would be off by up to a pixel at 224, so a careful user upcasts)."""
    grid = F.affine_grid(theta.float(), list(x.shape), align_corners=ALIGN)
    return F.grid_sample(
        x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=ALIGN
    ).to(x.dtype)


def providers(names: Sequence[str]) -> dict[str, Callable]:
    def ours(x, t):
        return labelkit_ext.affine_grid_sample(x, t, align_corners=ALIGN)

    fns = {"ours": ours, "eager": eager_composition, "kornia": kornia_warp}
    if "compile" in names:
        fns["compile"] = torch.compile(eager_composition, dynamic=False)
    return {k: f for k, f in fns.items() if k in names}


def task(
    mode: str, call: Callable, x: torch.Tensor, theta: torch.Tensor, w: torch.Tensor
) -> common.Task:
    """forward: no grad. backward: grads w.r.t. (x, θ) on a graph built untimed before each call.
    full: forward + backward."""
    if mode == "forward":
        xd, td = x.detach(), theta.detach()
        return common.Task(run=lambda _: call(xd, td))
    xg, tg = x.detach().requires_grad_(), theta.detach().requires_grad_()
    if mode == "backward":
        return common.Task(
            setup=lambda: call(xg, tg),
            run=lambda out: torch.autograd.grad(out, (xg, tg), w),
            fresh=True,
        )
    return common.Task(run=lambda _: torch.autograd.grad(call(xg, tg), (xg, tg), w))


# ----------------------------------------------------------------------------- correctness


def oracle(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """The float64 reference (labelkit_ext.reference), which every provider is checked against."""
    return affine_grid_sample_ref(x, theta, None, "bilinear", "zeros", ALIGN)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def check_provider(name: str, calls: dict, case: Case, x, theta, w) -> None:
    """Forward and the images' gradient against the float64 reference at the harness tolerance.
    θ's gradient is a sum of N·C·H·W terms in which bilinear sampling's slope jumps wherever a
    coordinate crosses a pixel boundary, so float32 rounding of the coordinate flips a few terms
    by O(1): no elementwise tolerance fits it. It must be as close to the reference (relative
    norm) as the eager float32 composition's, up to a factor 2."""
    got = calls[name]
    common.assert_close(got(x, theta), oracle(x, theta), what=f"{name} forward", dtype=case.dtype)
    g_got = task("full", got, x, theta, w)()
    g_ref = task("full", oracle, x, theta, w)()
    g_eager = task("full", calls["eager"], x, theta, w)()
    common.assert_close(g_got[0], g_ref[0], what=f"{name} grad input", dtype=case.dtype)
    err, err_eager = _rel_err(g_got[1], g_ref[1]), _rel_err(g_eager[1], g_ref[1])
    if err > 2 * err_eager + 1e-5:
        raise common.Mismatch(
            f"{name} grad theta: relative error {err:.2e} vs eager's {err_eager:.2e} (float64 reference)"
        )


# ----------------------------------------------------------------------------- measuring


def bytes_moved(case: Case, mode: str) -> int:
    """Ideal bytes: forward reads the images and writes the output; backward reads the incoming
    gradient and the images (for θ) and writes the images' gradient."""
    img = case.n * case.c * case.h * case.w * case.dtype.itemsize
    fwd, bwd = 2 * img, 3 * img
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def measure(case: Case, mode: str, name: str, t: common.Task, device, args, extra: dict) -> dict:
    with common.OtherCpu() as other:
        mem = None if args.no_memory else common.peak_memory_mb(t, device)
        tm = common.time_task(
            t, device, min_run_time=args.min_run_time, min_samples=args.min_samples
        )
    gbps = bytes_moved(case, mode) / (tm.median_ms * 1e-3) / 1e9
    peak = common.peak_gbps(device)
    row = {
        "op": "affine_grid_sample", "mode": mode, "provider": name, "dtype": str(case.dtype).removeprefix("torch."),
        "n": case.n, "c": case.c, "h": case.h, "w": case.w, "time_ms": round(tm.median_ms, 4),
        "iqr_ms": round(tm.iqr_ms, 4), "samples": tm.samples, "gbps": round(gbps, 2),
        "pct_peak": round(100 * gbps / peak, 1) if peak else "",
        "peak_mem_mb": round(mem, 1) if mem is not None else "", "other_cpu_pct": other.percent, **extra,
    }  # fmt: skip
    mem_txt = f", {mem:.0f} MiB" if mem is not None else ""
    busy = (
        f"  (others used {other.percent:.0f}% CPU)" if other.percent and other.percent > 5 else ""
    )
    print(f"  {mode:8s} {name:8s} {tm.median_ms:10.3f} ms  iqr {tm.iqr_ms:8.3f}  {gbps:7.2f} GB/s{mem_txt}{busy}",
          flush=True)  # fmt: skip
    return row


def run_case(case: Case, args, device, names, env) -> tuple[list[dict], list[str]]:
    if "compile" in names:
        torch._dynamo.reset()
    x, theta, w = make_inputs(case, device, args.seed)
    calls = providers(names)
    print(f"\naffine_grid_sample  {str(case.dtype).removeprefix('torch.')}  N={case.n} C={case.c} "
          f"H={case.h} W={case.w}", flush=True)  # fmt: skip
    failures, ok = [], {}
    for name in names:
        t0 = time.perf_counter()
        try:
            check_provider(name, calls, case, x, theta, w)
            ok[name] = True
        except common.Mismatch as exc:
            ok[name] = False
            failures.append(f"{case}: {exc}")
            print(f"  MISMATCH {exc}", flush=True)
            if not args.keep_going:
                raise
        if name == "compile":
            print(f"  (compile + check took {time.perf_counter() - t0:.1f} s)", flush=True)
    native = labelkit_ext.HAS_OPS and labelkit_ext._ext.has_kernel(
        "affine_grid_sample", device.type
    )
    rows = []
    for mode in args.modes:
        for name in names:
            extra = {"correct": ok[name], "ours_native": native if name == "ours" else "", **env}
            rows.append(
                measure(case, mode, name, task(mode, calls[name], x, theta, w), device, args, extra)
            )
    del calls, x
    common.release_memory(device)
    return rows, failures


# ----------------------------------------------------------------------------- report


def report(rows: list[dict], device: torch.device, out_dir: Path) -> str:
    columns = [
        ("dtype", "dtype"), ("n", "N"), ("c", "C"), ("h", "H"), ("w", "W"), ("mode", "mode"),
        ("ours_ms", "ours ms"), ("eager_ms", "eager ms"), ("compile_ms", "compile ms"), ("kornia_ms", "kornia ms"),
        ("vs_eager", "ours/eager ×"), ("vs_compile", "ours/compile ×"), ("vs_kornia", "ours/kornia ×"),
        ("gbps", "ours GB/s"),
    ]  # fmt: skip
    if common.peak_gbps(device):
        columns.append(("pct_peak", f"% of {common.peak_gbps(device):.0f} GB/s"))
    columns += [("ours_mb", "ours MiB"), ("eager_mb", "eager MiB"), ("compile_mb", "compile MiB"),
                ("kornia_mb", "kornia MiB")]  # fmt: skip
    ours_columns = [
        "speedup_vs_eager",
        "speedup_vs_compile",
        "speedup_vs_kornia",
        "gbps",
        "pct_peak",
    ]
    table = common.markdown_table(common.side_by_side(rows, KEY, ours_columns), columns)
    head = (f"Device `{common.device_slug(device)}` ({common.device_name(device)}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, labelkit_ext HAS_OPS={labelkit_ext.HAS_OPS}. "
            "× = speed-up of ours (time of the other / time of ours); MiB = peak allocated by one call. "
            "backward/full include the gradients w.r.t. both the images and θ.")  # fmt: skip
    (out_dir / "affine.md").write_text(f"{head}\n\n{table}\n")
    return table


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    names = selected_providers(args)
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
    csv_path = out_dir / "affine.csv"
    previous = common.read_csv(csv_path) if args.update else []
    rows, failures, table = [], [], previous
    for name in args.dtypes:
        for n, c, h, w in args.sizes:
            case = Case(common.DTYPES[name], n, c, h, w)
            case_rows, case_failures = run_case(case, args, device, names, env)
            rows += case_rows
            failures += case_failures
            table = common.merge_rows(previous, rows, (*KEY, "provider"))
            common.add_speedups(table, KEY, baselines=("eager", "compile", "kornia"))
            common.write_csv(table, csv_path, COLUMNS)
    print(f"\n{report(table, device, out_dir)}\n")
    print(f"wrote {csv_path} and affine.md ({time.perf_counter() - t0:.0f} s)")
    for f in failures:
        print(f"MISMATCH {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
