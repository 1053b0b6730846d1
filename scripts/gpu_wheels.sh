#!/usr/bin/env bash
# Downloads, into .whl/ (git-ignored), the wheels a GPU machine without network needs beyond its
# image for scripts/gpu_check.sh: the benchmarks' extras (kornia for bench_affine.py). Run it
# where pip can reach an index; gpu_background.sh start installs .whl/*.whl on the GPU machine.
#
#   bash scripts/gpu_wheels.sh [PYTHON_VERSION]    # default 3.12 (the GPU image's Python)
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${1:-3.12}
mkdir -p .whl
# kornia's own need kornia_rs is compiled; torch and numpy are in every GPU image.
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "kornia==0.9.0" "kornia_rs==0.2.0"
ls -l .whl
