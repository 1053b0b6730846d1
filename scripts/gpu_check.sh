#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: build, CUDA tests, compute-sanitizer, benchmarks.
#
#   bash scripts/gpu_check.sh [STEP[@SECONDS]...] [--deadline SECONDS] [--archive FILE] [--copy-to DIR]
#
# STEPs run in the order given; the default, `all`, runs them most important first, so that a
# run cut short by a time limit has done what matters (docs/gpu-session.md). STEP@SECONDS caps
# that step (stopped and marked TIMEOUT after SECONDS; a killed benchmark keeps the cases it
# wrote). --deadline SECONDS (or GPU_CHECK_DEADLINE) bounds the whole run: each step's cap is cut
# to the time left, and steps that would get under GPU_CHECK_MIN_STEP seconds (default 20) are
# marked "skipped (deadline)".
#   build        pip install --no-build-isolation --no-deps . (CUDA kernels forced on, for this
#                GPU's arch only: CI compiles sm_80/sm_90 already), then
#                `python -m labelkit_ext info --load`
#   test-cuda    the op families' CUDA tests (-m "ops and not slow" -k cuda), kernels required,
#                120 s per test at most (a hung kernel fails its test, not the whole step)
#   memcheck | racecheck | synccheck
#                compute-sanitizer with that tool over the ops' CUDA tests and their fuzz tests,
#                with torch's caching allocator off so memcheck sees every buffer's real bounds
#   sanitize     memcheck racecheck synccheck
#   bench:NAME   bench/bench_NAME.py --device cuda
#   bench        every bench/bench_*.py
#   test         the whole Python suite (the preflight made sure torch sees the GPU)
#   fuzz         the fuzz tests with a larger budget
#   all          build test-cuda memcheck bench:affine bench:entropy bench:pretext test fuzz
#                racecheck synccheck, then the other benchmarks
#   lease        the plan for a machine lent for 15 minutes (docs/gpu-session.md): build,
#                test-cuda@180, the open issues' benchmarks (entropy@110, affine@80,
#                pretext@60), memcheck@240, then the rest of `all` while time is left; with
#                --deadline 630 unless one is given
# Everything lands in bench/results/<gpu>/ (the benchmarks' CSV/markdown, as bench/common.py
# names the folder) and bench/results/<gpu>/gpu_check/ (logs, JUnit XML, summary.md). Steps run
# one after another even when one fails (a failed build stops the run); the exit status is 1 if
# any failed. --archive writes that folder as a .tar.gz after every step (fetch it at any time:
# it holds what has finished); --copy-to copies the folder to DIR at the end.
#
# Needs: python with torch (a CUDA build), numpy, pytest, hypothesis (pytest-timeout optional),
# a CUDA toolkit (CUDA_HOME, default /usr/local/cuda) with nvcc and compute-sanitizer. No network.
# Knobs: PYTHON, CUDA_HOME, TORCH_CUDA_ARCH_LIST (default: this GPU's arch),
# MAX_JOBS (default: all cores), GPU_CHECK_FUZZ_EXAMPLES (default 300), GPU_CHECK_SANITIZER_FUZZ_EXAMPLES (default 15),
# GPU_CHECK_BENCH_ARGS (extra arguments for every bench script run; their flags differ, see each
# one's --help, so prefer the per-script variable),
# GPU_CHECK_BENCH_ARGS_<NAME> (for bench_<name>.py only, e.g.
# GPU_CHECK_BENCH_ARGS_ENTROPY="--min-run-time 0.1", GPU_CHECK_BENCH_ARGS_SCORING="--runs 2"),
# GPU_CHECK_KERNEL_FILTER (compute-sanitizer --kernel-name; default kns=labelkit, "" = all),
# GPU_CHECK_STEP_TIMEOUT (seconds one step may run, then it is stopped and marked TIMEOUT;
# default 0 = no limit), GPU_CHECK_NO_COMPILE=1 (skip the torch.compile providers: on a GPU each
# shape compiles Triton kernels, minutes per benchmark).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
ALL=(build test-cuda memcheck bench:affine bench:entropy bench:pretext test fuzz racecheck synccheck
  bench:scoring bench:active)
