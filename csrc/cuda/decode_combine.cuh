// decode_combine: merges the KV splits of decode_attn. Split s left a normalised
// o_s (fp32) and lse_s (natural log, -inf when it saw no key) per row; the row's
// result is o = sum_s w_s o_s / sum_s w_s, lse = m + log(sum_s w_s) with
// w_s = exp(lse_s - m), m = max_s lse_s. A row no split saw gets o = 0, lse = -inf.
// One CTA per (b, i, h) row, threads over the Dv columns; splits in a fixed order.
//
// decode_gate_combine (sparse_attn_decode): the same merge for each branch that
// left partials, then o = sum over the branches of g * o_branch, in fp32 and
// rounded once, so a decode step needs no combine per branch and no gating ops.
#pragma once

#include "cuda/decode_attn.cuh"

namespace nsa::cuda {

// The weights of one row's splits: w_s = exp(lse_s - max) / sum.
struct SplitWeights {
  float max, sum;
  __device__ bool empty() const { return max == -INFINITY; }
  __device__ float inv_sum() const { return empty() ? 0.f : 1.f / sum; }
  __device__ float lse() const { return empty() ? -INFINITY : max + logf(sum); }
};

// split_stride: rows per split of the workspace.
__device__ __forceinline__ SplitWeights split_weights(const float* lse_part, int num_splits,
                                                     int64_t split_stride, int64_t row) {
  SplitWeights w{-INFINITY, 0.f};
  for (int s = 0; s < num_splits; ++s) w.max = fmaxf(w.max, lse_part[s * split_stride + row]);
  if (!w.empty())
    for (int s = 0; s < num_splits; ++s) w.sum += __expf(lse_part[s * split_stride + row] - w.max);
  return w;
}

// Column `col` of the merged row: sum_s w_s o_s (0 for a row no split saw).
template <int kDv>
__device__ __forceinline__ float merged_column(const float* o_part, const float* lse_part,
                                               int num_splits, int64_t split_stride,
                                               int64_t row, int col, const SplitWeights& w) {
  if (w.empty()) return 0.f;
  float x = 0.f;
  for (int s = 0; s < num_splits; ++s) {
    const float lse_s = lse_part[s * split_stride + row];
    if (lse_s == -INFINITY) continue;  // its o_s is 0, its weight 0
    x += __expf(lse_s - w.max) * o_part[(s * split_stride + row) * kDv + col];
  }
  return x * w.inv_sum();
}

template <int kDv, class Element>
__global__ void __launch_bounds__(128)
    decode_combine_kernel(const AttnFwdParams p, const DecodeWorkspace ws) {
  // blockIdx.x = (b * S + i) * Hq + h
  const int64_t row = blockIdx.x;
  const int64_t h = row % p.num_heads_q;
  const int64_t i = (row / p.num_heads_q) % p.seqlen;
  const int64_t b = row / (p.num_heads_q * p.seqlen);
  const int64_t split_stride = p.num_seqs * p.seqlen * p.num_heads_q;  // rows per split

  const SplitWeights w = split_weights(ws.lse_part, ws.num_splits, split_stride, row);
  Element* o = static_cast<Element*>(p.o) + b * p.o_batch_stride + i * p.o_row_stride +
               h * p.o_head_stride;
  for (int col = threadIdx.x; col < kDv; col += blockDim.x)
    o[col] = Element(merged_column<kDv>(ws.o_part, ws.lse_part, ws.num_splits, split_stride, row,
                                        col, w));
  if (threadIdx.x == 0)
    static_cast<float*>(p.lse)[b * p.lse_batch_stride + h * p.lse_head_stride + i] = w.lse();
}

template <int kDv, class Element>
__global__ void __launch_bounds__(128) decode_gate_combine_kernel(const DecodeGateParams p) {
  // blockIdx.x = (b * S + i) * Hq + h
  const int64_t row = blockIdx.x;
  const int64_t h = row % p.num_heads_q;
  const int64_t i = (row / p.num_heads_q) % p.seqlen;
  const int64_t b = row / (p.num_heads_q * p.seqlen);
  const int64_t split_stride = p.num_seqs * p.seqlen * p.num_heads_q;

  constexpr int kCols = (kDv + 127) / 128;  // columns per thread
  float acc[kCols];
#pragma unroll
  for (int c = 0; c < kCols; ++c) acc[c] = 0.f;
  for (int br = 0; br < p.num_branches; ++br) {
    const DecodeGateBranch& x = p.branches[br];
    const float g = static_cast<const float*>(x.gate)[
        b * x.gate_batch_stride + i * x.gate_row_stride + h * x.gate_head_stride];
    if (x.o != nullptr) {
      const Element* o_b = static_cast<const Element*>(x.o) + b * x.o_batch_stride +
                           i * x.o_row_stride + h * x.o_head_stride;
#pragma unroll
      for (int c = 0; c < kCols; ++c)
        if (const int col = threadIdx.x + 128 * c; col < kDv) acc[c] += g * float(o_b[col]);
    } else {
      const SplitWeights w = split_weights(x.lse_part, x.num_splits, split_stride, row);
#pragma unroll
      for (int c = 0; c < kCols; ++c)
        if (const int col = threadIdx.x + 128 * c; col < kDv)
          acc[c] += g * merged_column<kDv>(x.o_part, x.lse_part, x.num_splits, split_stride, row,
                                           col, w);
    }
  }
  Element* o = static_cast<Element*>(p.o) + b * p.o_batch_stride + i * p.o_row_stride +
               h * p.o_head_stride;
#pragma unroll
  for (int c = 0; c < kCols; ++c)
    if (const int col = threadIdx.x + 128 * c; col < kDv) o[col] = Element(acc[c]);
}

}  // namespace nsa::cuda
