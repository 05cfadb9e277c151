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

// The Hopper forward of the compressed and window branches (attn_fwd_sm90.cuh,
// wgmma). Instantiations in csrc/cuda/instantiations/attn_fwd_sm90_hdim*.cu, built
// when the arch list holds sm_90a (NSA_SM90A_BUILT). run_attn_fwd calls it when
// use_sm90_kernels says so.
template <int kDk, int kDv, DType kDType>
void run_attn_fwd_sm90(const AttnFwdParams& params, cudaStream_t stream);

// Whether run_attn_fwd and run_attn_bwd take the wgmma kernels where they have one
// (arch_dispatch.cu): on a compute capability 9.0 device when this build has sm_90a
// code. NSA_MAINLOOP (read at each call) overrides: "sm80" keeps the mma.sync
// kernels everywhere, "sm90" asks for wgmma and throws where it cannot run; "auto"
// or unset is the rule above. The wgmma kernels: the compressed and window forward,
// their dq, the dk/dv of all three branches, and the block selection (for G a power
// of two). The selected forward and dq and the decode run mma.sync.
bool use_sm90_kernels();

// K/V pipeline stages of the selected branch's forward (attn_fwd.cuh), given the
// two-stage kernel's shared memory for this call: 2 where two CTAs of it fit on an
// SM of the current device (the occupancy its registers allow anyway), else 1.
// NSA_SLC_FWD_STAGES (read at each call: auto, 1 or 2) overrides, so that a device
// run can time both on the same inputs (bench/suite.py's branch.selected_1stage);
// a forced 2 that does not fit raises at the launch.
int selected_fwd_stages(int two_stage_smem);

// The Hopper backward kernels (attn_bwd_sm90.cuh), instantiated next to
// run_attn_fwd_sm90: dq of the compressed and window branches, dk/dv of
// all three.
struct AttnBwdWorkspace;
template <int kDk, int kDv, DType kDType>
void run_attn_bwd_dq_sm90(const AttnBwdParams& params, const AttnBwdWorkspace& ws, cudaStream_t stream);
template <int kDk, int kDv, DType kDType>
void run_attn_bwd_dkdv_sm90(const AttnBwdParams& params, const AttnBwdWorkspace& ws, cudaStream_t stream);

// Block selection (scores from q.k_cmp and lse_cmp, top-n per kv head).
// Instantiations in csrc/cuda/instantiations/select_hdim*.cu.
template <int kDk, DType kDType>
void run_select_blocks(const SelectParams& params, cudaStream_t stream);

// The Hopper selection (select_blocks_sm90.cuh, wgmma), which run_select_blocks
// takes when use_sm90_kernels says so and the group suits it (G up to 128, the
// scores of 128 / G tokens within the device's shared memory); returns
// false, having launched nothing, otherwise. Instantiations in
// csrc/cuda/instantiations/select_sm90_hdim*.cu (sm_90a builds).
template <int kDk, DType kDType>
bool run_select_blocks_sm90(const SelectParams& params, cudaStream_t stream);

// Decode (KV cache), csrc/cuda/decode*.cuh; instantiations in
// csrc/cuda/instantiations/decode_hdim*.cu. The caller (cuda_ops.cpp) allocates the
// fp32 workspaces with the torch allocator, sized by decode_plan.h:
//   attention: o_part [num_splits, B, S, Hq, Dv], lse_part [num_splits, B, S, Hq]
//   selection: scores [B, Hkv, S, select_score_width(params)]
// With combine = false the attention leaves its splits' partials (one split
// included) for run_decode_gate_combine, which writes o = sum_b g_b * o_b.
template <int kDk, int kDv, DType kDType>
void run_attn_decode(const AttnFwdParams& params, int num_splits, float* o_part,
                     float* lse_part, bool combine, cudaStream_t stream);
// One branch of a decode step whose splits stay unmerged: its params, split count and
// workspaces (shaped as above).
struct DecodeAttnJob {
  AttnFwdParams params;
  int num_splits;
  float* o_part;
  float* lse_part;
};
// Up to kMaxDecodeJobs such branches of one step (same q) in one launch of decode_attn.
constexpr int kMaxDecodeJobs = 3;
template <int kDk, int kDv, DType kDType>
void run_attn_decode_partials(const DecodeAttnJob* jobs, int count, cudaStream_t stream);
template <int kDk, int kDv, DType kDType>
void run_decode_gate_combine(const DecodeGateParams& params, cudaStream_t stream);
template <int kDk, DType kDType>
void run_select_blocks_decode(const SelectParams& params, float* scores, cudaStream_t stream);
// Compresses the blocks that complete as the caches grow (CompressParams::cache_seqlens).
void run_update_cmp_cache(const CompressParams& params, DType dtype, cudaStream_t stream);
// Writes the new tokens into the k and v caches at rows cache_seqlens[b] + i (one
// launch for both).
void run_append_kv_to_cache(const CacheAppendParams& params, DType dtype, cudaStream_t stream);

