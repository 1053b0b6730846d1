"""Shared harness for the ``bench/bench_<op>.py`` scripts.

A script builds, for every size it measures, one ``Task`` per provider and mode (``mode_task``),
checks the providers against the eager reference (``assert_close``), then measures each with
``time_task`` (``torch.utils.benchmark``: warm-up, CUDA sync, median and IQR), ``peak_memory_mb``
and ``OtherCpu`` (how busy the rest of the machine was). Rows are plain dicts; ``add_speedups``,
``merge_rows``, ``write_csv`` and ``markdown_table`` turn them into
``bench/results/<device>/<op>.csv`` and the tables in bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import os
import platform
import re
import statistics
import sys
import time
import timeit
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.utils.benchmark as tbench

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"

MODES = ("forward", "backward", "full")
PROVIDERS = ("ours", "eager", "compile")
DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}

# Peak HBM bandwidth in GB/s, matched against torch.cuda.get_device_name() (first match wins).
PEAK_HBM_GBPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("h200",), 4800.0),
    (("h100", "pcie"), 2000.0),
    (("h100", "hbm3"), 3350.0),  # "NVIDIA H100 80GB HBM3" is the SXM part
    (("h100", "sxm"), 3350.0),
    (("a100", "80gb"), 2039.0),
    (("a100", "40gb"), 1555.0),
)

# Tolerances against the eager reference, by input dtype: (rtol, atol). Written once here.
TOLERANCES = {
    torch.float64: (1e-7, 1e-9),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-3),
}


# ----------------------------------------------------------------------------- arguments


def int_list(text: str, minimum: int = 0) -> list[int]:
    """'1024, 65_536' -> [1024, 65536] (underscores allowed), each >= ``minimum``."""
    try:
        values = [int(t.replace("_", "")) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected a comma list of integers, got {text!r}"
        ) from exc
    if any(v < minimum for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= {minimum}, got {text!r}")
    return values


def size_list(text: str) -> list[int]:
    """A comma list of sizes (rows, columns, pixels, channels): integers >= 1."""
    return int_list(text, minimum=1)


def device_arg(text: str) -> str:
    """An argparse ``type`` for --device: cpu, cuda or cuda:<i> (checked before any work)."""
    try:
        kind = torch.device(text).type
    except RuntimeError as exc:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:<i>, got {text!r}") from exc
    if kind not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:<i>, got {text!r}")
    return text


def choice_list(choices: Iterable[str]) -> Callable[[str], list[str]]:
    """An argparse ``type`` for a comma list whose items must be in ``choices``."""
    allowed = tuple(choices)

    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{bad or text!r}: choose from {', '.join(allowed)}")
        return items

    return parse


def add_common_args(
    parser: argparse.ArgumentParser,
    *,
    n: Sequence[int],
    c: Sequence[int],
    dtypes: Sequence[str] = ("float32", "bfloat16"),
    min_run_time: float = 0.2,
) -> None:
    """The flags every bench script shares: sizes, dtypes, modes, device, providers, output."""
    join = ",".join
    parser.add_argument(
        "--n",
        type=size_list,
        default=list(n),
        help=f"rows, comma list (default {join(map(str, n))})",
    )
    parser.add_argument(
        "--c",
        type=size_list,
        default=list(c),
        help=f"columns, comma list (default {join(map(str, c))})",
    )
    parser.add_argument(
        "--dtypes", type=choice_list(DTYPES), default=list(dtypes), help=f"default {join(dtypes)}"
    )
    parser.add_argument(
        "--modes", type=choice_list(MODES), default=list(MODES), help=f"default {join(MODES)}"
    )
    parser.add_argument(
        "--providers",
        type=choice_list(PROVIDERS),
        default=list(PROVIDERS),
        help=f"default {join(PROVIDERS)}",
    )
    parser.add_argument(
        "--no-compile",
        action="store_true",
        help="drop the torch.compile provider (slow to compile on CPU)",
    )
    parser.add_argument(
        "--device",
        type=device_arg,
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu | cuda | cuda:<i>",
    )
    parser.add_argument(
        "--min-run-time",
        type=float,
        default=min_run_time,
        help="seconds of timed runs per measurement (torch.utils.benchmark)",
    )
    parser.add_argument(
        "--min-samples", type=int, default=3, help="at least this many timed blocks per measurement"
    )
    parser.add_argument(
        "--max-elements",
        type=int,
        default=None,
        help="cap N so that N*C <= this (default: 2**26 on CPU, from free memory on a GPU)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory run")
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="on a correctness mismatch, record it, time anyway and exit 1 at the end",
    )
    parser.add_argument(
        "--update",
        action="store_true",
        help="merge into the existing CSV (replace the rows re-measured) instead of overwriting it",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS_DIR,
        help="results folder; files go to <out>/<device>/ (default bench/results)",
    )


def selected_providers(args: argparse.Namespace) -> list[str]:
    """--providers minus 'compile' under --no-compile; 'eager' is always kept (the baseline)."""
    chosen = [p for p in args.providers if not (args.no_compile and p == "compile")]
    return chosen if "eager" in chosen else ["eager", *chosen]


# ----------------------------------------------------------------------------- devices


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU is visible to torch")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def slug(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def device_slug(device: torch.device) -> str:
    """Folder name under bench/results: 'cpu-amd-epyc', 'nvidia-h100-80gb-hbm3'."""
    name = slug(device_name(device))
    return name if device.type == "cuda" else f"cpu-{name}"


def peak_gbps(device: torch.device) -> float | None:
    """Peak HBM bandwidth of a known GPU; None on CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = device_name(device).lower()
    for keys, gbps in PEAK_HBM_GBPS:
        if all(k in name for k in keys):
            return gbps
    return None


