// Launchers of the decode (KV-cache) kernels: decode_attn + decode_combine for the
// three attention branches, and the two selection kernels. Explicitly instantiated
// per (Dk, Dv, dtype) in csrc/cuda/instantiations/decode_hdim*.cu. All sizes come
// from shapes (decode_plan.h): no device sync, CUDA-graph capturable.
#pragma once

#include <algorithm>
#include <climits>

#include "cuda/decode_attn.cuh"
#include "cuda/decode_combine.cuh"
#include "cuda/decode_select.cuh"

namespace nsa::cuda {

// decode_attn's grid x (batch entry x KV head) and y (row tiles) and dynamic smem for
// one branch, checked.
struct DecodeLaunch {
  int64_t kv_ctas, row_tiles, smem;
};
inline DecodeLaunch decode_launch(const AttnFwdParams& p, int num_splits, int dk, int dv) {
  const DecodeLaunch l{p.num_seqs * p.num_heads_kv, decode_row_tiles(p), decode_attn_smem(p, dk, dv)};
  const int64_t rows = p.num_seqs * p.seqlen * p.num_heads_q;
  if (l.kv_ctas > INT32_MAX || l.row_tiles > 65535 || num_splits < 1 || num_splits > 65535 ||
      rows > INT32_MAX || p.k_rows >= INT32_MAX / 2)
    throw std::runtime_error("problem too large for the decode grid");
  if (l.smem > 227 * 1024)
    throw std::runtime_error("decode_attn: slc_num_blocks too large for shared memory");
  return l;
}

// combine = false (sparse_attn_decode): every split, a single one included, leaves
// its partials in the workspace for run_decode_gate_combine, and no combine runs.
template <int kDk, int kDv, DType kDType>
void run_attn_decode(const AttnFwdParams& p, int num_splits, float* o_part, float* lse_part,
                     bool combine, cudaStream_t stream) {
  using Traits = DecodeTraits<kDk, kDv, kDType>;
  using Element = typename Traits::Element;
  if (p.num_seqs == 0 || p.seqlen == 0 || p.num_heads_q == 0) return;
  const DecodeLaunch l = decode_launch(p, num_splits, kDk, kDv);
  auto kernel = decode_attn_kernel<Traits>;
  set_smem_limit(kernel, int(l.smem), "decode_attn");
  DecodeAttnBatch batch{};
  batch.p[0] = p;
  batch.ws[0] = DecodeWorkspace{o_part, lse_part, num_splits, combine && num_splits == 1};
  batch.count = 1;
  const dim3 grid{unsigned(l.kv_ctas), unsigned(l.row_tiles), unsigned(num_splits)};
  NSA_LAUNCH(grid, Traits::kThreads, l.smem, stream, kernel)(batch);
  check_launch("decode_attn");
  if (batch.ws[0].final_out || !combine) return;  // decode_attn wrote o and lse, or the gated sum merges
  const int64_t rows = p.num_seqs * p.seqlen * p.num_heads_q;
  NSA_LAUNCH(unsigned(rows), 128, 0, stream, decode_combine_kernel<kDv, Element>)(p, batch.ws[0]);
  check_launch("decode_combine");
}

template <int kDk, int kDv, DType kDType>
void run_attn_decode_partials(const DecodeAttnJob* jobs, int count, cudaStream_t stream) {
  using Traits = DecodeTraits<kDk, kDv, kDType>;
  if (count < 1 || count > kMaxDecodeJobs)
    throw std::runtime_error("run_attn_decode_partials: 1 to 3 branches per launch");
  const AttnFwdParams& first = jobs[0].params;
  if (first.num_seqs == 0 || first.seqlen == 0 || first.num_heads_q == 0) return;
  const DecodeLaunch l0 = decode_launch(first, jobs[0].num_splits, kDk, kDv);
  DecodeAttnBatch batch{};
  batch.count = count;
  int64_t smem = 0, splits = 0;
  for (int j = 0; j < count; ++j) {
    const DecodeLaunch l = decode_launch(jobs[j].params, jobs[j].num_splits, kDk, kDv);
    if (l.kv_ctas != l0.kv_ctas || l.row_tiles != l0.row_tiles)
      throw std::runtime_error("run_attn_decode_partials: the branches' query grids differ");
    smem = std::max(smem, l.smem);
    splits += jobs[j].num_splits;
    batch.p[j] = jobs[j].params;
    batch.ws[j] = DecodeWorkspace{jobs[j].o_part, jobs[j].lse_part, jobs[j].num_splits, false};
  }
  if (splits > 65535) throw std::runtime_error("problem too large for the decode grid");
  auto kernel = decode_attn_kernel<Traits>;
  set_smem_limit(kernel, int(smem), "decode_attn");
  const dim3 grid{unsigned(l0.kv_ctas), unsigned(l0.row_tiles), unsigned(splits)};
  NSA_LAUNCH(grid, Traits::kThreads, smem, stream, kernel)(batch);
  check_launch("decode_attn");
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
  const int64_t topn_smem = (width + ceil_div64(width, 32)) * 4;
  auto topn_kernel = decode_select_topn_kernel<Element>;
  set_smem_limit(topn_kernel, int(topn_smem), "select_blocks_decode (top-n)");
  NSA_LAUNCH(unsigned(tokens), 32, topn_smem, stream, topn_kernel)(p, scores, width);
  check_launch("select_blocks_decode (top-n)");
}

}  // namespace nsa::cuda
