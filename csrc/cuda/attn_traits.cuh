// Kernel traits of the attention forward (and of the selection scores, which
// reuse the Q.K^T half): every tile shape, smem layout, copy atom and TiledMma
// derived from (Dk, Dv, element type). SM80 tensor-core path (mma.sync m16n8k16,
// ldmatrix, cp.async), which sm_90a runs as well.
#pragma once

#include "cuda/common.cuh"

namespace nsa::cuda {

template <int kDk_, int kDv_, class Element_>
struct AttnTraits {
  using Element = Element_;
  static constexpr int kDk = kDk_;
  static constexpr int kDv = kDv_;
  static_assert(kDk % 64 == 0 && kDv % 64 == 0, "head dims must be multiples of 64");
  static_assert(kDv <= kDk, "sO reuses sQ");

  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  // Rows of a tile: flattened (token, query head of the group) pairs, 16 per warp.
  static constexpr int kBlockM = 16 * kWarps;
  // Keys per KV tile.
  static constexpr int kBlockN = 64;

  using MmaAtom = Sm80MmaAtom<Element>;
  // The warps split M; each warp computes 16 rows x all columns.
  using TiledMma = cute::TiledMMA<MmaAtom, cute::Layout<cute::Shape<cute::Int<kWarps>, cute::_1, cute::_1>>,
                                  cute::Tile<cute::Int<16 * kWarps>, cute::_16, cute::_16>>;

  // 64-element (128-byte) wide smem rows, XOR-swizzled in 16-byte chunks so that
  // ldmatrix and the 16-byte cp.async writes are bank-conflict free.
  using SmemAtom = decltype(cute::composition(
      cute::Swizzle<3, 3, 3>{},
      cute::Layout<cute::Shape<cute::_8, cute::_64>, cute::Stride<cute::_64, cute::_1>>{}));
  using SmemLayoutQ = decltype(cute::tile_to_shape(SmemAtom{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kDk>>{}));
  using SmemLayoutK = decltype(cute::tile_to_shape(SmemAtom{}, cute::Shape<cute::Int<kBlockN>, cute::Int<kDk>>{}));
  using SmemLayoutV = decltype(cute::tile_to_shape(SmemAtom{}, cute::Shape<cute::Int<kBlockN>, cute::Int<kDv>>{}));
  // V^T (Dv x kBlockN) as a view of sV: the B operand of O += P V.
  using SmemLayoutVt = decltype(cute::composition(
      SmemLayoutV{}, cute::make_layout(cute::Shape<cute::Int<kDv>, cute::Int<kBlockN>>{}, cute::GenRowMajor{})));
  using SmemLayoutVtNoSwizzle = decltype(cute::get_nonswizzle_portion(SmemLayoutVt{}));
  using SmemLayoutO = decltype(cute::tile_to_shape(SmemAtom{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kDv>>{}));

  using SmemCopyAtom = cute::Copy_Atom<cute::SM75_U32x4_LDSM_N, Element>;
  using SmemCopyAtomT = cute::Copy_Atom<cute::SM75_U16x8_LDSM_T, Element>;

  static constexpr int kSmemQ = kBlockM * kDk * int(sizeof(Element));
  static constexpr int kSmemK = kBlockN * kDk * int(sizeof(Element));
  static constexpr int kSmemV = kBlockN * kDv * int(sizeof(Element));
  static constexpr int kSmemAttn = kSmemQ + kSmemK + kSmemV;  // sO reuses sQ
};

}  // namespace nsa::cuda