def default_max_elements(device: torch.device, bytes_per_element: int = 40) -> int:
    """Largest N*C to run by default: 2**26 on CPU (keeps a 2-core run in minutes), and on a GPU
    what fits when the slowest provider holds ~``bytes_per_element`` bytes per logit (the eager
    entropy_gate with 10 clusters peaks at ~37 over a full pass, its input included)."""
    if device.type != "cuda":
        return 2**26
    free, _ = torch.cuda.mem_get_info(device)
    return free // bytes_per_element


def cap_rows(n: int, c: int, max_elements: int, multiple: int = 256) -> int:
    """N itself when N*C fits under ``max_elements``, else the largest smaller multiple."""
    if n * c <= max_elements:
        return n
    return max(multiple, (max_elements // c) // multiple * multiple)


def environment(device: torch.device) -> dict[str, str]:
    """Columns recorded with every row, so a CSV says what produced it."""
    return {
        "device": device_slug(device),
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()) if device.type == "cpu" else "",
    }


def _cpu_seconds() -> tuple[float, float, float] | None:
    """(wall, busy CPU seconds of the whole machine, CPU seconds of this process); Linux only."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[:7])
    busy = (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")
    t = os.times()
    return time.monotonic(), busy, t.user + t.system


#: /proc/stat counts in clock ticks (10 ms): a shorter window than this is no measurement.
MIN_CPU_WINDOW_S = 0.2


class OtherCpu:
    """Context manager: the share (%) of all cores that *other* processes used while it was open,
    in [0, 100]; ``None`` where /proc/stat is missing or the window was under
    ``MIN_CPU_WINDOW_S`` (ticks of 10 ms over a millisecond gave figures of several hundred %).
    Above a few % the CPU timings are suspect."""

    percent: float | None = None

    def __enter__(self) -> OtherCpu:
        self._start = _cpu_seconds()
        return self

    def __exit__(self, *exc) -> None:
        end = _cpu_seconds()
        if self._start is None or end is None or end[0] - self._start[0] < MIN_CPU_WINDOW_S:
            return
        wall, busy, mine = (e - s for e, s in zip(end, self._start, strict=True))
        share = 100 * (busy - mine) / (wall * (os.cpu_count() or 1))
        self.percent = round(min(100.0, max(0.0, share)), 1)


def warn_if_busy(device: torch.device, seconds: float = 1.0, threshold: float = 10.0) -> None:
    """Banner when other processes use more than ``threshold`` % of the CPU (sampled briefly)."""
    if device.type != "cpu":
        return
    with OtherCpu() as other:
        time.sleep(seconds)
    if other.percent is not None and other.percent > threshold:
        banner(f"other processes are using {other.percent:.0f}% of the CPU: timings will be noisy "
               "(rerun when the machine is idle; each row records other_cpu_pct)")  # fmt: skip


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- tasks


def _nothing() -> None:
    return None


@dataclass(frozen=True)
class Task:
    """What one measurement times: ``run(setup())``. ``setup`` is never timed; with ``fresh`` it is
    redone before every timed call (e.g. a new autograd graph for a backward that frees it)."""

    run: Callable[[Any], object]
    setup: Callable[[], Any] = _nothing
    fresh: bool = False

    def __call__(self) -> object:
        return self.run(self.setup())


def mode_task(
    mode: str,
    call: Callable[[torch.Tensor], Sequence[torch.Tensor]],
    x: torch.Tensor,
    grads: Sequence[torch.Tensor] = (),
) -> Task:
    """The ``Task`` timing one mode of ``call`` (input -> differentiable outputs).

    forward: ``call(x)`` on an input without grad. backward: the gradient w.r.t. ``x`` alone, on a
    graph built untimed before every call (no ``retain_graph``: torch.compile's donated buffers
    forbid it, and training frees the graph too). full: forward + backward. Gradients are
    returned, not accumulated into ``x.grad`` (that would add a pass over x).
    """
    if mode == "forward":
        x = x.detach()
        return Task(run=lambda _: call(x))
    x = x.detach().requires_grad_(True)
    if mode == "backward":
        return Task(
            setup=lambda: call(x), run=lambda outs: torch.autograd.grad(outs, x, grads), fresh=True
        )
    if mode == "full":
        return Task(run=lambda _: torch.autograd.grad(call(x), x, grads))
    raise ValueError(f"unknown mode {mode!r}")


# ----------------------------------------------------------------------------- correctness


class Mismatch(AssertionError):
    """A provider disagrees with the eager reference."""


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    return TOLERANCES.get(dtype, TOLERANCES[torch.float32])


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, *, what: str, dtype: torch.dtype
) -> None:
    """torch.testing.assert_close with the tolerance of the benchmark's input ``dtype``;
    raises ``Mismatch`` naming ``what`` and the worst element."""
    rtol, atol = tolerance(dtype)
    try:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True)
    except AssertionError as exc:
        raise Mismatch(f"{what}: {exc}") from None


# ----------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Timing:
    median_ms: float
    iqr_ms: float
    samples: int


def _sync_timer(device: torch.device) -> Callable[[], float]:
    """A wall clock that first waits for the device's queued kernels."""
    if device.type != "cuda":
        return timeit.default_timer

    def timer() -> float:
        torch.cuda.synchronize(device)
        return timeit.default_timer()

    return timer


def time_task(
    task: Task,
    device: torch.device,
    *,
    min_run_time: float = 0.2,
    min_samples: int = 3,
    label: str = "",
) -> Timing:
    """Median and IQR of ``task.run`` in ms.

    ``Timer.blocked_autorange`` (its block-size estimate is the warm-up), topped up to
    ``min_samples`` blocks for calls slower than ``min_run_time``. A ``fresh`` task cannot run
    twice on one setup, so it is timed one call at a time with the same synchronising clock.
    """
    clock = _sync_timer(device)
    if task.fresh:
        return _summarise(_one_call_times(task, clock, min_run_time, min_samples))
    timer = tbench.Timer(
        stmt="run(state)",
        setup="state = setup()",
        globals={"run": task.run, "setup": task.setup},
        timer=clock,
        num_threads=torch.get_num_threads(),  # Timer defaults to 1 thread
        label=label,
    )
    first = timer.blocked_autorange(min_run_time=min_run_time)
    blocks = [first] + [
        timer.timeit(first.number_per_run) for _ in range(min_samples - len(first.times))
    ]
    return _summarise([t for m in blocks for t in m.times])


def _one_call_times(
    task: Task, clock: Callable[[], float], min_run_time: float, min_samples: int
) -> list[float]:
    """Seconds per call of ``task.run``, a fresh untimed ``task.setup()`` before each, after one
    warm-up call; until ``min_run_time`` seconds and ``min_samples`` calls are reached."""
    task()
    times: list[float] = []
    while sum(times) < min_run_time or len(times) < min_samples:
        state = task.setup()
        start = clock()
        task.run(state)
        times.append(clock() - start)
        del state
    return times


def _summarise(times: Sequence[float]) -> Timing:
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return Timing(
        median_ms=statistics.median(times) * 1e3, iqr_ms=(q[2] - q[0]) * 1e3, samples=len(times)
    )


@contextlib.contextmanager
def _quiet_stderr():
    """Silence fd 2 (the profiler prints start/stop lines from C++); Python errors still raise."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory_mb(task: Task, device: torch.device) -> float:
    """Peak bytes allocated by one ``task.run`` above what was allocated before it, in MiB.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the profiler's allocator events (every
    tensor the call allocates through c10's CPU allocator, kernels' internal buffers included).
    """
    state = task.setup()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        task.run(state)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    activities = [torch.profiler.ProfilerActivity.CPU]
    with (
        _quiet_stderr(),
        torch.profiler.profile(activities=activities, profile_memory=True) as prof,
    ):
        task.run(state)
    return _cpu_peak_bytes(prof) / 2**20


def _cpu_peak_bytes(prof: torch.profiler.profile) -> int:
    """Running sum of the [memory] events (+alloc, -free) in time order; its maximum."""
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events = [e for e in events if e.device_type() == torch.autograd.DeviceType.CPU] or events
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


# ----------------------------------------------------------------------------- results


def add_speedups(
    rows: list[dict], key: Sequence[str], baselines: Sequence[str] = ("eager", "compile")
) -> None:
    """Add ``speedup_vs_<b>`` = time of provider ``b`` / time of the row, within each group of
    rows sharing the ``key`` columns; empty where ``b`` was not run."""
    groups: dict[tuple, dict[str, float]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in key), {})[r["provider"]] = r["time_ms"]
    for r in rows:
        times = groups[tuple(r[k] for k in key)]
        for b in baselines:
            t = times.get(b)
            r[f"speedup_vs_{b}"] = round(t / r["time_ms"], 3) if t and r["time_ms"] else ""


def write_csv(rows: Sequence[dict], path: Path, columns: Sequence[str]) -> Path:
    """Write ``rows`` (missing columns left empty) to ``path``, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore", restval="")
        w.writeheader()
        w.writerows(rows)
    return path


