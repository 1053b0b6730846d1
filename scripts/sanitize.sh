#!/usr/bin/env bash
# `make sanitize`: the CPU kernels under AddressSanitizer + UndefinedBehaviorSanitizer.
#
# 1. CMake builds csrc/ (every csrc/ops/cpu/*.cpp) and one test binary per csrc/tests/test_*.cpp
#    with -DLABELKIT_SANITIZE=ON into its own folder (default cmake-build-sanitize/).
# 2. ctest runs the C++ tests (the binaries link the sanitizer runtimes themselves).
#    The same build has -DLABELKIT_CUDA_EMULATION=ON: liblabelkit_cuemu.so, the CUDA kernels
#    translated for the CPU emulator (csrc/tests/cuemu), sanitized too; ctest runs its own tests.
# 3. pytest runs the ops' Python tests (marker `ops`: python_tests/test_<family>*.py for every
#    labelkit_ext/ops/<family>.py; docs/testing.md) with LABELKIT_EXT_LIBRARY pointing at the
#    sanitized liblabelkit_ops.so, loaded by torch.ops.load_library instead of _C, and libasan
#    preloaded into Python (the runtime must come first; torch itself is not instrumented, but
#    every tensor buffer comes from malloc, which ASan intercepts, so a kernel that reads or
#    writes past a tensor hits a redzone).
# 4. pytest runs the ops' CUDA and fuzz tests (`-k "cuda or fuzz"`; the fuzz tests draw the device)
#    under scripts/fakecuda with FAKECUDA_KERNELS set:
#    every labelkit op on a "cuda" tensor runs our CUDA kernel in the sanitized emulator, and the
#    device-side assert tests' child processes too (FAKECUDA_SUB), blocks and their threads in a
#    seeded random order (CUEMU_ORDER), and every op call again with both in reverse order, which
#    must give the same bits (FAKECUDA_ORDER_CHECK: a race or timing-dependent result fails). The
#    installed _C (with its CUDA registrations) is loaded, so the wrappers take their CUDA paths.
# Every report is fatal (halt_on_error, -fno-sanitize-recover); leak checking is off (CPython
# and torch keep allocations alive until exit by design).
#
#   PYTHON (python3)  LABELKIT_SANITIZE_BUILD (cmake-build-sanitize)  MAX_JOBS (2)
#   extra arguments go to pytest, e.g. `scripts/sanitize.sh -k entropy_gate -x`
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD=${LABELKIT_SANITIZE_BUILD:-cmake-build-sanitize}
LIB="$PWD/$BUILD/liblabelkit_ops.so"
# Reports go to files as well as stderr: pytest captures stderr, and an abort loses it.
LOGS="$PWD/$BUILD/sanitizer-logs"
TAG=sanitize
# shellcheck source=scripts/emulated_checks.sh
source scripts/emulated_checks.sh

echo "[sanitize] building csrc/ and the emulated CUDA kernels with ASan + UBSan into $BUILD/ (log: $BUILD.log)"
build_with_cmake "$BUILD" "-DLABELKIT_SANITIZE=ON -DLABELKIT_CUDA_EMULATION=ON"
preload=$(sanitizer_preload "$LIB" libasan -DLABELKIT_SANITIZE=ON)

fresh_dir "$LOGS"
# allocator_may_return_null: an impossible allocation is torch's usual out-of-memory error, as
# without the sanitizer, not an ASan abort.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:allocator_may_return_null=1:halt_on_error=1:abort_on_error=1:check_initialization_order=1:log_path=$LOGS/asan}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1:log_path=$LOGS/ubsan}

echo "[sanitize] C++ tests (ctest)"
ctest --test-dir "$BUILD" --output-on-failure || report_and_fail "C++ tests"

echo "[sanitize] Python tests of the ops (-m ops) against $LIB"
# REQUIRE_EXT: fail rather than silently test the references; the sanitized library has CPU
# kernels only, so the CUDA-build requirement of CI's main pass does not apply here.
# Inductor's compile workers would inherit the preload: compile in-process instead.
LD_PRELOAD="$preload${LD_PRELOAD:+:$LD_PRELOAD}" \
  LABELKIT_EXT_LIBRARY="$LIB" LABELKIT_EXT_REQUIRE_EXT=1 LABELKIT_EXT_REQUIRE_CUDA_BUILD=0 \
  TORCHINDUCTOR_COMPILE_THREADS=1 \
  "$PY" -P -m pytest python_tests -m "ops and not slow" -q -p no:cacheprovider "$@" \
  || report_and_fail "Python tests of the ops"

echo "[sanitize] CUDA tests of the ops, CUDA kernels emulated ($BUILD/liblabelkit_cuemu.so)"
FAKECUDA_ORDER_CHECK=1 emulated_cuda_tests "$preload" "$PWD/$BUILD/liblabelkit_cuemu.so" "$@" \
  || report_and_fail "CUDA tests of the ops on the emulated kernels"
fail_on_reports

echo "[sanitize] passed in $((SECONDS - start)) s"
