// CPU kernels: entry points, templated on the input element type. Instantiated
// for float, double, c10::Half and c10::BFloat16 in the .cpp files; the
// accumulate type is double for double inputs and float otherwise.
#pragma once

#include "nsa/params.h"

namespace nsa::cpu {

template <typename scalar_t> void attn_fwd(const AttnFwdParams& p);
template <typename scalar_t> void attn_bwd(const AttnBwdParams& p);
template <typename scalar_t> void select_blocks(const SelectParams& p);

// Mean pooling: x [B, T, H, D] -> x_cmp; varlen packs per packed_cmp_row_begin.
struct CompressParams {
  const void* x;
  void* out;
  int64_t x_batch_stride, x_row_stride, x_head_stride;
  int64_t out_batch_stride, out_row_stride, out_head_stride;
  const int32_t* cu_seqlens;
  int64_t num_seqs, seqlen, num_heads, head_dim, cmp_block_size, cmp_stride;
};
template <typename scalar_t> void mean_compress(const CompressParams& p);
// Its gradient: reads the compressed gradient from `out` and writes the
// per-token gradient into `x` (roles swapped, same layout).
template <typename scalar_t> void mean_compress_bwd(const CompressParams& p);

}  // namespace nsa::cpu
