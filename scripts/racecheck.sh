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

PY=${PYTHON:-python3}
BUILD=${LABELKIT_RACECHECK_BUILD:-cmake-build-racecheck}
JOBS=${MAX_JOBS:-2}
LIB="$PWD/$BUILD/liblabelkit_cuemu.so"
start=$SECONDS

echo "[racecheck] building the emulated CUDA kernels with ThreadSanitizer into $BUILD/ (log: $BUILD.log)"
prefix=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')
if ! { cmake -S . -B "$BUILD" -DLABELKIT_CUDA_EMULATION=ON -DLABELKIT_RACECHECK=ON -DCMAKE_BUILD_TYPE=Debug \
         -DCMAKE_PREFIX_PATH="$prefix" && cmake --build "$BUILD" -j "$JOBS" --target labelkit_cuemu; } > "$BUILD.log" 2>&1; then
  tail -n 40 "$BUILD.log"
  echo "[racecheck] build failed (full log: $BUILD.log)" >&2
  exit 1
fi

libtsan=$(ldd "$LIB" | awk '/libtsan/ {print $3; exit}')
libstdcxx=$(ldd "$LIB" | awk '/libstdc\+\+/ {print $3; exit}')
if [ -z "$libtsan" ] || [ ! -e "$libtsan" ]; then
  echo "[racecheck] $LIB does not link libtsan; was it built with -DLABELKIT_RACECHECK=ON?" >&2
  exit 1
fi

LOGS="$PWD/$BUILD/tsan-logs"
rm -rf "$LOGS" && mkdir -p "$LOGS"
export TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=1:abort_on_error=1:report_signal_unsafe=0:log_path=$LOGS/tsan}
report_and_fail() {
  for f in "$LOGS"/*; do [ -e "$f" ] && { echo "==== $f"; cat "$f"; }; done
  echo "[racecheck] FAILED: $1 (reports, if any, above and in $LOGS/)" >&2
  exit 1
}

# The detector must see a race where there is one, and none where a barrier orders the accesses.
selftest() {
  LD_PRELOAD="$libtsan:$libstdcxx${LD_PRELOAD:+:$LD_PRELOAD}" OMP_NUM_THREADS=1 \
    TSAN_OPTIONS="halt_on_error=1:exitcode=66:report_signal_unsafe=0:log_path=$1" \
    "$PY" -P -c "import torch; torch.ops.load_library('$LIB'); print(torch.ops.cuemu_racecheck.read_neighbours($2).sum().item())"
}
echo "[racecheck] self-check: a kernel with a race, then the same kernel with its barrier"
CHECK="$PWD/$BUILD/selftest-logs"
rm -rf "$CHECK" && mkdir -p "$CHECK"
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
# As in scripts/sanitize.sh: opcheck, compile, autocast and the mixed-device refusal need a real
# GPU stack.
LD_PRELOAD="$libtsan:$libstdcxx${LD_PRELOAD:+:$LD_PRELOAD}" \
  FAKECUDA_KERNELS="$LIB" FAKECUDA_SUB=1 PYTHONPATH="$PWD/scripts/fakecuda${PYTHONPATH:+:$PYTHONPATH}" \
  OMP_NUM_THREADS=1 CUEMU_ORDER=${CUEMU_ORDER:-random} \
  LABELKIT_EXT_REQUIRE_EXT=1 TORCHINDUCTOR_COMPILE_THREADS=1 \
  "$PY" -P -m pytest python_tests -p fakecuda -m "ops and not slow" -q -p no:cacheprovider \
  -k "(cuda or fuzz) and not (opcheck or autocast or compile or refuse_mixed)" "$@" \
  || report_and_fail "CUDA tests of the ops on the emulated kernels"
[ -z "$(ls -A "$LOGS")" ] || report_and_fail "ThreadSanitizer reports were written"

echo "[racecheck] passed in $((SECONDS - start)) s"