# 15 minutes of device time, a minute or two of it the machine's start: about 10 minutes of
# steps. The CUDA tests first (nothing of ours has run on a GPU), then the figures the open
# issues wait for, then memcheck; the caps keep one slow step from eating the others.
LEASE=(build test-cuda@180 bench:entropy@110 bench:affine@80 bench:pretext@60 memcheck@240 test
  racecheck synccheck fuzz bench:scoring bench:active)
STEPS=()
# The GPU benchmarks: those with --device (bench_transforms.py times CPU DataLoader transforms).
takes_device() { grep -q -e '"--device"' -e add_common_args "$1"; }
COPY_TO=""
ARCHIVE=""
DEADLINE=${GPU_CHECK_DEADLINE:-0}
while [ $# -gt 0 ]; do
  case "${1%@*}" in
    build | test-cuda | test | fuzz | memcheck | racecheck | synccheck | bench:*) STEPS+=("$1") ;;
    sanitize) STEPS+=(memcheck racecheck synccheck) ;;
    bench) for f in bench/bench_*.py; do takes_device "$f" && f=${f#bench/bench_} && STEPS+=("bench:${f%.py}"); done ;;
    all) STEPS+=("${ALL[@]}") ;;
    lease) STEPS+=("${LEASE[@]}"); [ "$DEADLINE" -gt 0 ] || DEADLINE=630 ;;
    --deadline) DEADLINE=${2:?--deadline needs SECONDS}; shift ;;
    --copy-to) COPY_TO=${2:?--copy-to needs a folder}; shift ;;
    --archive) ARCHIVE=${2:?--archive needs a file name}; shift ;;
    -h | --help) sed -n '2,/^set /{/^#/p}' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (steps: build test-cuda test fuzz memcheck racecheck synccheck sanitize bench bench:NAME all lease, each with an optional @SECONDS)" >&2; exit 2 ;;
  esac
  shift
