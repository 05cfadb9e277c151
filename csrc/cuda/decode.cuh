// Launchers of the decode (KV-cache) kernels: decode_attn + decode_combine for the
// three attention branches, and the two selection kernels. Explicitly instantiated
// per (Dk, Dv, dtype) in csrc/cuda/instantiations/decode_hdim*.cu. All sizes come
// from shapes (decode_plan.h): no device sync, CUDA-graph capturable.
#pragma once

#include <climits>

#include "cuda/decode_attn.cuh"
#include "cuda/decode_combine.cuh"
#include "cuda/decode_select.cuh"

namespace nsa::cuda {

// combine = false (sparse_attn_decode): every split, a single one included, leaves
// its partials in the workspace for run_decode_gate_combine, and no combine runs.
template <int kDk, int kDv, DType kDType>
void run_attn_decode(const AttnFwdParams& p, int num_splits, float* o_part, float* lse_part,
                     bool combine, cudaStream_t stream) {
  using Traits = DecodeTraits<kDk, kDv, kDType>;
  using Element = typename Traits::Element;
  if (p.num_seqs == 0 || p.seqlen == 0 || p.num_heads_q == 0) return;
  const int64_t row_tiles = decode_row_tiles(p);
  const int64_t kv_ctas = p.num_seqs * p.num_heads_kv;
  const int64_t rows = p.num_seqs * p.seqlen * p.num_heads_q;
  if (kv_ctas > INT32_MAX || row_tiles > 65535 || num_splits < 1 || num_splits > 65535 ||
      rows > INT32_MAX || p.k_rows >= INT32_MAX / 2)
    throw std::runtime_error("problem too large for the decode grid");
  const int64_t smem = decode_attn_smem(p, kDk, kDv);
  if (smem > 227 * 1024)
    throw std::runtime_error("decode_attn: slc_num_blocks too large for shared memory");
  auto kernel = decode_attn_kernel<Traits>;
  set_smem_limit(kernel, int(smem), "decode_attn");
  const DecodeWorkspace ws{o_part, lse_part, num_splits, combine && num_splits == 1};
  const dim3 grid{unsigned(kv_ctas), unsigned(row_tiles), unsigned(num_splits)};
  NSA_LAUNCH(grid, Traits::kThreads, smem, stream, kernel)(p, ws);
  check_launch("decode_attn");
  if (ws.final_out || !combine) return;  // decode_attn wrote o and lse, or the gated sum merges
  NSA_LAUNCH(unsigned(rows), 128, 0, stream, decode_combine_kernel<kDv, Element>)(p, ws);
  check_launch("decode_combine");
}

// The instance's (Dv, dtype) picks the kernel; kDk only keeps the instantiation
// files one per (Dk, Dv, dtype).
template <int kDk, int kDv, DType kDType>
void run_decode_gate_combine(const DecodeGateParams& p, cudaStream_t stream) {
  using Element = typename ElementOf<kDType>::type;
  const int64_t rows = p.num_seqs * p.seqlen * p.num_heads_q;
  if (rows == 0) return;
  if (rows > INT32_MAX || p.num_branches < 0 || p.num_branches > kMaxDecodeBranches)
    throw std::runtime_error("decode_gate_combine: bad problem size");
  NSA_LAUNCH(unsigned(rows), 128, 0, stream, decode_gate_combine_kernel<kDv, Element>)(p);
  check_launch("decode_gate_combine");
}

template <int kDk, DType kDType>
void run_select_blocks_decode(const SelectParams& p, float* scores, cudaStream_t stream) {
  using Element = typename ElementOf<kDType>::type;
  if (p.num_seqs == 0 || p.seqlen == 0 || p.num_heads_kv == 0 || p.slc_num_blocks == 0) return;
  const int64_t width = select_score_width(p);
  const int64_t score_ctas = ceil_div64(width, kSelectBlocksPerCta);
  const int64_t tokens = p.num_seqs * p.num_heads_kv * p.seqlen;
  if (score_ctas > INT32_MAX || p.num_heads_kv > 65535 || p.num_seqs > 65535 ||
      tokens > INT32_MAX)
    throw std::runtime_error("problem too large for the selection grid");
  const int64_t smem = select_score_smem(p, kDk);
  if (smem > 227 * 1024)
    throw std::runtime_error("select_blocks_decode: slc_block_size / cmp_stride too large for shared memory");
  auto scores_kernel = decode_select_scores_kernel<kDk, Element>;
  set_smem_limit(scores_kernel, int(smem), "select_blocks_decode");
  const dim3 grid{unsigned(score_ctas), unsigned(p.num_heads_kv), unsigned(p.num_seqs)};
  NSA_LAUNCH(grid, kSelectThreads, smem, stream, scores_kernel)(p, scores, width);
  check_launch("select_blocks_decode (scores)");
  const int64_t topn_smem = ceil_div64(width, 32) * 4;
  if (topn_smem > 48 * 1024)
    throw std::runtime_error("select_blocks_decode: cache too long for the top-n kernel");
  NSA_LAUNCH(unsigned(tokens), 32, topn_smem, stream, decode_select_topn_kernel<Element>)(
      p, scores, width);
  check_launch("select_blocks_decode (top-n)");
}

}  // namespace nsa::cuda
