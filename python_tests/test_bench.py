"""Smoke tests for the benchmark harness: bench/common.py helpers and bench/bench_entropy.py on
tiny sizes (no torch.compile, so the whole file stays well under 30 s on 2 CPU cores)."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"labelkit_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


common = _load("common")


def test_list_parsers():
    assert common.int_list("10, 1_000,32000") == [10, 1000, 32000]
    assert common.choice_list(common.MODES)("forward,full") == ["forward", "full"]
    with pytest.raises(Exception, match="choose from"):
        common.choice_list(common.MODES)("sideways")
    # Bad sizes and devices are argparse errors before any work (they were tracebacks).
    assert common.int_list("0,10") == [0, 10] and common.size_list("1,2") == [1, 2]
    with pytest.raises(argparse.ArgumentTypeError, match="expected integers >= 1, got '0'"):
        common.size_list("0")
    with pytest.raises(argparse.ArgumentTypeError, match="expected integers >= 0, got '-3'"):
        common.int_list("-3")
    assert common.device_arg("cuda:1") == "cuda:1"
    for bad in ("tpu", "gpu"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected cpu, cuda or cuda:<i>"):
            common.device_arg(bad)


def test_cap_rows():
    assert common.cap_rows(65_536, 1_000, 2**26) == 65_536
    n = common.cap_rows(65_536, 32_000, 2**26)
    assert n == 2_048 and n * 32_000 <= 2**26


def test_slugs_and_peaks():
    assert common.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert common.slug("AMD EPYC") == "amd-epyc"
    assert common.device_slug(torch.device("cpu")).startswith("cpu-")
    assert common.peak_gbps(torch.device("cpu")) is None


def test_speedups_and_table():
    rows = [
        {"op": "x", "mode": "forward", "provider": "ours", "time_ms": 1.0},
        {"op": "x", "mode": "forward", "provider": "eager", "time_ms": 3.0},
    ]
    common.add_speedups(rows, ("op", "mode"))
    assert rows[0]["speedup_vs_eager"] == 3.0 and rows[0]["speedup_vs_compile"] == ""
    table = common.markdown_table(rows, [("provider", "provider"), ("speedup_vs_eager", "×")])
    assert table.splitlines()[2] == "| ours | 3 |"


def test_backward_task_runs_repeatedly():
    x = torch.randn(8, 5)
    task = common.mode_task("backward", lambda t: [t.logsumexp(-1)], x, [torch.ones(8)])
    timing = common.time_task(task, torch.device("cpu"), min_run_time=0.001, min_samples=3)
    assert timing.samples >= 3 and timing.median_ms > 0


def test_bench_entropy_smoke(tmp_path):
    cmd = [
        sys.executable, str(BENCH / "bench_entropy.py"), "--n", "64", "--c", "10,33",
        "--dtypes", "float32,bfloat16", "--modes", "forward,full", "--min-run-time", "0.01",
        "--no-compile", "--device", "cpu", "--out", str(tmp_path),
    ]  # fmt: skip
    # One thread: tiny ops stay fast even when other jobs keep the CPU busy.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    files = list(tmp_path.glob("*/entropy.csv"))
    assert len(files) == 1 and files[0].parent.name == common.device_slug(torch.device("cpu"))
    rows = list(csv.DictReader(files[0].open()))
    # (softmax_entropy + entropy_gate without / with clusters) x 2 dtypes x 2 C x 2 modes x 2 providers
    assert len(rows) == 3 * 2 * 2 * 2 * 2
    assert {r["provider"] for r in rows} == {"ours", "eager"}
    assert all(float(r["time_ms"]) > 0 and r["correct"] == "True" for r in rows)
    assert all(float(r["speedup_vs_eager"]) > 0 for r in rows)
    assert (files[0].parent / "entropy.md").read_text().count("\n|") >= 24


def test_bench_transforms_smoke(tmp_path):
    cmd = [sys.executable, str(BENCH / "bench_transforms.py"), "--sizes", "8", "--channels",
           "1,3", "--images", "16", "--repeats", "1", "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader(next(tmp_path.glob("*/transforms.csv")).open()))
    # (train, eval) x 2 channel counts x 2 providers, every pair checked equal before timing
    assert len(rows) == 8 and all(
        r["check"] == "equal" and float(r["us_per_image"]) > 0 for r in rows
    )


targets = _load("targets")


def _write(folder: Path, name: str, rows: list[dict]) -> None:
    columns = sorted({k for r in rows for k in r})
    common.write_csv(rows, folder / name, columns)


def test_targets_cpu_and_gpu_rules(tmp_path, capsys):
    cpu = tmp_path / "cpu-test"
    base = dict(op="softmax_entropy", mode="backward", dtype="float32", n=1024, c=10)
    _write(cpu, "entropy.csv", [
        dict(base, provider="ours", speedup_vs_compile=1.6, peak_mem_mb=0.05),
        dict(base, provider="ours", c=100, speedup_vs_compile=1.4, peak_mem_mb=0.39),
        dict(base, provider="compile", c=100, speedup_vs_compile=1.0, peak_mem_mb=9.0),
    ])  # fmt: skip
    found = {o.target.text: o for o in targets.check(cpu)}
    speed = found["backward >= 1.5x torch.compile"]
    assert speed.rows == 2 and [r["c"] for r, _ in speed.missed] == [100]
    memory = found["backward peak memory <= 1.1x the gradient"]  # 0.039 MiB of gradient at C = 10
    assert memory.rows == 2 and [r["c"] for r, _ in memory.missed] == [10]

    gpu = tmp_path / "nvidia-test"
    tile = dict(op="jigsaw_tiles", case="centred", dtype="float32", n=256, image="3x255x255")
    _write(gpu, "pretext.csv", [
        dict(tile, provider="ours", pct_peak=81.0),
        dict(tile, provider="ours", image="1x28x28", pct_peak=79.0),
        dict(tile, provider="ours", image="1x128x128", pct_peak=""),  # unknown peak: not measured
        dict(tile, provider="loop", pct_peak=3.0),
    ])  # fmt: skip
    (bandwidth,) = targets.check(gpu)
    assert bandwidth.target.issue == 8 and bandwidth.rows == 3
    assert sorted((r["image"], why) for r, why in bandwidth.missed) == [
        ("1x128x128", "not measured"),
        ("1x28x28", "79"),
    ]

    assert targets.main([str(gpu), "--all"]) == 1
    out = capsys.readouterr().out
    assert (
        "| 8 | >= 80 % of memory bandwidth | 1/3 |" in out
        and "image=1x128x128: not measured" in out
    )
    (tmp_path / "empty").mkdir()
    assert targets.main([str(tmp_path / "empty")]) == 2


def test_targets_do_not_count_wrong_answers_or_the_fallback(tmp_path):
    """A fast row with a wrong answer, or one that timed the fallback instead of the kernel,
    misses its target whatever its figure (targets.py used to read only the figure)."""
    cpu = tmp_path / "cpu-test"
    base = dict(op="softmax_entropy", mode="backward", dtype="float32", n=1024, c=10,
                provider="ours", speedup_vs_compile=9.0, peak_mem_mb=0.03)  # fmt: skip
    _write(cpu, "entropy.csv", [
        dict(base, correct="True", ours_native="True"),
        dict(base, c=100, correct="False", ours_native="True"),
        dict(base, c=1000, correct="True", ours_native="False"),
    ])  # fmt: skip
    speed = next(o for o in targets.check(cpu) if o.target.text.startswith("backward >= 1.5x"))
    assert [(r["c"], why) for r, why in speed.missed] == [
        (100, "wrong answer (correct=False)"),
        (1000, "the fallback ran, not the kernel (ours_native=False)"),
    ]


def test_targets_read_every_committed_results_folder():
    for folder in sorted(d for d in (BENCH / "results").iterdir() if d.is_dir()):
        outcomes = targets.check(folder)
        assert outcomes and all(o.rows for o in outcomes), folder