def read_csv(path: Path) -> list[dict]:
    """Rows of a results CSV (none if it is missing), numbers parsed back so that they merge,
    compare and format like fresh rows."""
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(f)]


def _number(text: str) -> int | float | str:
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(text)
    return text


def merge_rows(old: Sequence[dict], new: Sequence[dict], key: Sequence[str]) -> list[dict]:
    """``old`` with each row that ``new`` re-measured (same ``key`` values) replaced where it
    stood; rows of ``new`` with unseen keys go at the end."""
    fresh = {tuple(r[k] for k in key): r for r in new}
    merged = [fresh.pop(tuple(r[k] for k in key), r) for r in old]
    return merged + list(fresh.values())


def fmt(value: object, digits: int = 3) -> str:
    """Numbers to at most ``digits`` significant figures ('' and None stay empty)."""
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:.0f}"
    return str(value)


def side_by_side(rows: Sequence[dict], key: Sequence[str], ours: Sequence[str]) -> list[dict]:
    """One line per ``key`` with every provider's ``<provider>_ms`` and ``<provider>_mb`` side by
    side, plus the ``ours`` columns of ours' row (``speedup_vs_<x>`` is renamed ``vs_<x>``)."""
    table: dict[tuple, dict] = {}
    for r in rows:
        line = table.setdefault(tuple(r[k] for k in key), {k: r[k] for k in key})
        line[f"{r['provider']}_ms"] = r["time_ms"]
        line[f"{r['provider']}_mb"] = r["peak_mem_mb"]
        if r["provider"] == "ours":
            line.update({c.replace("speedup_", ""): r[c] for c in ours})
    return list(table.values())


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """A GitHub markdown table of ``rows``; ``columns`` are (key, header) pairs."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def banner(text: str) -> None:
    """A warning nobody scrolls past."""
    line = "!" * 78
    print(f"{line}\n!! {text}\n{line}", flush=True)
