#!/usr/bin/env bash
# Sets up a development checkout: a virtual environment in .venv (or $NSA_VENV)
# with the build and test dependencies, and nsa_cuda built in place (editable),
# CUDA kernels included when a CUDA toolkit is found.
#   bash scripts/bootstrap.sh                 # build what this machine can
#   NSA_BUILD_CUDA=0 bash scripts/bootstrap.sh   # CPU kernels only (about a minute)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${NSA_VENV:-.venv}
PYTHON=${PYTHON:-python3}

source scripts/find_cuda_home.sh
echo "== CUDA_HOME=${CUDA_HOME:-<none: CPU-only build>} NSA_BUILD_CUDA=${NSA_BUILD_CUDA:-auto}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
echo "== installing dependencies (requirements-dev.txt)"
"$VENV/bin/pip" install -q --upgrade pip >/dev/null
# (this machine's pip config lists local index folders that may be absent: drop that noise)
"$VENV/bin/pip" install -q -r requirements-dev.txt 2> >(grep -v "is ignored: it is neither" >&2)

echo "== building nsa_cuda in place (MAX_JOBS=${MAX_JOBS:=$(nproc)}); the CUDA kernels take a while on few cores"
export MAX_JOBS
start=$(date +%s)
# -v: the compiler output goes to build.log (CI checks it for serialized wgmma).
"$VENV/bin/pip" install -v --no-build-isolation --no-deps -e . 2>&1 | tee build.log | \
  grep -E --line-buffered "^ *\[[0-9]+/[0-9]+\]|error|Successfully" | sed -E 's/ -.*//' || true
if ! "$VENV/bin/python" -c "import nsa_cuda" 2>/dev/null; then
  echo "build failed: see build.log" >&2
  exit 1
fi
echo "== built in $(( $(date +%s) - start )) s: $("$VENV/bin/python" -c 'import nsa_cuda, torch; print("nsa_cuda", nsa_cuda.__version__, "| CUDA kernels:", torch._C._dispatch_has_kernel_for_dispatch_key("nsa_cuda::window_attn_fwd", "CUDA"))')"
