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
"$PY" -m pip install --root-user-action=ignore --quiet "numpy>=1.24" "scikit-learn>=1.3" "matplotlib>=3.7" "tqdm>=4.60" \
  "pytest>=8" pytest-timeout "hypothesis>=6" ninja cmake

# The nvcc on PATH may be a wrapper script, which misleads torch's guess of the toolkit.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export MAX_JOBS=${MAX_JOBS:-2}
echo "[install] building labelkit_ext (MAX_JOBS=$MAX_JOBS, CUDA_HOME=${CUDA_HOME:-unset})"
"$PY" -m pip install --root-user-action=ignore --no-build-isolation --no-deps --quiet -e .
"$PY" -c "import labelkit_ext; print(labelkit_ext.info())"
