#!/usr/bin/env bash
# Downloads the wheels that bench/gpu_check.sh installs on a GPU machine without
# network (Python 3.12, x86-64): CUTLASS headers for the build, fla-core for the
# parallel_nsa comparison, the test dependencies. Run from the repo root; bench/wheels/ is gitignored and
# travels as a carried path.
set -euo pipefail
mkdir -p bench/wheels
PY=${PYTHON:-python3}
# hypothesis (+ its deps) and einops: the test conftest and fla import them.
for pkg in nvidia-cutlass fla-core einops hypothesis attrs sortedcontainers; do
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d bench/wheels "$pkg" || echo "make_wheels: could not download $pkg" >&2
done
ls -la bench/wheels
