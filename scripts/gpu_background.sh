#!/usr/bin/env bash
# scripts/gpu_check.sh in the background, for GPU machines lent in calls shorter than the whole
# check (docs/gpu-session.md): one call starts it, later calls wait on it and fetch its results.
#
#   bash scripts/gpu_background.sh start [STEP...]      # default: gpu_check's `lease` (15 min)
#   bash scripts/gpu_background.sh wait SECONDS [DIR]   # until done or SECONDS pass
#
# start: installs the wheels in .whl/ (if any: the benchmarks' extras, e.g. kornia, which such a
# machine cannot download) into $STATE/site, then runs gpu_check.sh with --archive in a new
# process session (it outlives the call) and returns at once.
# wait: prints the summary as it grows; when the check ends or SECONDS pass, copies the archive
# (bench/results/<gpu>/ as .tar.gz, everything finished so far) and the console log to DIR.
# Exit status of wait: 0 finished and passed, 1 finished with a failed step, 3 still running.
# Knobs: GPU_BACKGROUND_STATE (default /tmp/labelkit_gpu_check), and gpu_check.sh's own, with
# defaults for a short lease here: GPU_CHECK_STEP_TIMEOUT 600 (a step without @SECONDS),
# GPU_CHECK_NO_COMPILE 1 (the GPU targets compare with eager and kornia, not compile),
# GPU_CHECK_BENCH_ARGS_{ENTROPY,AFFINE,PRETEXT,ACTIVE} "--min-run-time 0.1" (GPU calls take
# milliseconds: 0.1 s of timed calls per figure is plenty; bench_scoring.py has --runs instead),
# entropy's with "--c 100,1000,32000" before it (the sizes where the HBM target means
# something; C = 10 is 2.6 MB of logits).
set -uo pipefail
cd "$(dirname "$0")/.."

STATE=${GPU_BACKGROUND_STATE:-/tmp/labelkit_gpu_check}
ARCHIVE="$STATE/gpu_check.tar.gz"
CONSOLE="$STATE/console.log"

running() { [ -f "$STATE/pid" ] && kill -0 "$(cat "$STATE/pid")" 2> /dev/null; }

start() {
  if running; then
    echo "gpu_background: already running (pid $(cat "$STATE/pid"))" >&2
    exit 2
  fi
  rm -rf "$STATE" && mkdir -p "$STATE"
  if compgen -G ".whl/*.whl" > /dev/null; then
    "${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target "$STATE/site" .whl/*.whl || exit 1
    export PYTHONPATH="$STATE/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  export GPU_CHECK_STEP_TIMEOUT=${GPU_CHECK_STEP_TIMEOUT:-600} GPU_CHECK_NO_COMPILE=${GPU_CHECK_NO_COMPILE:-1}
  # --min-run-time per script: bench_scoring.py times --runs calls instead (and refuses the flag)
  export GPU_CHECK_BENCH_ARGS_ENTROPY=${GPU_CHECK_BENCH_ARGS_ENTROPY---c 100,1000,32000 --min-run-time 0.1}
  export GPU_CHECK_BENCH_ARGS_AFFINE=${GPU_CHECK_BENCH_ARGS_AFFINE---min-run-time 0.1}
  export GPU_CHECK_BENCH_ARGS_PRETEXT=${GPU_CHECK_BENCH_ARGS_PRETEXT---min-run-time 0.1}
  export GPU_CHECK_BENCH_ARGS_ACTIVE=${GPU_CHECK_BENCH_ARGS_ACTIVE---min-run-time 0.1}
  [ $# -gt 0 ] || set -- lease
  setsid nohup bash -c 'bash scripts/gpu_check.sh "$@"; echo $? > "'"$STATE"'/rc"' gpu_check \
    "$@" --archive "$ARCHIVE" > "$CONSOLE" 2>&1 < /dev/null &
  echo $! > "$STATE/pid"
  echo "gpu_background: gpu_check.sh $* started (pid $!), console $CONSOLE"
}

wait_for() {
  local seconds=${1:?wait needs SECONDS} dir=${2:-}
  local end=$((SECONDS + seconds))
  [ -f "$STATE/pid" ] || { echo "gpu_background: nothing started (run start first)" >&2; exit 2; }
  while running && [ $SECONDS -lt $end ]; do sleep 2; done
  grep '^\[gpu_check\]' "$CONSOLE" | tail -n 40
  if [ -n "$dir" ]; then
    mkdir -p "$dir"
    [ -f "$ARCHIVE" ] && cp "$ARCHIVE" "$dir/"
    cp "$CONSOLE" "$dir/"
  fi
  if running; then
    echo "gpu_background: still running after ${seconds} s"
    exit 3
  fi
  echo "gpu_background: finished, exit status $(cat "$STATE/rc" 2> /dev/null || echo '?')"
  [ "$(cat "$STATE/rc" 2> /dev/null)" = 0 ]
}

case "${1:-}" in
  start) shift; start "$@" ;;
  wait) shift; wait_for "$@" ;;
  *) sed -n '2,/^set /{/^#/p}' "$0"; exit 2 ;;
esac
