"""Benchmark the pretext-task ops: ours (the kernel as make_pretext_batch runs it) and api (the
public op, which first checks its arguments) vs a per-image Python loop (the VISSL / original
jigsaw data-loader style) vs the vectorised PyTorch reference (an advanced-indexing gather; plus
unfold + gather for centred tiles) vs torch.compile of the reference vs ``copy``, a clone of the
output (the floor of anything returning a fresh tensor of that size); and
``hamming_permutations`` vs the straightforward O(n^2 * 9!) greedy.

    python bench/bench_pretext.py                          # the issue's sizes
    python bench/bench_pretext.py --n 64 --no-compile --skip-hamming --out /tmp/bench

Writes ``<out>/<device>/pretext.csv`` and ``pretext.md`` (default out: bench/results), merging
into what is there (re-measured rows replaced, others kept: pass another --out to start afresh). Forward
only (pretext inputs carry no gradient in training). Sizes are ``C x S x S`` images, N per batch;
tile sizes follow the jigsaw paper (64 px tiles in 85 px cells of a 255 px image) and scale
down for the smaller images. ``jitter`` cases use random per-tile offsets (what
``make_pretext_batch`` draws); unfold + gather only handles centred tiles. ``jitter+norm``
standardises every tile channel (``normalize=True``, the jigsaw paper's setting and the pretext
method's default); its providers agree within float tolerance, the others bit for bit.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # an installed labelkit_ext, if any, still wins

import numpy as np  # noqa: E402
import torch  # noqa: E402

import labelkit_ext  # noqa: E402
from bench import common  # noqa: E402
from labelkit_ext.ops.pretext import _grid_tiles  # noqa: E402
from labelkit_ext.reference.pretext import (  # noqa: E402
    all_permutations,
    context_table,
    grid_tiles_ref,
    rotate90_ref,
)

SIZES = ((3, 255, 64), (1, 128, 32), (1, 28, 7))  # (C, S, jigsaw tile)
KEY = ("op", "case", "dtype", "n", "image")
COLUMNS = (
    "op", "case", "provider", "device", "dtype", "n", "image", "tile", "time_ms", "iqr_ms",
    "samples", "gbps", "pct_peak", "speedup_vs_loop", "speedup_vs_eager", "speedup_vs_unfold",
    "speedup_vs_compile", "speedup_vs_copy", "peak_mem_mb", "correct", "other_cpu_pct", "torch", "threads",
)  # fmt: skip
GRID = 3


# ---- peers ------------------------------------------------------------------------------------


def loop_tiles(images, index, table, grid, tile, offsets, by_cell, normalize=False):
    """Per image, per slot: slice the tile (standardise each channel of it, as the jigsaw
    paper's loader does, with ``normalize``) and stack (the data-loader style)."""
    N, C, H, W = images.shape
    ch, cw = H // grid, W // grid
    out = []
    for n in range(N):
        row = []
        for k, cell in enumerate(table[int(index[n])].tolist()):
            r, c = divmod(cell, grid)
            if offsets is None:
                dy, dx = (ch - tile) // 2, (cw - tile) // 2
            else:
                dy, dx = offsets[n, cell if by_cell else k].tolist()
            top, left = r * ch + dy, c * cw + dx
            piece = images[n, :, top : top + tile, left : left + tile]
            row.append(standardise(piece) if normalize else piece)
        out.append(torch.stack(row))
    return torch.stack(out)


def standardise(tile: torch.Tensor) -> torch.Tensor:
    """Each channel of one [C, t, t] tile to mean 0, std 1 (the benchmark's images have no
    constant tiles, which the op maps to 0)."""
    d = tile.float() if tile.dtype == torch.uint8 else tile
    d = d - d.mean((-2, -1), keepdim=True)
    return d / d.square().mean((-2, -1), keepdim=True).sqrt()


def unfold_tiles(images, index, table, grid, tile):
    """Centred tiles by unfold (a view of all cells) + one gather by the permutation rows."""
    N, C, H, W = images.shape
    ch, cw = H // grid, W // grid
    cells = images[:, :, : grid * ch, : grid * cw].unfold(2, ch, ch).unfold(3, cw, cw)
    oy, ox = (ch - tile) // 2, (cw - tile) // 2
    cells = cells[..., oy : oy + tile, ox : ox + tile]  # [N, C, g, g, t, t]
    cells = cells.reshape(N, C, grid * grid, tile, tile).transpose(1, 2)  # [N, g*g, C, t, t]
    order = table.index_select(0, index)  # [N, K]
    return cells.gather(1, order[:, :, None, None, None].expand(-1, -1, C, tile, tile))


def loop_rotate(images, k):
    return torch.stack(
        [
            torch.rot90(img, int(kn), dims=(-2, -1))
            for img, kn in zip(images, k.tolist(), strict=True)
        ]
    )


# ---- cases ---------------------------------------------------------------------------------------


def tile_cases(args, device, dtype):
    """(op, case, image label, tile, inputs, providers) for the gather ops."""
    gen = torch.Generator().manual_seed(0)
    perms = all_permutations(9)[torch.randperm(362880, generator=gen)[:100]].long().to(device)
    for C, S, t in SIZES:
        x = (torch.rand(args.n, C, S, S, generator=gen) * 255).to(dtype).to(device)
        cell = S // GRID
        pidx = torch.randint(100, (args.n,), generator=gen).to(device)
        off = torch.randint(cell - t + 1, (args.n, 9, 2), generator=gen).to(device)
        pos = torch.randint(8, (args.n,), generator=gen).to(device)
        ctx_off = torch.randint(cell - t + 1, (args.n, 2, 2), generator=gen).to(device)
        table = context_table(GRID, device)
        k = torch.randint(4, (args.n,), generator=gen).to(device)
        image = f"{C}x{S}x{S}"
        for case, offsets, norm in (
            ("centred", None, False),
            ("jitter", off, False),
            ("jitter+norm", off, True),
        ):
            args_ = (x, pidx, perms, GRID, t, offsets, True, norm)
            providers = {
                "ours": lambda a=args_: _grid_tiles(*a),
                "api": lambda a=args_: labelkit_ext.jigsaw_tiles(*a[:6], a[7]),
                "loop": lambda a=args_: loop_tiles(*a),
                "eager": lambda a=args_: grid_tiles_ref(*a),
                "compile": lambda a=args_: COMPILED["tiles"](*a),
            }
            if offsets is None:
                providers["unfold"] = lambda a=args_: unfold_tiles(*a[:5])
            yield "jigsaw_tiles", case, image, t, providers
        cargs = (x, pos, table, GRID, t, ctx_off, False, False)
        yield (
            "context_pair",
            "jitter",
            image,
            t,
            {
                "ours": lambda a=cargs: _grid_tiles(*a),
                "api": lambda a=cargs: labelkit_ext.context_pair(a[0], a[1], *a[3:6]),
                "loop": lambda a=cargs: loop_tiles(*a[:7]),
                "eager": lambda a=cargs: grid_tiles_ref(*a),
                "compile": lambda a=cargs: COMPILED["tiles"](*a),
            },
        )
        yield (
            "rotate90",
            "random_k",
            image,
            S,
            {
                "ours": lambda a=(x, k): labelkit_ext.rotate90(*a),
                "loop": lambda a=(x, k): loop_rotate(*a),
                "eager": lambda a=(x, k): rotate90_ref(*a),
                "compile": lambda a=(x, k): COMPILED["rotate"](*a),
            },
        )


# Large outputs: the other providers get fresh pages from torch's allocator on every call; ours
# reuse a cached block after the first call (docs/installation.md, "Run-time knobs"). On a VM the
# first calls that touch fresh memory can pay a host fault per 2 MiB page (here ~6 calls at
# ~125 ms instead of ~9 ms) until the guest reuses freed pages. Every provider of such a case is
# warmed up alike, so the timings are the steady state a training loop sees.
WARM_UP_BYTES = 64 << 20
WARM_UP_CALLS = 10
COMPILED: dict[str, Callable] = {}
# "ours" is the kernel as make_pretext_batch (the training loop's call) runs it, on indices it
# drew itself; "api" the public jigsaw_tiles / context_pair, which first check the caller's
# indices, permutations and offsets (a few small ops; host syncs on a GPU).
PROVIDERS = ("ours", "api", "loop", "eager", "unfold", "compile", "copy")


def run_tiles(args, device, env, save) -> tuple[list[dict], list[str]]:
    """Every tile case for every provider; ``save(rows)`` after each case, so that a run stopped
    part-way (a time-capped GPU check) keeps what it measured."""
    rows, failures = [], []
    names = [p for p in PROVIDERS if p in args.providers]
    for dtype_name in args.dtypes:
        dtype = common.DTYPES.get(dtype_name, torch.uint8)
        for op, case, image, tile, providers in tile_cases(args, device, dtype):
            reference = providers["eager"]()
            # The floor of an op returning a tensor from torch's allocator: allocate it and write
            # its bytes. For large outputs first-touch page faults bind, not the arithmetic.
            providers = {**providers, "copy": lambda r=reference: r.clone()}
            out_bytes = reference.numel() * reference.element_size()
            for name in names:
                if name not in providers:
                    continue
                fn = providers[name]
                try:
                    got = fn()
                    if isinstance(got, tuple):  # context_pair's (center, neighbour)
                        got = torch.stack(got, 1)
                    if case.endswith("+norm"):  # standardised tiles: rounding differs by provider
                        torch.testing.assert_close(got, reference)
                    else:
                        torch.testing.assert_close(got, reference, rtol=0, atol=0)
                    correct = True
                except AssertionError as exc:
                    failures.append(f"{op}/{case}/{image}/{name}: {exc}")
                    correct = False
                if out_bytes >= WARM_UP_BYTES:
                    for _ in range(WARM_UP_CALLS):
                        fn()
                task = common.Task(run=lambda _, f=fn: f())
                with common.OtherCpu() as other:
                    timing = common.time_task(task, device, min_run_time=args.min_run_time)
                gbps = 2 * out_bytes / (timing.median_ms * 1e-3) / 1e9  # tiles read + written
                peak = common.peak_gbps(device)
                rows.append(
                    dict(
                        op=op, case=case, provider=name, device=env["device"], dtype=dtype_name,
                        n=args.n, image=image, tile=tile, time_ms=round(timing.median_ms, 4),
                        iqr_ms=round(timing.iqr_ms, 4), samples=timing.samples,
                        gbps=round(gbps, 2), pct_peak=round(100 * gbps / peak, 1) if peak else "",
                        peak_mem_mb=round(common.peak_memory_mb(task, device), 2), correct=correct,
                        other_cpu_pct=other.percent, torch=env["torch"], threads=env["threads"],
                    )
                )  # fmt: skip
                print(f"{op:13s} {case:8s} {image:10s} {dtype_name:8s} {name:8s} "
                      f"{timing.median_ms:9.3f} ms  {gbps:6.2f} GB/s", flush=True)  # fmt: skip
            common.release_memory(device)
            common.add_speedups(rows, KEY, baselines=("loop", "eager", "unfold", "compile", "copy"))
            save(rows)
    return rows, failures


# ---- hamming -----------------------------------------------------------------------------------


def naive_hamming(n: int, seed: int = 0) -> np.ndarray:
    """The common implementation: every step recomputes the distance of every candidate to every
    chosen permutation (O(n^2 * 9!) over the run), then takes the best min-distance."""
    cands = all_permutations(9).numpy()
    first = int(torch.randint(len(cands), (1,), generator=torch.Generator().manual_seed(seed)))
    chosen = [first]
    while len(chosen) < n:
        dist = np.zeros((len(cands), len(chosen)), dtype=np.int8)
        for j, c in enumerate(chosen):
            dist[:, j] = (cands != cands[c]).sum(1)
        score = dist.min(1).astype(np.int32)
        score[chosen] = -1
        chosen.append(int(score.argmax()))
    return cands[chosen]


def run_hamming(args, env) -> list[dict]:
    rows = []
    t0 = time.perf_counter()
    naive = naive_hamming(args.naive_max)  # run once; its O(n^2) cost is scaled to larger n
    t_naive = time.perf_counter() - t0
    for n in (100, 1000):
        t0 = time.perf_counter()
        ours = labelkit_ext.hamming_permutations(n)
        t_ours = time.perf_counter() - t0
        stats = labelkit_ext.hamming_distance_stats(ours)
        k = min(n, args.naive_max)
        assert np.array_equal(naive[:k], ours[:k].numpy()), "naive greedy disagrees"
        est = t_naive * (n / args.naive_max) ** 2
        note = "" if n == args.naive_max else f" (extrapolated as n^2 from n={args.naive_max})"
        print(f"hamming n={n}: ours {t_ours:.3f} s, naive {est:.1f} s{note}, "
              f"min/mean distance {stats.min_distance}/{stats.mean_distance:.3f}", flush=True)  # fmt: skip
        for name, secs, case in (("ours", t_ours, f"n={n}"), ("naive", est, f"n={n}{note}")):
            rows.append(
                dict(
                    op="hamming_permutations", case=case, provider=name, device=env["device"],
                    dtype="int64", n=n, image="grid3", time_ms=round(secs * 1e3, 1),
                    speedup_vs_loop=round(est / secs, 1), correct=True, torch=env["torch"],
                    threads=env["threads"], other_cpu_pct="",
                    tile=f"min {stats.min_distance} mean {stats.mean_distance:.3f}",
                )
            )  # fmt: skip
    return rows


# ---- main ------------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", type=int, default=256, help="images per batch (default 256)")
    p.add_argument(
        "--dtypes", type=common.choice_list((*common.DTYPES, "uint8")), default=["float32"]
    )
    p.add_argument("--providers", type=common.choice_list(PROVIDERS), default=list(PROVIDERS))
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--skip-hamming", action="store_true")
    p.add_argument("--skip-tiles", action="store_true")
    p.add_argument("--naive-max", type=int, default=100, help="largest n run by the naive hamming")
    p.add_argument(
        "--device", type=common.device_arg, default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--min-run-time", type=float, default=0.3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    args = p.parse_args(argv)
    if args.no_compile:
        args.providers = [x for x in args.providers if x != "compile"]
    return args


def report(rows: Sequence[dict]) -> str:
    cols = (
        ("op", "op"), ("case", "case"), ("image", "image"), ("n", "N"), ("dtype", "dtype"),
        ("provider", "provider"),
        ("time_ms", "ms"), ("gbps", "GB/s"), ("peak_mem_mb", "peak MiB"), ("speedup_vs_loop", "vs loop"),
        ("speedup_vs_eager", "vs eager"), ("speedup_vs_unfold", "vs unfold"),
        ("speedup_vs_compile", "vs compile"), ("speedup_vs_copy", "vs copy"),
    )  # fmt: skip
    return common.markdown_table([r for r in rows if r["op"] != "hamming_permutations"], cols)


def markdown(rows: Sequence[dict], env: dict) -> str:
    """pretext.md: the tile ops' table (every N its rows hold) and the hamming table."""
    tiles = [r for r in rows if r["op"] != "hamming_permutations"]
    ham = [r for r in rows if r["op"] == "hamming_permutations"]
    ham_table = common.markdown_table(
        ham, (("case", "case"), ("provider", "provider"), ("time_ms", "ms"), ("speedup_vs_loop", "naive / this"),
              ("tile", "set distances")),
    )  # fmt: skip
    sizes = ", ".join(str(n) for n in sorted({r["n"] for r in tiles})) or "-"
    return (
        f"# pretext ops on {env['device']} (N={sizes}, torch {env['torch']}, "
        f"{env['threads']} threads)\n\nRatios are from one run, side by side; `other_cpu_pct` in the "
        f"CSV says how busy the machine was.\n\n{report(rows)}\n\n## hamming_permutations (grid 3)\n\n{ham_table}\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.resolve_device(args.device)
    env = common.environment(device)
    out_dir = args.out / env["device"]
    print(f"labelkit_ext from {Path(labelkit_ext.__file__).parent}, HAS_OPS={labelkit_ext.HAS_OPS}")
    print(f"device {env['device']}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    if not labelkit_ext.HAS_OPS:
        common.banner(f"extension NOT loaded ({labelkit_ext.LOAD_ERROR}): 'ours' is the reference")
    common.warn_if_busy(device)
    if "compile" in args.providers:
        # One compiled reference serves every shape: allow a specialisation per case.
        torch._dynamo.config.recompile_limit = 64
        COMPILED["tiles"] = torch.compile(grid_tiles_ref, dynamic=False)
        COMPILED["rotate"] = torch.compile(rotate90_ref, dynamic=False)
    csv_path = out_dir / "pretext.csv"
    # Merged into earlier results, so --skip-tiles / --skip-hamming refresh only their part.
    previous = common.read_csv(csv_path)

    def save(new_rows: list[dict]) -> list[dict]:
        merged = common.merge_rows(previous, new_rows, (*KEY, "provider"))
        common.write_csv(merged, csv_path, COLUMNS)
        return merged

    rows, failures = [], []
    if not args.skip_tiles:
        rows, failures = run_tiles(args, device, env, save)
    if not args.skip_hamming and device.type != "cpu":
        # A CPU op: its figures belong to the CPU results, not to this device's folder.
        print("hamming_permutations runs on the CPU: skipped here (run this script on the CPU)")
    elif not args.skip_hamming:
        rows += run_hamming(args, env)
    rows = save(rows)
    text = markdown(rows, env)
    (out_dir / "pretext.md").write_text(text)
    print(f"\n{text}\nwrote {csv_path}")
    for f in failures:
        print(f"MISMATCH {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
