// select_blocks_decode (NSA_SPEC "Block selection", the rule of select_cpu.cpp)
// in two deterministic kernels, no float atomics:
//   1. decode_select_scores: a CTA owns (kSelectBlocksPerCta selection blocks j,
//      KV head, batch entry). It loads the compressed rows overlapping its blocks
//      once, and for each new token computes p(h, i) = exp(scale * q_h.k_i - lse_h)
//      for the group's heads h (heads with lse = -inf skipped) and the visible
//      rows i < nc(t) (clamped to the k_cmp rows), the dot products on tensor cores
//      (16 heads x 32 rows per MMA tile, decode_traits.cuh), sums over the heads
//      in a fixed order, and writes
//      score[j] = sum_i w(i, j) * p(i) for j <= J = t // l' into the workspace
//      [B, Hkv, S, W] (W = select_score_width). Entries j > J are not written.
//   2. decode_select_topn: one warp per (b, kv head, token), the prefill kernels'
//      select_top_n_row (select_topn.cuh): forced blocks first, then the top scores
//      (ties to the smaller j), written ascending, -1 padded; a token before
//      position 0 selects nothing.
// Positions: query row i of entry b is at t = len - S + i with len = seqlens_k[b]
// clamped to [0, select_max_tokens(k_rows)] (decode_plan.h).
#pragma once

#include "cuda/common.cuh"
#include "cuda/decode_plan.h"
#include "cuda/decode_traits.cuh"
#include "cuda/select_topn.cuh"

