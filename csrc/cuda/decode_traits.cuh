// Kernel traits of the decode attention (decode_attn.cuh): tile sizes (from
// decode_plan.h, shared with the host), smem layouts, the TiledMma and its
// ldmatrix atoms; and the split workspace the mainloop writes and
// decode_combine.cuh reads.
#pragma once

#include "cuda/common.cuh"
#include "cuda/decode_plan.h"

namespace nsa::cuda {

// S = Q K^T on a 16-row tile (one m16 MMA tile of queries) against 32 keys:
// the four warps split the keys, 8 each. Shared by decode_attn and the decode
// selection's scores.
template <int kDk_, class Element_>
struct DecodeQkTraits {
  using Element = Element_;
  static constexpr int kDk = kDk_;
  static constexpr int kRows = kDecodeRows;
  static constexpr int kKeys = kDecodeKeys;
  static constexpr int kThreads = kDecodeThreads;
  static constexpr int kWarps = kThreads / 32;
  // Padded smem rows (decode_plan.h): 16 bytes more than the data.
  static constexpr int kQStride = kDk + kDecodePad;
  static constexpr int kKStride = kDk + kDecodePad;
  static_assert(kRows == 16, "one m16 MMA tile of rows");
  static_assert(kKeys == 8 * kWarps, "S = Q K^T: each warp computes 8 keys");
  static_assert(kDk % 16 == 0);

  // The warps split the N side (keys here, output columns in P V).
  using TiledMma = cute::TiledMMA<Sm80MmaAtom<Element>,
                                  cute::Layout<cute::Shape<cute::_1, cute::Int<kWarps>, cute::_1>>>;
  using SmemLayoutQ = cute::Layout<cute::Shape<cute::Int<kRows>, cute::Int<kDk>>,
                                   cute::Stride<cute::Int<kQStride>, cute::_1>>;
  using SmemLayoutK = cute::Layout<cute::Shape<cute::Int<kKeys>, cute::Int<kDk>>,
                                   cute::Stride<cute::Int<kKStride>, cute::_1>>;
  // A operands (16 x 16 per k step): four 8x8 matrices; B operands (8 x 16 per
  // warp and k step): two.
  using CopyAtomA = cute::Copy_Atom<cute::SM75_U32x4_LDSM_N, Element>;
  using CopyAtomK = cute::Copy_Atom<cute::SM75_U32x2_LDSM_N, Element>;
};

// decode_attn: the Q K^T part above, then O += P V with the warps splitting Dv
// (8 of every 32 output columns each).
template <int kDk_, int kDv_, DType kDType>
struct DecodeTraits : DecodeQkTraits<kDk_, typename ElementOf<kDType>::type> {
  using Base = DecodeQkTraits<kDk_, typename ElementOf<kDType>::type>;
  using typename Base::Element;
  using Base::kRows, Base::kKeys, Base::kThreads, Base::kWarps;
  static constexpr int kDv = kDv_;
  static constexpr int kStages = kDecodeStages;
  static constexpr int kVStride = kDv + kDecodePad;
  static constexpr int kSStride = kKeys + kDecodePad;  // fp32 scores
  static constexpr int kPStride = kKeys + kDecodePad;  // 16-bit probabilities
  static_assert(kKeys == 32, "one lane per key of a chunk in the softmax");
  static_assert(kRows % kWarps == 0);
  static_assert(kDv % (8 * kWarps) == 0);
  static constexpr int kRowsPerWarp = kRows / kWarps;  // softmax rows of a warp

  // V^T (Dv x keys) as a view of the row-major V chunk: the B operand of P V.
  using SmemLayoutVt = cute::Layout<cute::Shape<cute::Int<kDv>, cute::Int<kKeys>>,
                                    cute::Stride<cute::_1, cute::Int<kVStride>>>;
  using SmemLayoutP = cute::Layout<cute::Shape<cute::Int<kRows>, cute::Int<kKeys>>,
                                   cute::Stride<cute::Int<kPStride>, cute::_1>>;
  using CopyAtomVt = cute::Copy_Atom<cute::SM75_U16x4_LDSM_T, Element>;
};

// Where the workspace puts split `split`'s partial row (b, i, h): o_part is
// [splits][B][S][Hq][Dv] fp32, lse_part [splits][B][S][Hq] fp32. With
// `final_out` (one split whose result nobody merges) there is no workspace
// (decode_partial_rows): decode_attn writes o and lse.
struct DecodeWorkspace {
  float* o_part;
  float* lse_part;
  int num_splits;
  bool final_out;
};

// The decode attention of up to kMaxDecodeJobs branches in one launch: with their
// splits left unmerged (sparse_attn_decode) the branches' CTAs are independent, and
// the branches of one step share q, hence the grid's x (batch entry x KV head) and y
// (row tiles). Branch j owns the next ws[j].num_splits values of blockIdx.z.
struct DecodeAttnBatch {
  AttnFwdParams p[kMaxDecodeJobs];
  DecodeWorkspace ws[kMaxDecodeJobs];
  int count;
};

}  // namespace nsa::cuda
