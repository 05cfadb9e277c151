# Sourced by bootstrap.sh and .ci/run: exports CUDA_HOME when unset and a CUDA
# toolkit is installed. `nvcc` on PATH may be a wrapper script, from which torch
# would guess a wrong CUDA_HOME, so look for the toolkit itself.
if [ -z "${CUDA_HOME:-}" ]; then
  for d in /usr/local/cuda /usr/local/cuda-13.0 /usr/local/cuda-1[0-9]*; do
    if [ -x "$d/bin/nvcc" ] && [ -f "$d/include/cuda_runtime.h" ]; then export CUDA_HOME=$d; break; fi
  done
fi