done
[ ${#STEPS[@]} -gt 0 ] || STEPS=("${ALL[@]}")
is_seconds() { [[ "$1" =~ ^[0-9]+$ ]] && [ "$1" -gt 0 ]; }
is_seconds "$DEADLINE" || [ "$DEADLINE" = 0 ] || { echo "gpu_check: --deadline needs a whole number of seconds, got '$DEADLINE'" >&2; exit 2; }
for step in "${STEPS[@]}"; do
  if [[ "$step" == *@* ]] && ! is_seconds "${step##*@}"; then
    echo "gpu_check: $step: the cap after @ must be a whole number of seconds" >&2; exit 2
  fi
  step=${step%@*}
  case "$step" in
    bench:*) [ -f "bench/bench_${step#bench:}.py" ] || { echo "gpu_check: no bench/bench_${step#bench:}.py" >&2; exit 2; }
      takes_device "bench/bench_${step#bench:}.py" || { echo "gpu_check: bench/bench_${step#bench:}.py has no --device (a CPU benchmark)" >&2; exit 2; } ;;
  esac
done

die() { echo "gpu_check: $*" >&2; exit 1; }

# ---- preflight -------------------------------------------------------------------------------------
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
[ -n "${CUDA_HOME:-}" ] && export PATH="$CUDA_HOME/bin:$PATH"
command -v nvidia-smi > /dev/null || die "nvidia-smi not found: is this a GPU machine?"
missing=$("$PY" - <<'PY'
import importlib.util
need = ["torch", "numpy", "pytest", "hypothesis"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
PY
)
[ -z "$missing" ] || die "missing Python packages: $missing (offline: pip download them elsewhere, then pip install --no-index --find-links <dir> ...)"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || die "torch $("$PY" -c 'import torch; print(torch.__version__)') sees no GPU"

# bench/results/<gpu>: the folder bench/common.py writes this GPU's benchmark results to.
GPU_SLUG=$("$PY" -P -c "
import sys, torch; sys.path.insert(0, 'bench'); import common
print(common.device_slug(torch.device('cuda')))")
RESULTS="bench/results/$GPU_SLUG"
LOGS="$RESULTS/gpu_check"
mkdir -p "$LOGS"
SUMMARY="$LOGS/summary.md"
{
  echo "# gpu_check on $GPU_SLUG"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda)"
  command -v nvcc > /dev/null && nvcc --version | tail -n 1
  echo '```'
  echo
  echo "| step | result | seconds | log |"
  echo "| --- | --- | --- | --- |"
} > "$SUMMARY"

FAILED=0
SKIPPED=0
BUILD_FAILED=0
# The cap of the step running now: its @SECONDS, else GPU_CHECK_STEP_TIMEOUT (0 = none).
STEP_CAP=0
# The exit status of the last run_step (0 also when the deadline skipped it).
STEP_RC=0

# run_step NAME LOGFILE COMMAND...: runs within STEP_CAP cut to what the deadline leaves, logs,
# records the outcome in summary.md and STEP_RC.
run_step() {
  local name=$1 log=$2
  shift 2
  local start=$SECONDS rc limit=$STEP_CAP
  STEP_RC=0
  if [ "$DEADLINE" -gt 0 ]; then
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt "${GPU_CHECK_MIN_STEP:-20}" ]; then
      echo "| $name | skipped (deadline) | 0 | |" >> "$SUMMARY"
      SKIPPED=$((SKIPPED + 1))
      echo "[gpu_check] $name: skipped, the deadline (${DEADLINE} s) leaves $left s"
      return
    fi
    if [ "$limit" -eq 0 ] || [ "$left" -lt "$limit" ]; then limit=$left; fi
  fi
  if [ "$limit" -gt 0 ]; then
    echo "[gpu_check] $name (log: $log, limit $limit s)"
    timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
  else
    echo "[gpu_check] $name (log: $log)"
    "$@" > "$log" 2>&1
  fi
  rc=$?
  STEP_RC=$rc
  local result=passed
  if [ $rc -ne 0 ]; then
    result="FAILED (exit $rc)"
    [ "$limit" -gt 0 ] && { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && result="TIMEOUT (${limit} s)"
    FAILED=1
    tail -n 30 "$log"
  fi
  echo "| $name | $result | $((SECONDS - start)) | $(basename "$log") |" >> "$SUMMARY"
  echo "[gpu_check] $name: $result in $((SECONDS - start)) s"
}

# The build is for this GPU's arch alone (each more arch costs ~30 s of nvcc per .cu file, and CI
# compiles the sm_80/sm_90 defaults on every change); exported for every step, as test_install.py
# checks the build against it.
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
export TORCH_CUDA_ARCH_LIST
# The kernels must load and every CUDA kernel must have been compiled.
export LABELKIT_EXT_REQUIRE_EXT=1 LABELKIT_EXT_REQUIRE_CUDA_BUILD=1
# -v: a line per test as it ends, so the log of a run stopped by its cap still says which tests
# passed and failed (pytest's summary and JUnit XML come only at the end).
PYTEST=("$PY" -P -m pytest python_tests -p no:cacheprovider -v -rfEsxX)
PER_TEST_LIMIT=()  # pytest-timeout is optional
"$PY" -c "import pytest_timeout" 2> /dev/null && PER_TEST_LIMIT=(--timeout 120)
# pytest -m ops selects the op families' tests; -k cuda their CUDA parametrisations, plus the
# fuzz tests, which draw the device themselves.
# The device-assert test is left out: its child process asserts on purpose, which the sanitizer
# (following children) would report.
SANITIZED_TESTS=(-m "ops and not slow" -k "(cuda or fuzz) and not asserts_on_bad_ids")

step_build() {
  export MAX_JOBS=${MAX_JOBS:-$(nproc)} FORCE_CUDA=1
  run_step "build (archs $TORCH_CUDA_ARCH_LIST)" "$LOGS/build.log" \
    "$PY" -m pip install --no-build-isolation --no-deps --force-reinstall --no-index -v .
  [ $STEP_RC -eq 0 ] && run_step "info" "$LOGS/info.txt" "$PY" -P -m labelkit_ext info --load
  BUILD_FAILED=$STEP_RC
}

step_test-cuda() {
  run_step "CUDA tests of the ops (-m 'ops and not slow' -k cuda)" "$LOGS/pytest-cuda.log" \
    "${PYTEST[@]}" -m "ops and not slow" -k cuda "${PER_TEST_LIMIT[@]}" --junitxml="$LOGS/pytest-cuda.xml"
}

step_test() {
  run_step "tests (whole suite, kernels required)" "$LOGS/pytest.log" \
    "${PYTEST[@]}" --junitxml="$LOGS/pytest.xml"
}

step_fuzz() {
  run_step "fuzz (-m fuzz, ${GPU_CHECK_FUZZ_EXAMPLES:-300} examples each)" "$LOGS/fuzz.log" \
    env LABELKIT_FUZZ_EXAMPLES="${GPU_CHECK_FUZZ_EXAMPLES:-300}" "${PYTEST[@]}" -m fuzz \
    --junitxml="$LOGS/fuzz.xml"
}

# sanitize TOOL: compute-sanitizer --tool TOOL over the ops' CUDA and fuzz tests.
sanitize() {
  local tool=$1 filter=()
  # Instrument only our kernels (all live in namespace labelkit) where this compute-sanitizer
  # can filter: torch's own kernels are not what we check, and the run is much faster.
  # GPU_CHECK_KERNEL_FILTER="" checks every kernel.
  local kf=${GPU_CHECK_KERNEL_FILTER-kns=labelkit}
  if [ -n "$kf" ] && compute-sanitizer --help 2>&1 | grep -q -- "--kernel-name"; then
    filter=(--kernel-name "$kf")
  fi
  # No caching allocator: memcheck then knows each tensor's real extent. Fewer fuzz examples:
  # every kernel runs instrumented.
  run_step "compute-sanitizer $tool" "$LOGS/sanitizer-$tool.log" \
    env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    LABELKIT_FUZZ_EXAMPLES="${GPU_CHECK_SANITIZER_FUZZ_EXAMPLES:-15}" \
    compute-sanitizer --tool "$tool" --error-exitcode 1 --print-limit 50 "${filter[@]}" \
    "${PYTEST[@]}" "${SANITIZED_TESTS[@]}"
}

# bench NAME: bench/bench_NAME.py on the GPU (with --no-compile under GPU_CHECK_NO_COMPILE=1,
# where the script has that flag), plus GPU_CHECK_BENCH_ARGS and GPU_CHECK_BENCH_ARGS_<NAME>.
bench() {
  local extra=() own_var
  if [ "${GPU_CHECK_NO_COMPILE:-0}" = 1 ] && grep -q -e '"--no-compile"' -e add_common_args "bench/bench_$1.py"; then
    extra=(--no-compile)
  fi
  own_var="GPU_CHECK_BENCH_ARGS_$(echo "$1" | tr '[:lower:]' '[:upper:]')"
  # shellcheck disable=SC2206  # the two variables are lists of arguments
  extra+=(${GPU_CHECK_BENCH_ARGS:-} ${!own_var:-})
  run_step "bench_$1.py${extra[*]:+ ${extra[*]}}" "$LOGS/bench_$1.log" \
    "$PY" "bench/bench_$1.py" --device cuda --out bench/results "${extra[@]}"
}

# The results folder as FILE (.tar.gz), replaced whole so that a reader never sees half of it.
write_archive() {
  [ -n "$ARCHIVE" ] || return 0
  tar -czf "$ARCHIVE.partial" -C bench/results "$GPU_SLUG" && mv "$ARCHIVE.partial" "$ARCHIVE"
}

for step in "${STEPS[@]}"; do
  STEP_CAP=${GPU_CHECK_STEP_TIMEOUT:-0}
  if [[ "$step" == *@* ]]; then STEP_CAP=${step##*@}; step=${step%@*}; fi
  case "$step" in
    memcheck | racecheck | synccheck) sanitize "$step" ;;
    bench:*) bench "${step#bench:}" ;;
    *) "step_$step" ;;
  esac
  write_archive
  if [ "$BUILD_FAILED" -ne 0 ]; then
    # Every later step needs the kernels: stop, so the lease's minutes go to fixing the build.
    echo "| (later steps) | not run: the build failed | 0 | build.log |" >> "$SUMMARY"
    echo "[gpu_check] the build failed: later steps not run"
    break
  fi
done

echo >> "$SUMMARY"
echo "Overall: $([ $FAILED -eq 0 ] && echo passed || echo FAILED)$([ $SKIPPED -eq 0 ] || echo ", $SKIPPED step(s) skipped by the deadline")" >> "$SUMMARY"
write_archive
cat "$SUMMARY"
if [ -n "$COPY_TO" ]; then
  mkdir -p "$COPY_TO" && cp -r "$RESULTS" "$COPY_TO"/ && echo "[gpu_check] copied $RESULTS to $COPY_TO/"
fi
exit $FAILED
