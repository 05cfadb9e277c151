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

// Decode (KV cache), csrc/cuda/decode*.cuh; instantiations in
// csrc/cuda/instantiations/decode_hdim*.cu. The caller (cuda_ops.cpp) allocates the
// fp32 workspaces with the torch allocator, sized by decode_plan.h:
//   attention: o_part [num_splits, B, S, Hq, Dv], lse_part [num_splits, B, S, Hq]
//   selection: scores [B, Hkv, S, select_score_width(params)]
template <int kDk, int kDv, DType kDType>
void run_attn_decode(const AttnFwdParams& params, int num_splits, float* o_part,
                     float* lse_part, cudaStream_t stream);
template <int kDk, DType kDType>
void run_select_blocks_decode(const SelectParams& params, float* scores, cudaStream_t stream);
// Compresses the blocks that complete as the caches grow (CompressParams::cache_seqlens).
void run_update_cmp_cache(const CompressParams& params, DType dtype, cudaStream_t stream);

// Mean pooling of blocks (CompressParams in nsa/params.h; fp16/bf16).
void run_mean_compress(const CompressParams& params, DType dtype, cudaStream_t stream);

// Checks a launch (cudaGetLastError) and throws std::runtime_error with the
// kernel's name on failure; the api file turns it into a torch error.
void check_launch(const char* what);

}  // namespace nsa::cuda
