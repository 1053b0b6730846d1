#!/usr/bin/env bash
# `make racecheck`: the ops' CUDA tests on the emulated CUDA kernels under ThreadSanitizer, which
# reports every pair of conflicting accesses (shared or global memory) that no __syncthreads or
# warp collective orders: a data race on a GPU, whatever order the emulator happened to run the
# threads in (csrc/tests/cuemu/cuemu.cpp, "racecheck build").
#
# 1. CMake builds liblabelkit_cuemu.so with -DLABELKIT_RACECHECK=ON into its own folder (default
#    cmake-build-racecheck/).
# 2. pytest runs the ops' CUDA and fuzz tests under scripts/fakecuda (as `make sanitize` does),
#    libtsan preloaded into Python, one thread (torch's OpenMP synchronisation is invisible to
#    TSan). Every report is fatal and written to $BUILD/tsan-logs/.
#
#   PYTHON (python3)  LABELKIT_RACECHECK_BUILD (cmake-build-racecheck)  MAX_JOBS (2)
#   extra arguments go to pytest, e.g. `scripts/racecheck.sh -k entropy_gate -x`
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD=${LABELKIT_RACECHECK_BUILD:-cmake-build-racecheck}
LIB="$PWD/$BUILD/liblabelkit_cuemu.so"
LOGS="$PWD/$BUILD/tsan-logs"
TAG=racecheck
# shellcheck source=scripts/emulated_checks.sh
source scripts/emulated_checks.sh

echo "[racecheck] building the emulated CUDA kernels with ThreadSanitizer into $BUILD/ (log: $BUILD.log)"
build_with_cmake "$BUILD" "-DLABELKIT_CUDA_EMULATION=ON -DLABELKIT_RACECHECK=ON" "--target labelkit_cuemu"
preload=$(sanitizer_preload "$LIB" libtsan -DLABELKIT_RACECHECK=ON)

fresh_dir "$LOGS"
export TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=1:abort_on_error=1:report_signal_unsafe=0:log_path=$LOGS/tsan}

# The detector must see a race where there is one, and none where a barrier orders the accesses.
selftest() {
  LD_PRELOAD="$preload${LD_PRELOAD:+:$LD_PRELOAD}" OMP_NUM_THREADS=1 \
    TSAN_OPTIONS="halt_on_error=1:exitcode=66:report_signal_unsafe=0:log_path=$1" \
    "$PY" -P -c "import torch; torch.ops.load_library('$LIB'); print(torch.ops.cuemu_racecheck.read_neighbours($2).sum().item())"
}
echo "[racecheck] self-check: a kernel with a race, then the same kernel with its barrier"
CHECK="$PWD/$BUILD/selftest-logs"
fresh_dir "$CHECK"
if selftest "$CHECK/racy" False > "$CHECK/racy.out" 2>&1 || ! grep -qs "data race" "$CHECK"/racy.*; then
  cat "$CHECK"/* 2>/dev/null
  echo "[racecheck] FAILED: ThreadSanitizer did not report the self-check's race" >&2
  exit 1
fi
if ! selftest "$CHECK/ordered" True > "$CHECK/ordered.out" 2>&1 || ls "$CHECK"/ordered.[0-9]* > /dev/null 2>&1; then
  cat "$CHECK"/* 2>/dev/null
  echo "[racecheck] FAILED: ThreadSanitizer reported the self-check's kernel with its barrier" >&2
  exit 1
fi

echo "[racecheck] CUDA tests of the ops, CUDA kernels emulated under ThreadSanitizer ($LIB)"
# pytest-timeout's timer thread, not its SIGALRM: TSan holds a signal that arrives while an
# emulated GPU thread (a fiber) runs until that fiber calls an intercepted function, which kernel
# code almost never does. A test over its limit then passed, and the alarm failed whichever later
# test first ran frexp in a kernel (the landing CI of session 20; docs/testing.md).
OMP_NUM_THREADS=1 emulated_cuda_tests "$preload" "$LIB" --timeout-method=thread "$@" \
  || report_and_fail "CUDA tests of the ops on the emulated kernels"
fail_on_reports

echo "[racecheck] passed in $((SECONDS - start)) s"
