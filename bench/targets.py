"""The issues' speed targets, checked against benchmark results.

    python bench/targets.py                                   # every folder in bench/results/
    python bench/targets.py bench/results/nvidia-h100-80gb-hbm3 [--all]

Each target is a rule over the `ours` rows of one CSV, each row measured beside its baselines in
one run (issue 7: affine.csv, issue 8: pretext.csv, issue 15: entropy.csv); a row with a wrong
answer (correct=False) or timed on the fallback (ours_native=False) misses whatever its figure. A folder named
cpu-* is held to the CPU targets, any other to the GPU ones. Prints a table per folder (rows
meeting the target / rows it applies to, and the worst row); --all lists every missing row.
Exit status 1 when some row misses a target, 2 when a folder has no results.

After a GPU session: run it on the fetched folder before updating bench/README.md and the issues.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from bench import common  # noqa: E402


@dataclass(frozen=True)
class Target:
    issue: int
    csv: str
    text: str
    applies: Callable[[dict], bool]  # which `ours` rows the target is about
    value: Callable[[dict], float | None]  # the row's figure (None: not measured in that row)
    minimum: float
    required: bool = True  # False: rows without the figure (baseline not run) do not count

    def misses(self, rows: Sequence[dict]) -> tuple[list[dict], list[tuple[dict, str]]]:
        """(rows it applies to, [(row, why)] of those below the minimum, not measured, or not
        counting: a wrong answer, or the fallback timed instead of the kernel)."""
        mine = [r for r in rows if r.get("provider") == "ours" and self.applies(r)]
        if not self.required:
            mine = [r for r in mine if self.value(r) is not None]
        low = []
        for row in mine:
            value, why = self.value(row), _disqualified(row)
            if why is None and value is None:
                why = "not measured"
            elif why is None and value < self.minimum:
                why = f"{value:.3g}"
            if why is not None:
                low.append((row, why))
        return mine, low


def _disqualified(row: dict) -> str | None:
    """Why a row's figure does not count whatever it is (columns a CSV lacks say nothing)."""
    if str(row.get("correct")) == "False":
        return "wrong answer (correct=False)"
    if str(row.get("ours_native")) == "False":
        return "the fallback ran, not the kernel (ours_native=False)"
    return None


def _num(key: str) -> Callable[[dict], float | None]:
    def get(row: dict) -> float | None:
        v = row.get(key)
        return float(v) if isinstance(v, int | float) else None

    return get


def _memory_ratio(row: dict) -> float | None:
    """Gradient bytes / the backward's peak MiB (>= 1 / 1.1 when the peak is at most 1.1x)."""
    peak = row.get("peak_mem_mb")
    dtype = common.DTYPES.get(row.get("dtype"))
    if not isinstance(peak, int | float) or not peak or dtype is None:
        return None
    return row["n"] * row["c"] * dtype.itemsize / 2**20 / peak


def _is(key: str, *values: object) -> Callable[[dict], bool]:
    return lambda r: r.get(key) in values


def _tiles(row: dict) -> bool:
    return row.get("op") != "hamming_permutations"


CPU_TARGETS = (
    Target(15, "entropy.csv", "backward >= 1.5x torch.compile", _is("mode", "backward"), _num("speedup_vs_compile"), 1.5),
    Target(15, "entropy.csv", "full >= 1.5x torch.compile", _is("mode", "full"), _num("speedup_vs_compile"), 1.5),
    Target(15, "entropy.csv", "backward peak memory <= 1.1x the gradient", _is("mode", "backward"), _memory_ratio, 1 / 1.1),
    Target(7, "affine.csv", "forward >= 1.5x eager", _is("mode", "forward"), _num("speedup_vs_eager"), 1.5),
    Target(7, "affine.csv", "full >= 2x eager", _is("mode", "full"), _num("speedup_vs_eager"), 2.0),
    Target(7, "affine.csv", "forward, full >= torch.compile", _is("mode", "forward", "full"), _num("speedup_vs_compile"), 1.0),
    Target(8, "pretext.csv", ">= 10x the per-image loop", _tiles, _num("speedup_vs_loop"), 10.0),
    Target(8, "pretext.csv", ">= 2x the vectorised reference (one gather)", _tiles, _num("speedup_vs_eager"), 2.0),
    Target(8, "pretext.csv", ">= 2x unfold + gather (where run)", _tiles, _num("speedup_vs_unfold"), 2.0, False),
    Target(8, "pretext.csv", "hamming_permutations(100) <= 1 s",
           lambda r: r.get("op") == "hamming_permutations" and r.get("case") == "n=100",
           lambda r: 1000 / r["time_ms"], 1.0),
    Target(8, "pretext.csv", "hamming_permutations(1000) <= 10 s",
           lambda r: r.get("op") == "hamming_permutations" and r.get("case") == "n=1000",
           lambda r: 10_000 / r["time_ms"], 1.0),
)  # fmt: skip