// sparse_attn's gated sum, o = sum_b g_b * o_b, and its gradient (GateParams;
// fp16/bf16, head_dim a multiple of 8, 16-byte aligned rows, float gates).
void run_gate_combine(const GateParams& params, DType dtype, cudaStream_t stream);
void run_gate_combine_bwd(const GateParams& params, DType dtype, cudaStream_t stream);

// Scratch of the attention backward, allocated by the caller (torch's caching
// allocator on the current stream).
struct AttnBwdWorkspace {
  // delta = rowsum(o * do) - dlse, float32, laid out like lse ([B, Hq, T] with
  // lse's strides).
  float* delta = nullptr;
  // Rows of q / dq per batch entry (T, or the packed total in varlen mode).
  int64_t q_rows = 0;
  // kSelected: the inverse index, sorted ascending (see run_slc_inverse_keys).
  const int64_t* slc_keys = nullptr;
  int64_t slc_key_count = 0;
  // Allocates `bytes` of scratch (256-byte aligned) that live until the op returns
  // (the caller's torch allocator on the current stream): the launchers size the
  // dk/dv query split's plan and partial sums with it. nullptr: no split.
  void* (*alloc)(void* ctx, int64_t bytes) = nullptr;
  void* alloc_ctx = nullptr;
  // Set by the launcher (attn_bwd.cuh, plan_dkv_split): the compressed and selected
  // dk/dv kernels split each key tile's query positions into chunks of
  // dkv_chunk_pos (0: no split); the chunks of a tile with more than one write
  // fp32 partial sums into dkv_partial ([z, Hkv, dkv_slots, kBlockN, Dk + Dv]),
  // summed in chunk order by a reduce kernel. The selected branch's chunk counts
  // depend on the data: dkv_plan ([z, Hkv, 2, key tiles + 1], run_slc_dkv_plan) holds
  // each tile's first CTA and first slot.
  int64_t dkv_chunk_pos = 0;
  int64_t dkv_slots = 0;
  float* dkv_partial = nullptr;
  const int64_t* dkv_plan = nullptr;
};

// Attention backward for one branch: delta, then dq (query-side, the forward's
// KV schedules) and dk/dv (KV-side, one CTA per KV tile writing its rows once;
// the compressed branch's tiles split over query chunks whose fp32 partial sums one
// more kernel adds in chunk order). Deterministic: no atomics. Instantiations in instantiations/attn_bwd_hdim*.cu.
template <int kDk, int kDv, DType kDType>
void run_attn_bwd(const AttnBwdParams& params, const AttnBwdWorkspace& ws, cudaStream_t stream);

// Inverse index of the selected branch, step 1: one int64 key per
// (batch entry, token row, kv head, slot) of block_indices,
//   key = ((b * Hkv + h) * R + row0 + j * l') * R + row0 + t   (R = p.k_rows),
// or INT64_MAX for an unused slot (j < 0 or j * l' > t). Sorted ascending by the
// caller, the tokens that selected block j of (b, h) are one contiguous run.
void run_slc_inverse_keys(const AttnBwdParams& params, int64_t* keys, cudaStream_t stream);
inline int64_t slc_inverse_key_count(const AttnBwdParams& p) {
  return (p.cu_seqlens == nullptr ? p.num_seqs : 1) * p.k_rows * p.num_heads_kv * p.slc_num_blocks;
}

// Gradient of mean_compress (CompressParams with x <- dx, out <- d out).
void run_mean_compress_bwd(const CompressParams& params, DType dtype, cudaStream_t stream);

// Mean pooling of blocks (CompressParams in nsa/params.h; fp16/bf16).
void run_mean_compress(const CompressParams& params, DType dtype, cudaStream_t stream);

// Checks a launch (cudaGetLastError) and throws std::runtime_error with the
// kernel's name on failure; the api file turns it into a torch error.
void check_launch(const char* what);

}  // namespace nsa::cuda
