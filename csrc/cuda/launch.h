// Host-side entry points of the CUDA kernels. Included by csrc/api/cuda_ops.cpp
// (which sees torch) and by the .cu files (which never do): plain params only.
#pragma once

#include <cuda_runtime_api.h>

#include "nsa/params.h"

namespace nsa::cuda {

enum class DType : int { kFp16 = 0, kBf16 = 1 };

// Attention forward for one branch (params.branch picks the KV schedule):
// compressed, selected or window. One explicit instantiation per (Dk, Dv, dtype)
// in csrc/cuda/instantiations/attn_fwd_hdim*.cu.
template <int kDk, int kDv, DType kDType>
void run_attn_fwd(const AttnFwdParams& params, cudaStream_t stream);

// Block selection (scores from q.k_cmp and lse_cmp, top-n per kv head).
// Instantiations in csrc/cuda/instantiations/select_hdim*.cu.
template <int kDk, DType kDType>
void run_select_blocks(const SelectParams& params, cudaStream_t stream);

// Mean pooling of blocks (CompressParams in nsa/params.h; fp16/bf16).
void run_mean_compress(const CompressParams& params, DType dtype, cudaStream_t stream);

// Checks a launch (cudaGetLastError) and throws std::runtime_error with the
// kernel's name on failure; the api file turns it into a torch error.
void check_launch(const char* what);

}  // namespace nsa::cuda