GPU_TARGETS = (
    Target(15, "entropy.csv", "forward >= 85 % of HBM bandwidth", _is("mode", "forward"), _num("pct_peak"), 85.0),
    Target(15, "entropy.csv", "backward >= 85 % of HBM bandwidth", _is("mode", "backward"), _num("pct_peak"), 85.0),
    Target(7, "affine.csv", "forward >= 2x eager", _is("mode", "forward"), _num("speedup_vs_eager"), 2.0),
    Target(7, "affine.csv", "full >= 3x eager", _is("mode", "full"), _num("speedup_vs_eager"), 3.0),
    Target(7, "affine.csv", "forward, full >= 5x kornia", _is("mode", "forward", "full"), _num("speedup_vs_kornia"), 5.0),
    Target(8, "pretext.csv", ">= 80 % of memory bandwidth", _tiles, _num("pct_peak"), 80.0),
)  # fmt: skip

KEYS = ("op", "mode", "case", "dtype", "n", "c", "clusters", "h", "w", "image")


def describe(row: dict) -> str:
    return " ".join(f"{k}={row[k]}" for k in KEYS if row.get(k) not in (None, ""))


@dataclass
class Outcome:
    target: Target
    rows: int
    missed: list[tuple[dict, str]]  # (row, why: its figure, "not measured", or a disqualification)


def check(folder: Path) -> list[Outcome] | None:
    """Every target for this folder's kind whose CSV is there; None when none is."""
    targets = CPU_TARGETS if folder.name.startswith("cpu-") else GPU_TARGETS
    outcomes = []
    for t in targets:
        rows = common.read_csv(folder / t.csv)
        if rows:
            mine, low = t.misses(rows)
            outcomes.append(Outcome(t, len(mine), low))
    return outcomes or None


def _rank(why: str) -> float:
    """Worst first: disqualified and unmeasured rows, then the lowest figure."""
    try:
        return float(why)
    except ValueError:
        return float("-inf")


def report(folder: Path, outcomes: Sequence[Outcome], every: bool) -> str:
    lines = [
        f"## {folder.name}",
        "",
        "| issue | target | rows met | worst row |",
        "|---|---|---|---|",
    ]
    for o in outcomes:
        met = o.rows - len(o.missed)
        worst = ""
        if o.missed:
            row, why = min(o.missed, key=lambda m: _rank(m[1]))
            worst = f"{describe(row)}: {why}"
        lines.append(f"| {o.target.issue} | {o.target.text} | {met}/{o.rows} | {worst} |")
    if every:
        for o in outcomes:
            for row, why in o.missed:
                lines.append(f"- issue {o.target.issue}, {o.target.text}: {describe(row)}: {why}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "folders", nargs="*", type=Path, help="results folders (default: all in bench/results/)"
    )
    p.add_argument("--all", action="store_true", help="list every row that misses a target")
    args = p.parse_args(argv)
    folders = args.folders or sorted(d for d in common.RESULTS_DIR.iterdir() if d.is_dir())
    status = 0
    for folder in folders:
        outcomes = check(folder)
        if outcomes is None:
            print(f"{folder}: no entropy.csv, affine.csv or pretext.csv", file=sys.stderr)
            status = 2
            continue
        print(report(folder, outcomes, args.all) + "\n")
        if status == 0 and any(o.missed for o in outcomes):
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
