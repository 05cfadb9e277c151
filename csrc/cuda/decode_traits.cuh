// Kernel traits of the decode attention (decode_attn.cuh): tile sizes (from
// decode_plan.h, shared with the host), smem strides, per-thread work; and the
// split workspace the mainloop writes and decode_combine.cuh reads.
#pragma once

#include "cuda/common.cuh"
#include "cuda/decode_plan.h"

namespace nsa::cuda {

template <int kDk_, int kDv_, DType kDType>
struct DecodeTraits {
  using Element = typename ElementOf<kDType>::type;
  static constexpr int kDk = kDk_;
  static constexpr int kDv = kDv_;
  static constexpr int kRows = kDecodeRows;
  static constexpr int kKeys = kDecodeKeys;
  static constexpr int kThreads = kDecodeThreads;
  static constexpr int kWarps = kThreads / 32;
  // sK/sV rows padded by 8 elements (16 bytes): consecutive rows start 4 banks
  // apart, so a warp's 16-byte reads of 32 different rows are conflict free.
  static constexpr int kKStride = kDk + 8;
  static constexpr int kVStride = kDv + 8;
  static constexpr int kStages = kDecodeStages;
  static_assert(kKeys == 32, "one lane per key of a chunk");
  static_assert(kRows % kWarps == 0);
  static_assert(kDk % 8 == 0 && kDv % 32 == 0);
  static_assert((kRows * kDv) % kThreads == 0);
  // Output accumulators per thread: element e = tid + k * kThreads of [kRows][kDv].
  static constexpr int kAccPerThread = kRows * kDv / kThreads;
  static constexpr int kRowsPerWarp = kRows / kWarps;
};

// Where the workspace puts split `split`'s partial row (b, i, h): o_part is
// [splits][B][S][Hq][Dv] fp32, lse_part [splits][B][S][Hq] fp32.
struct DecodeWorkspace {
  float* o_part;
  float* lse_part;
  int num_splits;
};

}  // namespace nsa::cuda