namespace nsa::cuda {

__device__ __forceinline__ int64_t select_decode_len(const SelectParams& p, int64_t b) {
  int64_t len = p.seqlens_k[b];
  len = len > 0 ? len : 0;
  const int64_t cap = select_max_tokens(p.k_rows, p.cmp_block_size, p.cmp_stride);
  return len < cap ? len : cap;
}

template <int kDk, class Element>
__global__ void __launch_bounds__(kSelectThreads)
    decode_select_scores_kernel(const SelectParams p, float* scores, int64_t width) {
  using namespace cute;
  using Qk = DecodeQkTraits<kDk, Element>;
  static_assert(Qk::kThreads == kSelectThreads && Qk::kRows == kSelectHeadsPerPass);
  constexpr int kThreads = kSelectThreads;
  constexpr int kKS = Qk::kKStride, kQS = Qk::kQStride;
  constexpr int kHeads = kSelectHeadsPerPass;
  constexpr int kPass = Qk::kKeys;  // compressed rows per MMA pass
  const int tid = threadIdx.x;
  const int64_t kvh = blockIdx.y, b = blockIdx.z;
  const int64_t l = p.cmp_block_size, d = p.cmp_stride, lp = p.slc_block_size;
  const int64_t G = p.group, S = p.seqlen;

  const int64_t j0 = int64_t(blockIdx.x) * kSelectBlocksPerCta;
  const int64_t j1 = min(j0 + kSelectBlocksPerCta, width);  // blocks [j0, j1)
  const int64_t len = select_decode_len(p, b);
  const int64_t t_last = len - 1;
  if (t_last < 0 || j0 > last_candidate_slc_block(t_last, lp)) return;  // nothing read there

  // Compressed rows that can overlap blocks [j0, j1): a conservative range
  // [i_lo, i_hi] (the overlap test below is the exact rule), clipped to the rows
  // visible to the last token.
  const int64_t nc_last_raw = num_visible_cmp_blocks(t_last, l, d);
  const int64_t nc_last = nc_last_raw < p.k_rows ? nc_last_raw : p.k_rows;
  const int64_t lo = j0 * lp - l;
  const int64_t i_lo = lo > 0 ? lo / d : 0;
  const int64_t i_hi = min((j1 * lp) / d, nc_last - 1);
  const int num_rows = i_hi >= i_lo ? int(i_hi - i_lo + 1) : 0;  // <= select_cta_cmp_rows
  const int passes = (num_rows + kPass - 1) / kPass;

  extern __shared__ __align__(16) char smem[];
  const SelectScoreSmem at = select_score_smem_layout(p, kDk);
  const int64_t kPS = at.p_stride;
  Element* sK = reinterpret_cast<Element*>(smem + at.k);  // [passes * kPass][kKS], zero past num_rows
  Element* sQ = reinterpret_cast<Element*>(smem + at.q);  // [kHeads][kQS], zero past the pass's heads
  float* sP = reinterpret_cast<float*>(smem + at.p);      // [kHeads][kPS]
  float* sPsum = reinterpret_cast<float*>(smem + at.psum);
  float* sLse = reinterpret_cast<float*>(smem + at.lse);

  const Element* k = static_cast<const Element*>(p.k_cmp) + b * p.k_batch_stride +
                     kvh * p.k_head_stride;
  // With the compressed attention's scores (compressed_select_decode) neither K nor
  // q is read: p(g, r) comes from those scores and the final lse.
  const float* kept = p.cmp_scores;
  constexpr int kChunks = kDk / 8;
  if (kept == nullptr) {
    for (int e = tid; e < passes * kPass * kChunks; e += kThreads) {
      const int r = e / kChunks, c8 = e % kChunks;
      const bool pred = r < num_rows;
      cp_async_16(sK + r * kKS + c8 * 8, pred ? k + (i_lo + r) * p.k_row_stride + c8 * 8 : k, pred);
    }
  }
  cute::cp_async_fence();

  // p(g, r) on tensor cores: the pass's heads are the 16 rows of the MMA tile, each
  // pass of kPass compressed rows one S tile (the warps split the rows).
  using Mma = typename Qk::TiledMma;
  Tensor tQ = make_tensor(make_smem_ptr(sQ), typename Qk::SmemLayoutQ{});
  Tensor tK = make_tensor(make_smem_ptr(sK), typename Qk::SmemLayoutK{});
  auto gemm_qk = make_smem_gemm<Mma, typename Qk::CopyAtomA, typename Qk::CopyAtomK>(tQ, tK, tid);
  Mma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  Tensor cS = thr_mma.partition_C(make_identity_tensor(Shape<Int<kHeads>, Int<kPass>>{}));

  const Element* q = static_cast<const Element*>(p.q) + b * p.q_batch_stride;
  const float* lse = static_cast<const float*>(p.lse_cmp) + b * p.lse_batch_stride;
  const float scale = float(p.scale);
  for (int64_t i = 0; i < S; ++i) {
    const int64_t t = len - S + i;
    if (t < 0) continue;  // uniform; top-n writes -1 for this token
    const int64_t J = last_candidate_slc_block(t, lp);
    if (j0 > J) continue;
    const int64_t nc_raw = num_visible_cmp_blocks(t, l, d);
    const int64_t nc = nc_raw < p.k_rows ? nc_raw : p.k_rows;

    for (int r = tid; r < num_rows; r += kThreads) sPsum[r] = 0.f;
    for (int64_t g0 = 0; g0 < G; g0 += kHeads) {
      const int heads = int(min(int64_t(kHeads), G - g0));
      __syncthreads();  // sQ, sP, sLse of the previous pass are consumed
      if (kept == nullptr) {
        for (int e = tid; e < kHeads * kChunks; e += kThreads) {
          const int g = e / kChunks, c8 = e % kChunks;
          const int64_t h = kvh * G + g0 + g;
          const bool pred = g < heads;
          cp_async_16(sQ + g * kQS + c8 * 8,
                      pred ? q + i * p.q_row_stride + h * p.q_head_stride + c8 * 8 : q, pred);
        }
      }
      cute::cp_async_fence();
      if (tid < kHeads)
        sLse[tid] = tid < heads ? lse[(kvh * G + g0 + tid) * p.lse_head_stride + i] : -INFINITY;
      cute::cp_async_wait<0>();  // this pass's q (and, the first time, the K rows)
      __syncthreads();
      if (kept != nullptr) {
        // Row (i, g) of the attention's scores [B][Hkv][S * G][k_rows], exp2 domain.
        const float* base = kept + ((b * p.num_heads_kv + kvh) * S * G + i * G + g0) * p.k_rows + i_lo;
        for (int e = tid; e < kHeads * passes * kPass; e += kThreads) {
          const int g = e / (passes * kPass), r = e % (passes * kPass);
          const float lse_h = sLse[g];  // -inf: a head past the pass, or one that saw nothing
          float prob = 0.f;
          if (lse_h != -INFINITY && r < num_rows && i_lo + r < nc)
            prob = exp2f(base[int64_t(g) * p.k_rows + r] - lse_h * kLog2e);
          sP[g * kPS + r] = prob;
        }
      }
      for (int pass = 0; pass < (kept == nullptr ? passes : 0); ++pass) {
        Tensor acc_s = partition_fragment_C(mma, Shape<Int<kHeads>, Int<kPass>>{});
        clear(acc_s);
        gemm_qk(acc_s, pass * kPass * kKS);
        for_each_element(acc_s, cS, [&](int g, int col, float s) {
          const int r = pass * kPass + col;
          const float lse_h = sLse[g];  // -inf: a head past the pass, or one that saw nothing
          float prob = 0.f;
          if (lse_h != -INFINITY && r < num_rows && i_lo + r < nc) prob = __expf(scale * s - lse_h);
          sP[g * kPS + r] = prob;
        });
      }
      __syncthreads();
      // Sum over the pass's heads in a fixed order (the owner of row r only).
      for (int r = tid; r < num_rows; r += kThreads) {
        float s = sPsum[r];
        for (int g = 0; g < heads; ++g) s += sP[g * kPS + r];
        sPsum[r] = s;
      }
    }
    __syncthreads();
    // score[j] = sum over the rows overlapping j of w(i, j) * p(i), j <= J, the rows
    // ascending; rows past nc(t) add nothing (their p is 0), so they are clipped off.
    float* out = scores + ((b * p.num_heads_kv + kvh) * S + i) * width;
    for (int64_t j = j0 + tid; j < j1 && j <= J; j += kThreads) {
      const int64_t r_lo = max(first_overlapping_cmp_row(j, l, d, lp), i_lo);
      const int64_t r_hi = min(min(last_overlapping_cmp_row(j, d, lp), i_hi), nc - 1);
      float s = 0.f;
      for (int64_t blk = r_lo; blk <= r_hi; ++blk) s += cmp_slc_overlap_weight(blk, j, l, d, lp) * sPsum[blk - i_lo];
      out[j] = s;
    }
    __syncthreads();  // sPsum is reset for the next token
  }
  cute::cp_async_wait<0>();  // the K rows' copies when no token needed them
}

// One warp per (b, kv head, token): blockIdx.x = (b * Hkv + kvh) * S + i, 32 threads,
// through the prefill kernels' select_top_n_row. Dynamic smem: the score row (width
// floats), then the `taken` bitmask of ceil(width / 32) words. A template (on the
// element type, unused) so that every decode TU can hold its own copy.
template <class Element>
__global__ void __launch_bounds__(32)
    decode_select_topn_kernel(const SelectParams p, const float* scores, int64_t width) {
  const int lane = threadIdx.x;
  const int64_t S = p.seqlen;
  const int64_t i = int64_t(blockIdx.x) % S;
  const int64_t kvh = (int64_t(blockIdx.x) / S) % p.num_heads_kv;
  const int64_t b = int64_t(blockIdx.x) / (S * p.num_heads_kv);
  int32_t* out = p.block_indices + b * p.bi_batch_stride + i * p.bi_row_stride +
                 kvh * p.bi_head_stride;
  const int64_t t = select_decode_len(p, b) - S + i;
  if (t < 0) {
    for (int64_t a = lane; a < p.slc_num_blocks; a += 32) out[a] = -1;
    return;
  }
  // J = t // l' < width: t < select_max_tokens (select_decode_len).
  const int64_t J = last_candidate_slc_block(t, p.slc_block_size);
  // The row is staged in shared memory first: the top-n rescans a lane's candidates,
  // and from global memory each rescan would be a chain of dependent L2 round trips.
  extern __shared__ __align__(16) char smem[];
  float* row = reinterpret_cast<float*>(smem);
  uint32_t* taken = reinterpret_cast<uint32_t*>(row + width);
  const float* score = scores + ((b * p.num_heads_kv + kvh) * S + i) * width;
  constexpr int kBatch = 8;  // loads in flight per lane, all issued before any store
  for (int64_t j0 = lane; j0 <= J; j0 += 32 * kBatch) {
    float v[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) v[u] = j0 + 32 * u <= J ? score[j0 + 32 * u] : 0.f;
#pragma unroll
    for (int u = 0; u < kBatch; ++u)
      if (j0 + 32 * u <= J) row[j0 + 32 * u] = v[u];
  }
  __syncwarp();
  select_top_n_row(p, J, row, taken, out, lane);
}

}  // namespace nsa::cuda
