# Sourced (not run) by scripts/sanitize.sh and scripts/racecheck.sh, from the repository root:
# the steps both take around a sanitizer build of our kernels. The caller sets TAG (its log
# prefix) and LOGS (the folder the sanitizer writes its reports to) before calling these.

PY=${PYTHON:-python3}
JOBS=${MAX_JOBS:-2}
start=$SECONDS  # "passed in N s"

# build_with_cmake BUILD "CONFIGURE OPTIONS" ["BUILD OPTIONS"]: a Debug CMake build of csrc/ into
# BUILD (output in BUILD.log); on failure its tail is shown and the script stops.
build_with_cmake() {
  local build=$1 configure=$2 targets=${3:-} prefix
  prefix=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')
  # shellcheck disable=SC2086  # the option strings are word lists
  if ! { cmake -S . -B "$build" $configure -DCMAKE_BUILD_TYPE=Debug -DCMAKE_PREFIX_PATH="$prefix" \
           && cmake --build "$build" -j "$JOBS" $targets; } > "$build.log" 2>&1; then
    tail -n 40 "$build.log"
    echo "[$TAG] build failed (full log: $build.log)" >&2
    exit 1
  fi
}

# sanitizer_preload LIB NAME OPTION: what LD_PRELOAD must hold for Python to load LIB, built with
# OPTION: the sanitizer runtime NAME (libasan, libtsan) that LIB links, and libstdc++ beside it
# (ASan and TSan intercept __cxa_throw and must find the real one when they start, or the first
# C++ exception of a library loaded later aborts). Stops when LIB does not link NAME.
sanitizer_preload() {
  local runtime
  runtime=$(linked_library "$1" "$2")
  if [ -z "$runtime" ] || [ ! -e "$runtime" ]; then
    echo "[$TAG] $1 does not link $2; was it built with $3?" >&2
    exit 1
  fi
  echo "$runtime:$(linked_library "$1" libstdc++)"
}

linked_library() {
  ldd "$1" | awk -v name="$2" 'index($1, name) == 1 {print $3; exit}'
}

# fresh_dir DIR: an empty DIR.
fresh_dir() {
  rm -rf "$1" && mkdir -p "$1"
}

# report_and_fail WHAT: show every report in LOGS, then stop with WHAT as the reason.
report_and_fail() {
  for f in "$LOGS"/*; do [ -e "$f" ] && { echo "==== $f"; cat "$f"; }; done
  echo "[$TAG] FAILED: $1 (reports, if any, above and in $LOGS/)" >&2
  exit 1
}

# fail_on_reports: a report that did not abort (it should always abort) still fails the run.
fail_on_reports() {
  [ -z "$(ls -A "$LOGS")" ] || report_and_fail "sanitizer reports were written"
}

# emulated_cuda_tests PRELOAD LIB [PYTEST ARGS]: the ops' CUDA and fuzz tests (the fuzz tests draw
# the device) under scripts/fakecuda, every labelkit op on a "cuda" tensor running our CUDA kernel
# in the emulator library LIB (the device-side assert tests' child processes too), blocks and
# their threads in a seeded random order unless CUEMU_ORDER says otherwise. Four kinds of test
# need a real GPU stack and are left out: opcheck and compile (fake tensors / Inductor on the
# emulated device), autocast (its CUDA dispatch key) and the mixed-device refusal of the
# dispatcher.
# A `-k EXPR` among the arguments narrows that selection (it does not replace it, as a second -k
# would in pytest). Further environment (FAKECUDA_ORDER_CHECK, OMP_NUM_THREADS) comes from the
# caller's prefix.
EMULATED_CUDA_TESTS="(cuda or fuzz) and not (opcheck or autocast or compile or refuse_mixed)"
emulated_cuda_tests() {
  local preload=$1 lib=$2 select=$EMULATED_CUDA_TESTS
  shift 2
  local args=()
  while [ $# -gt 0 ]; do
    case $1 in
      -k) select="($select) and (${2:?-k needs an expression})"; shift 2 ;;
      -k*) select="($select) and (${1#-k})"; shift ;;
      *) args+=("$1"); shift ;;
    esac
  done
  LD_PRELOAD="$preload${LD_PRELOAD:+:$LD_PRELOAD}" \
    FAKECUDA_KERNELS="$lib" FAKECUDA_SUB=1 PYTHONPATH="$PWD/scripts/fakecuda${PYTHONPATH:+:$PYTHONPATH}" \
    CUEMU_ORDER=${CUEMU_ORDER:-random} LABELKIT_EXT_REQUIRE_EXT=1 TORCHINDUCTOR_COMPILE_THREADS=1 \
    "$PY" -P -m pytest python_tests -p fakecuda -m "ops and not slow" -q -p no:cacheprovider \
    -k "$select" "${args[@]}"
}
