// CPU kernels: entry points, templated on the input element type. Instantiated
// for float, double, c10::Half and c10::BFloat16 in the .cpp files; the
// accumulate type is double for double inputs and float otherwise.
#pragma once

#include "nsa/params.h"

namespace nsa::cpu {

template <typename scalar_t> void attn_fwd(const AttnFwdParams& p);
template <typename scalar_t> void attn_bwd(const AttnBwdParams& p);
template <typename scalar_t> void select_blocks(const SelectParams& p);

// Mean pooling (CompressParams in nsa/params.h).
template <typename scalar_t> void mean_compress(const CompressParams& p);
// Its gradient: reads the compressed gradient from `out` and writes the
// per-token gradient into `x` (roles swapped, same layout).
template <typename scalar_t> void mean_compress_bwd(const CompressParams& p);
// KV-cache update: the mean of each compressed block that completes as the
// cache grows (CompressParams::cache_seqlens), written into the compressed cache.
template <typename scalar_t> void update_cmp_cache(const CompressParams& p);
template <typename scalar_t> void append_kv_to_cache(const CacheAppendParams& p);

// sparse_attn's gated sum and its gradient (GateParams; gates in the accumulate type).
template <typename scalar_t> void gate_combine(const GateParams& p);
template <typename scalar_t> void gate_combine_bwd(const GateParams& p);

}  // namespace nsa::cpu
