#!/usr/bin/env bash
# Installs what labelkit_ext needs on a fresh machine and builds the extension against it.
# Idempotent: a second run only rebuilds what changed (ninja reuses build/).
#   LABELKIT_TORCH_SPEC / LABELKIT_TORCHVISION_SPEC override the pinned versions.
#   Build knobs (FORCE_CUDA, FORCE_ONLY_CPU, LABELKIT_EXT_NO_EXT, DEBUG, MAX_JOBS,
#   TORCH_CUDA_ARCH_LIST, CUDA_HOME) pass through to setup.py; see docs/installation.md.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
TORCH_SPEC=${LABELKIT_TORCH_SPEC:-torch==2.14.1}
TORCHVISION_SPEC=${LABELKIT_TORCHVISION_SPEC:-torchvision==0.29.1}

have() { "$PY" - "$@" <<'PY' 2>/dev/null
import importlib.metadata as md, sys
for spec in sys.argv[1:]:
    name, _, want = spec.partition("==")
    if md.version(name).split("+")[0] != want:
        sys.exit(1)
PY
}

if ! have "$TORCH_SPEC" "$TORCHVISION_SPEC"; then
  echo "[install] $TORCH_SPEC $TORCHVISION_SPEC"
  "$PY" -m pip install --root-user-action=ignore --quiet "$TORCH_SPEC" "$TORCHVISION_SPEC"
fi
echo "[install] runtime and test dependencies"
"$PY" -m pip install --root-user-action=ignore --quiet "numpy>=1.24" "scikit-learn>=1.3" "scipy>=1.10" "matplotlib>=3.7" "tqdm>=4.60" \
  "pytest>=8" pytest-timeout "hypothesis>=6" ninja cmake "ruff==0.17.6"  # ruff pinned: its style moves

# The nvcc on PATH may be a wrapper script, which misleads torch's guess of the toolkit.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export MAX_JOBS=${MAX_JOBS:-2}
# Rebuild only when needed: the editable build recompiles everything (about 2 minutes here).
# LABELKIT_FORCE_REBUILD=1 (or `make clean`) forces it, e.g. after changing a build knob.
# Sources are compared with the start of the last successful build, not the .so's time: a file
# saved while a build ran is newer than that start, though possibly older than the .so.
BUILD_STAMP=build/.labelkit_ext_build_started
needs_build() {
  [ "${LABELKIT_FORCE_REBUILD:-0}" = 1 ] && return 0
  local so
  so=$(ls labelkit_ext/_C*.so 2>/dev/null | head -n 1)
  [ -n "$so" ] && [ -f "$BUILD_STAMP" ] || return 0
  [ -z "$(find csrc setup.py pyproject.toml -newer "$BUILD_STAMP" -print -quit)" ] || return 0
  # Installed from this tree, and the extension loads.
  LABELKIT_EXT_NO_EXT=0 "$PY" -P -c "
import os, sys, labelkit_ext
here = os.path.realpath('labelkit_ext')
sys.exit(0 if os.path.realpath(os.path.dirname(labelkit_ext.__file__)) == here and labelkit_ext.HAS_OPS else 1)
" 2>/dev/null && return 1
  return 0
}

if [ "${LABELKIT_EXT_NO_EXT:-0}" = 1 ] || needs_build; then
  echo "[install] building labelkit_ext (MAX_JOBS=$MAX_JOBS, CUDA_HOME=${CUDA_HOME:-unset})"
  mkdir -p build && touch "$BUILD_STAMP.next"
  "$PY" -m pip install --root-user-action=ignore --no-build-isolation --no-deps --quiet -e .
  [ "${LABELKIT_EXT_NO_EXT:-0}" = 1 ] || mv "$BUILD_STAMP.next" "$BUILD_STAMP"
else
  echo "[install] labelkit_ext is installed from this tree and up to date (LABELKIT_FORCE_REBUILD=1 to rebuild)"
fi
"$PY" -c "import labelkit_ext; print(labelkit_ext.info())"
