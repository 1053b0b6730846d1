"""scripts/gpu_check.sh's time-keeping, on stand-ins for the GPU machine's tools.

A lent GPU machine gives 15 minutes in all (docs/gpu-session.md), so the script's per-step caps
(``STEP@SECONDS``) and ``--deadline`` are what make a cut-short run hand back what finished.
They cannot be exercised on a GPU first, so they are checked here: a copy of the script runs in
a scratch tree with stand-ins for nvidia-smi, compute-sanitizer and Python that only log their
arguments and sleep.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$* arch=${TORCH_CUDA_ARCH_LIST:-}" >> "$FAKE_LOG"
case "$*" in
  *get_device_capability*) echo 9.0 ;;
  *device_slug*) echo fake-gpu ;;
  *"pip install"*) exit "${FAKE_PIP_RC:-0}" ;;
  *"-m pytest"*) exec sleep "${FAKE_PYTEST_SECONDS:-0}" ;;
  *bench/bench_*) exec sleep "${FAKE_BENCH_SECONDS:-0}" ;;
esac
"""
FAKE_NVIDIA_SMI = """#!/usr/bin/env bash
echo "name, driver_version, memory.total [MiB], compute_cap"
echo "Fake GPU, 0, 1 MiB, 9.0"
"""


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A scratch checkout: the script, two empty GPU benchmarks and a CPU one (no --device),
    and a fake CUDA_HOME/bin."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "gpu_check.sh", tmp_path / "scripts")
    (tmp_path / "bench").mkdir()
    for name in ("entropy", "affine"):
        (tmp_path / "bench" / f"bench_{name}.py").write_text("from common import add_common_args\n")
    (tmp_path / "bench" / "bench_transforms.py").write_text('p.add_argument("--sizes")\n')
    bin_dir = tmp_path / "cuda" / "bin"
    bin_dir.mkdir(parents=True)
    _executable(bin_dir / "python", FAKE_PYTHON)
    _executable(bin_dir / "nvidia-smi", FAKE_NVIDIA_SMI)
    _executable(bin_dir / "compute-sanitizer", "#!/usr/bin/env bash\n")
    return tmp_path


def _run(tree: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    cuda = tree / "cuda"
    environ = {
        k: v for k, v in os.environ.items() if not k.startswith(("GPU_CHECK_", "TORCH_CUDA_"))
    }
    environ.update(
        CUDA_HOME=str(cuda),
        PATH=f"{cuda / 'bin'}:{os.environ['PATH']}",
        PYTHON=str(cuda / "bin" / "python"),
        FAKE_LOG=str(tree / "calls.log"),
        **env,
    )
    return subprocess.run(
        ["bash", str(tree / "scripts" / "gpu_check.sh"), *args],
        env=environ, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def _summary_rows(tree: Path) -> dict[str, str]:
    """Step name (its first word) -> result, from summary.md's table."""
    lines = (tree / "bench/results/fake-gpu/gpu_check/summary.md").read_text().splitlines()
    cells = [
        [c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| ")
    ]
    return {row[0].split()[0]: row[1] for row in cells[2:]}


def test_step_cap_times_out_and_deadline_skips_what_it_cannot_fit(tree: Path) -> None:
    # test-cuda would sleep 30 s but is capped at 2; bench_entropy, started ~2 s in, takes 8 s,
    # which leaves bench_affine under the 5 s minimum of the 14 s deadline: it is skipped, not
    # started and killed.
    proc = _run(
        tree, "build", "test-cuda@2", "bench:entropy", "bench:affine", "--deadline", "14",
        FAKE_PYTEST_SECONDS="30", FAKE_BENCH_SECONDS="8", GPU_CHECK_MIN_STEP="5",
        GPU_CHECK_BENCH_ARGS_ENTROPY="--c 7",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = _summary_rows(tree)
    assert rows["build"] == "passed"
    assert rows["CUDA"] == "TIMEOUT (2 s)"
    assert rows["bench_entropy.py"] == "passed"
    assert rows["bench_affine.py"] == "skipped (deadline)"
    assert "Overall: FAILED, 1 step(s) skipped by the deadline" in proc.stdout
    calls = (tree / "calls.log").read_text().splitlines()
    # Built for this GPU's arch alone; the per-benchmark arguments reach only that benchmark.
    assert any("pip install" in c and c.endswith("arch=9.0") for c in calls)
    assert [c for c in calls if "--c 7" in c] == [
        next(c for c in calls if "bench/bench_entropy.py" in c)
    ]
    assert not any("bench/bench_affine.py" in c for c in calls)
    # pytest-timeout (the stand-in imports anything): one hung CUDA test cannot use the step's cap.
    assert any("-m pytest" in c and "-k cuda --timeout 120" in c for c in calls)


def test_a_failed_build_stops_the_run(tree: Path) -> None:
    proc = _run(tree, "build", "test-cuda", "bench:entropy", FAKE_PIP_RC="1")
    assert proc.returncode == 1
    rows = _summary_rows(tree)
    assert rows == {"build": "FAILED (exit 1)", "(later": "not run: the build failed"}
    calls = (tree / "calls.log").read_text()
    # No test or benchmark ran ("pytest" alone also names the preflight's import probes).
    assert "-m pytest" not in calls and "python_tests" not in calls and "bench/" not in calls


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["test-cuda@soon"], "the cap after @ must be a whole number of seconds"),
        (["test-cuda", "--deadline", "-5"], "--deadline needs a whole number of seconds"),
        (["bench:nothing"], "no bench/bench_nothing.py"),
        (["bench:transforms"], "bench/bench_transforms.py has no --device (a CPU benchmark)"),
    ],
)
def test_bad_arguments_are_refused_before_anything_runs(tree: Path, args, message) -> None:
    proc = _run(tree, *args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tree / "calls.log").exists()


def test_bench_runs_every_gpu_benchmark_and_not_the_cpu_one(tree: Path) -> None:
    """`bench` expands to the scripts that take --device: bench_transforms.py (CPU DataLoader
    transforms) failed the step with 'unrecognized arguments: --device cuda'."""
    proc = _run(tree, "build", "bench")
    assert proc.returncode == 0, proc.stderr
    calls = (tree / "calls.log").read_text()
    assert "bench/bench_entropy.py" in calls and "bench/bench_affine.py" in calls
    assert "bench_transforms" not in calls
