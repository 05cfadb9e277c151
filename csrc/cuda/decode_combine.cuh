// decode_combine: merges the KV splits of decode_attn. Split s left a normalised
// o_s (fp32) and lse_s (natural log, -inf when it saw no key) per row; the row's
// result is o = sum_s w_s o_s / sum_s w_s, lse = m + log(sum_s w_s) with
// w_s = exp(lse_s - m), m = max_s lse_s. A row no split saw gets o = 0, lse = -inf.
// One CTA per (b, i, h) row, threads over the Dv columns; splits in a fixed order.
#pragma once

#include "cuda/decode_attn.cuh"

namespace nsa::cuda {

template <int kDv, class Element>
__global__ void __launch_bounds__(128)
    decode_combine_kernel(const AttnFwdParams p, const DecodeWorkspace ws) {
  // blockIdx.x = (b * S + i) * Hq + h
  const int64_t row = blockIdx.x;
  const int64_t h = row % p.num_heads_q;
  const int64_t i = (row / p.num_heads_q) % p.seqlen;
  const int64_t b = row / (p.num_heads_q * p.seqlen);
  const int64_t split_stride = p.num_seqs * p.seqlen * p.num_heads_q;  // rows per split

  float m = -INFINITY;
  for (int s = 0; s < ws.num_splits; ++s) m = fmaxf(m, ws.lse_part[s * split_stride + row]);
  const bool empty = m == -INFINITY;
  float wsum = 0.f;
  if (!empty)
    for (int s = 0; s < ws.num_splits; ++s) wsum += __expf(ws.lse_part[s * split_stride + row] - m);
  const float inv = empty ? 0.f : 1.f / wsum;

  Element* o = static_cast<Element*>(p.o) + b * p.o_batch_stride + i * p.o_row_stride +
               h * p.o_head_stride;
  for (int col = threadIdx.x; col < kDv; col += blockDim.x) {
    float x = 0.f;
    if (!empty) {
      for (int s = 0; s < ws.num_splits; ++s) {
        const float lse_s = ws.lse_part[s * split_stride + row];
        if (lse_s == -INFINITY) continue;  // its o_s is 0, its weight 0
        x += __expf(lse_s - m) * ws.o_part[(s * split_stride + row) * kDv + col];
      }
      x *= inv;
    }
    o[col] = Element(x);
  }
  if (threadIdx.x == 0)
    static_cast<float*>(p.lse)[b * p.lse_batch_stride + h * p.lse_head_stride + i] =
        empty ? -INFINITY : m + logf(wsum);
}

}  // namespace nsa::cuda
