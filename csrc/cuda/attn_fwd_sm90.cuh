// The Hopper (sm_90a) attention forward of the compressed and window branches:
// the mainloop of attn_fwd.cuh with warpgroup MMAs (wgmma.mma_async) in place of
// mma.sync. A CTA is two warpgroups (8 warps) owning kBlockM = 128 flattened
// (token, head of the group) rows, 64 per warpgroup (the M of one wgmma):
//   S = Q K^T   wgmma m64n64k16, Q from registers (copied from smem once), K from
//               smem (K-major, 128-byte swizzle)
//   O += P V    wgmma m64n{Dv}k16, P from registers, V^T from smem (MN-major)
// The KV schedules, the masks, the online softmax and the epilogue are the SM80
// kernel's. The selected branch stays on mma.sync: its CTA visits the union of its
// tokens' blocks and each warp votes itself out of the tiles none of its rows chose
// (warp_sees_tile), which a warpgroup-wide MMA cannot do.
//
// Tile j's Q K^T and tile j-1's P V go out as two wgmma groups, so the mask and
// softmax of tile j run on the CUDA cores while the tensor cores finish P V.
// Q, K and V arrive by cp.async (Q rows are gathered across the group's heads); each
// thread makes its copies visible to the async proxy that wgmma reads through
// (fence.proxy.async) before the barrier that publishes them.
#pragma once

#include <cute/atom/mma_traits_sm90_gmma.hpp>

#include "cuda/attn_fwd.cuh"  // launch_attn_fwd, shared by both kernel families
#include "cuda/attn_traits.cuh"
#include "cuda/query_tile.cuh"
#include "cuda/softmax.cuh"

namespace nsa::cuda {

// The wgmma kernel body exists in the sm_90a pass (and on the host / emulator); the
// sm_80 pass of a multi-arch build compiles an empty kernel that is never launched.
#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(NSA_CUDA_EMULATION)
#define NSA_SM90_KERNEL_BODY 1
#else
#define NSA_SM90_KERNEL_BODY 0
#endif

// kWarpgroups warpgroups of 64 rows each share every K/V tile: with two (the
// default, 128 rows as FlashAttention's Hopper and Ampere forwards use) each tile
// loaded from L2 serves twice the rows of the SM80 kernels' 64, which halves the
// K/V traffic of the compressed branch (at 64k on the paper shape about 84 GB of
// tile loads with 64 rows).
template <int kDk_, int kDv_, class Element_, int kWarpgroups_ = 2, int kBlockN_ = 64>
struct AttnTraitsSm90 {
  using Element = Element_;
  static constexpr int kDk = kDk_;
  static constexpr int kDv = kDv_;
  static_assert(kDk % 64 == 0 && kDv % 64 == 0 && kDv <= 128, "head dims: multiples of 64, Dv <= 128");
  static_assert(kDv <= kDk, "sO reuses sQ");

  static constexpr int kWarpgroups = kWarpgroups_;
  static constexpr int kWarps = 4 * kWarpgroups;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlockM = 64 * kWarpgroups;  // warpgroup w owns rows 64w .. 64w + 63
  static constexpr int kBlockN = kBlockN_;  // keys per KV tile

  using WarpgroupLayout = cute::Layout<cute::Shape<cute::Int<kWarpgroups>, cute::_1, cute::_1>>;
  // S = Q K^T with both operands in smem (the dq kernel's S and dP, whose registers
  // hold dQ; the emulator's wgmma self-test).
  using TiledMmaS = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, float,
                                 cute::Shape<cute::_64, cute::Int<kBlockN>, cute::Int<kDk>>>(),
      WarpgroupLayout{}));
  // S = Q K^T with Q in registers (read once from smem): only K then streams from
  // smem. With both operands in smem an m64n64k16 wgmma reads 4 KB per 32 tensor-core
  // cycles, all of the SM's shared-memory bandwidth; the forward's per-tile smem
  // traffic at Dk = 192 (S and P V of both warpgroups plus the K/V copies) came to
  // about 1320 cycles against 1280 of tensor-core work, about 960 with Q in registers.
  using TiledMmaSrs = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<Element, Element, float,
                                 cute::Shape<cute::_64, cute::Int<kBlockN>, cute::Int<kDk>>>(),
      WarpgroupLayout{}));
  using TiledMmaO = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<Element, Element, float,
                                 cute::Shape<cute::_64, cute::Int<kDv>, cute::Int<kBlockN>>,
                                 cute::GMMA::Major::K, cute::GMMA::Major::MN>(),
      WarpgroupLayout{}));

  // 8 rows x 64 elements (128 bytes) with the 128-byte swizzle: the same bytes as
  // the SM80 kernels' Swizzle<3,3,3> atom, spelled so that make_gmma_desc reads it.
  using SmemAtom = cute::GMMA::Layout_K_SW128_Atom<Element>;
  using SmemLayoutQ = decltype(cute::tile_to_shape(SmemAtom{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kDk>>{}));
  using SmemLayoutK = decltype(cute::tile_to_shape(SmemAtom{}, cute::Shape<cute::Int<kBlockN>, cute::Int<kDk>>{}));
  using SmemLayoutV = decltype(cute::tile_to_shape(SmemAtom{}, cute::Shape<cute::Int<kBlockN>, cute::Int<kDv>>{}));
  // V^T (Dv x kBlockN) as a view of sV: the MN-major B operand of O += P V.
  using SmemLayoutVt = decltype(cute::composition(
      SmemLayoutV{}, cute::make_layout(cute::Shape<cute::Int<kDv>, cute::Int<kBlockN>>{}, cute::GenRowMajor{})));
  using SmemLayoutO = decltype(cute::tile_to_shape(SmemAtom{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kDv>>{}));

  static constexpr int kSmemQ = kBlockM * kDk * int(sizeof(Element));
  static constexpr int kSmemK = kBlockN * kDk * int(sizeof(Element));
  static constexpr int kSmemV = kBlockN * kDv * int(sizeof(Element));
  static_assert(kSmemQ % 1024 == 0 && kSmemK % 1024 == 0 && kSmemV % 1024 == 0,
                "swizzle atoms stay 1024-byte aligned");
  // The forward's smem: Q, K and two V buffers (sO reuses sQ).
  static constexpr int kSmemAttn = kSmemQ + kSmemK + 2 * kSmemV;
};

// wgmma accumulator ((2, 2, N/8), MMA_M, MMA_N) -> (rows=(2, MMA_M), cols=((2, N/8), MMA_N)):
// values 0,1 share a row, 2,3 are 8 rows further, then the next 8 columns.
template <class Layout>
CUTE_HOST_DEVICE auto gmma_acc_rowcol(Layout acc) {
  using namespace cute;
  static_assert(decltype(rank(acc))::value == 3);
  static_assert(decltype(rank<0>(acc))::value == 3);
  return make_layout(make_layout(get<0, 1>(acc), get<1>(acc)),
                     make_layout(make_layout(get<0, 0>(acc), get<0, 2>(acc)), get<2>(acc)));
}

// wgmma accumulator ((2, 2, N/8), MMA_M, MMA_N) -> the register A operand of a
// k16 wgmma, ((2, 2, 2), MMA_M, N/16 * MMA_N): columns 16j..16j+15 are the n8
// tiles 2j and 2j+1, in the order the A fragment wants.
template <class Layout>
CUTE_HOST_DEVICE auto gmma_acc_as_a_operand(Layout acc) {
  using namespace cute;
  static_assert(decltype(rank<0>(acc))::value == 3);
  auto l = logical_divide(get<0>(acc), Shape<Underscore, Underscore, _2>{});  // (2, 2, (2, N/16))
  return make_layout(make_layout(get<0>(l), get<1>(l), get<2, 0>(l)), get<1>(acc),
                     coalesce(make_layout(get<2, 1>(l), get<2>(acc))));
}

// acc (+)= A B over the k blocks, issued as one wgmma group (committed, not waited
// for: the caller waits with warpgroup_wait and then fences acc with
// warpgroup_fence_operand before touching it). With kZeroInit the first k block
// overwrites acc.
template <bool kZeroInit, class TiledMma, class TA, class TB, class TC>
__device__ __forceinline__ void gemm_wgmma_issue(TiledMma& mma, TA& tA, TB& tB, TC& tC) {
  using namespace cute;
  // A from registers (RS) or, like B, smem descriptors (SS).
  constexpr bool kARegs = !is_same_v<typename TA::engine_type::iterator, GMMA::DescriptorIterator>;
  warpgroup_fence_operand(tC);
  if constexpr (kARegs) warpgroup_fence_operand(tA);
  warpgroup_arrive();
  if constexpr (kZeroInit) mma.accumulate_ = GMMA::ScaleOut::Zero;
#pragma unroll
  for (int kb = 0; kb < size<2>(tA); ++kb) {
    cute::gemm(mma, tA(_, _, kb), tB(_, _, kb), tC);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
}

// The same, waited for.
template <bool kZeroInit, class TiledMma, class TA, class TB, class TC>
__device__ __forceinline__ void gemm_wgmma(TiledMma& mma, TA& tA, TB& tB, TC& tC) {
  using namespace cute;
  gemm_wgmma_issue<kZeroInit>(mma, tA, tB, tC);
  warpgroup_wait<0>();
  warpgroup_fence_operand(tC);
  if constexpr (!is_same_v<typename TA::engine_type::iterator, GMMA::DescriptorIterator>)
    warpgroup_fence_operand(tA);
}

// This thread's shared-memory writes (cp.async landed, plain stores) become visible
// to the async proxy, through which wgmma reads its smem operands.
__device__ __forceinline__ void fence_smem_for_wgmma() {
#if defined(__CUDA_ARCH__) && !defined(NSA_CUDA_EMULATION)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

template <class Traits, class Schedule>
__global__ void __launch_bounds__(Traits::kThreads)
    attn_fwd_sm90_kernel(const AttnFwdParams p) {
#if NSA_SM90_KERNEL_BODY
  using namespace cute;
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kDk = Traits::kDk;
  constexpr int kDv = Traits::kDv;
  constexpr int kThreads = Traits::kThreads;

  // The 128-byte swizzle is a function of the shared address: the tiles must start
  // 1024-byte aligned, which the dynamic smem base is.
  extern __shared__ __align__(1024) char smem[];
  const int tid = threadIdx.x;
  const int hkv = blockIdx.y;
  QueryTile qt;
  if (!query_tile<Schedule>(p, kBlockM, qt)) return;
  const SeqInfo& si = qt.si;

  Element* smem_q = reinterpret_cast<Element*>(smem);
  Element* smem_k = reinterpret_cast<Element*>(smem + Traits::kSmemQ);
  // V is double-buffered: tile j's V lands while tile j-1's P V runs.
  auto smem_v = [&](int stage) {
    return reinterpret_cast<Element*>(smem + Traits::kSmemQ + Traits::kSmemK + stage * Traits::kSmemV);
  };
  Tensor sQ = make_tensor(make_smem_ptr(smem_q), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(smem_k), typename Traits::SmemLayoutK{});
  Tensor sO = make_tensor(make_smem_ptr(smem_q), typename Traits::SmemLayoutO{});  // after the mainloop
  char* smem_schedule = smem + Traits::kSmemAttn;

  const Element* q = static_cast<const Element*>(p.q) + si.batch * p.q_batch_stride;
  const Element* k = static_cast<const Element*>(p.k) + si.batch * p.k_batch_stride + hkv * p.k_head_stride;
  const Element* v = static_cast<const Element*>(p.v) + si.batch * p.v_batch_stride + hkv * p.v_head_stride;

  load_rows_async<kBlockM, kDk, kThreads>(
      sQ, [&](int r) { return qt.row(q, p.q_row_stride, p.q_head_stride, r); },
      static_cast<const Element*>(p.q), tid);
  cute::cp_async_fence();

  Schedule sched;
  sched.init(p, si, qt.t_lo, qt.t_hi, hkv, smem_schedule, tid);
  const int64_t key_row0 = sched.key_row0();

  typename Traits::TiledMmaSrs mma_s;
  typename Traits::TiledMmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(tid);
  auto thr_o = mma_o.get_thread_slice(tid);
  Tensor tSrQ = thr_s.partition_fragment_A(sQ);  // registers, filled once Q has landed
  Tensor tSsQ = thr_s.partition_A(sQ);
  Tensor tSrK = thr_s.partition_fragment_B(sK);
  auto v_operand = [&](auto stage) {  // V^T of a stage, the B operand of P V
    Tensor sVt = make_tensor(make_smem_ptr(smem_v(decltype(stage)::value)), typename Traits::SmemLayoutVt{});
    return thr_o.partition_fragment_B(sVt);
  };
  Tensor acc_o = partition_fragment_C(mma_o, Shape<Int<kBlockM>, Int<kDv>>{});
  clear(acc_o);
  Tensor acc_o_rc = make_tensor(acc_o.data(), gmma_acc_rowcol(acc_o.layout()));

  // (row, col) of each S accumulator element, in the rows x cols view.
  Tensor cS = make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor tScS = thr_s.partition_C(cS);
  Tensor tScS_rc = make_tensor(tScS.data(), gmma_acc_rowcol(tScS.layout()));
  constexpr int kRows = decltype(size<0>(tScS_rc))::value;
  int64_t row_t[kRows];
  bool row_ok[kRows];
  tile_row_tokens(qt, tScS_rc, row_t, row_ok);

  OnlineSoftmax<kRows> softmax;
  const float scale_log2 = float(p.scale) * kLog2e;

  // P of the last tile whose P V is still to issue (the A operand of that wgmma).
  Tensor acc_s = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor rP = make_tensor<Element>(acc_s.layout());
  Tensor tOrP = make_tensor(rP.data(), gmma_acc_as_a_operand(rP.layout()));

  KvTile tile;
  bool have = sched.next(tile);
  if (have) load_kv_tile<kBlockN, kDk, kThreads>(sK, k, p.k_row_stride, key_row0, tile, tid);
  cute::cp_async_fence();

  // Every wgmma below is issued and waited for on a path that does not branch in
  // between: ptxas serializes all of a kernel's wgmmas (C7518) when a group may still
  // be in flight where control flow joins. So the first tile (no P V pending yet) is
  // peeled off the loop, and every later step issues both groups unconditionally.
  //
  // Tile j (its V to buffer kStage): S_j = Q K_j^T and tile j-1's P V from the other
  // buffer go out as two wgmma groups, so that tile j's mask and softmax run on the
  // CUDA cores while the tensor cores finish P_{j-1} V_{j-1}. acc_o is rescaled for
  // tile j only after that P V has retired.
  auto step = [&](auto stage, auto first) {
    constexpr int kStage = decltype(stage)::value;
    constexpr bool kFirst = decltype(first)::value;
    cute::cp_async_wait<0>();
    fence_smem_for_wgmma();
    __syncthreads();  // K_j (and Q), V_{j-1} landed; every P_{j-2} V_{j-2} (buffer kStage) retired
    if constexpr (kFirst) cute::copy(tSsQ, tSrQ);
    {
      Tensor sV = make_tensor(make_smem_ptr(smem_v(kStage)), typename Traits::SmemLayoutV{});
      load_kv_tile<kBlockN, kDv, kThreads>(sV, v, p.v_row_stride, key_row0, tile, tid);
    }
    cute::cp_async_fence();

    gemm_wgmma_issue</*kZeroInit=*/true>(mma_s, tSrQ, tSrK, acc_s);
    if constexpr (!kFirst) {
      auto tOrVt = v_operand(Int<1 - kStage>{});
      gemm_wgmma_issue</*kZeroInit=*/false>(mma_o, tOrP, tOrVt, acc_o);
      warpgroup_wait<1>();  // S_j (the older group)
    } else {
      warpgroup_wait<0>();
    }
    warpgroup_fence_operand(acc_s);
    __syncthreads();  // every warpgroup's S_j retired: sK is free
    KvTile next_tile;
    const bool have_next = sched.next(next_tile);
    if (have_next) load_kv_tile<kBlockN, kDk, kThreads>(sK, k, p.k_row_stride, key_row0, next_tile, tid);
    cute::cp_async_fence();

    Tensor scores = make_tensor(acc_s.data(), gmma_acc_rowcol(acc_s.layout()));
    if (tile.need_mask) mask_scores(scores, tScS_rc, sched, tile, row_ok, row_t);
    float rescale[kRows];
    softmax.update_scores(scores, scale_log2, rescale);
    if constexpr (!kFirst) {
      warpgroup_wait<0>();  // P_{j-1} V_{j-1}: acc_o is complete and rP is free
      warpgroup_fence_operand(acc_o);
      warpgroup_fence_operand(rP);
      softmax.rescale_o(acc_o_rc, rescale);
    }
    convert_fragment(acc_s, rP);
    tile = next_tile;
    have = have_next;
  };
  if (have) {
    step(_0{}, cute::true_type{});
    int last_stage = 0;  // the buffer of the last tile's V
    while (have) {
      step(_1{}, cute::false_type{});
      last_stage = 1;
      if (!have) break;
      step(_0{}, cute::false_type{});
      last_stage = 0;
    }
    // The last tile's P V.
    cute::cp_async_wait<0>();
    fence_smem_for_wgmma();
    __syncthreads();  // its V landed
    if (last_stage == 0) {
      auto tOrVt = v_operand(_0{});
      gemm_wgmma</*kZeroInit=*/false>(mma_o, tOrP, tOrVt, acc_o);
    } else {
      auto tOrVt = v_operand(_1{});
      gemm_wgmma</*kZeroInit=*/false>(mma_o, tOrP, tOrVt, acc_o);
    }
  }

  // Epilogue: as the SM80 kernel's (store_acc_rows waits for every thread first).
  float lse[kRows];
  softmax.finalize(acc_o_rc, float(p.scale), lse);
  store_lse_rows(p, qt, tScS_rc, row_ok, row_t, lse, tid);
  Element* o = static_cast<Element*>(p.o) + si.batch * p.o_batch_stride;
  store_acc_rows<kBlockM, kDv, kThreads, Element>(
      acc_o, sO, thr_o, tid, [&](int r) { return qt.row(o, p.o_row_stride, p.o_head_stride, r); });
#endif  // NSA_SM90_KERNEL_BODY
}

template <int kDk, int kDv, DType kDType>
void run_attn_fwd_sm90(const AttnFwdParams& p, cudaStream_t stream) {
  using Traits = AttnTraitsSm90<kDk, kDv, typename ElementOf<kDType>::type>;
  switch (p.branch) {
    case Branch::kCompressed: {
      using S = CompressedSchedule<Traits::kBlockN>;
      launch_attn_fwd<Traits, S>(p, stream, "compressed_attn_fwd (sm90)", attn_fwd_sm90_kernel<Traits, S>);
      break;
    }
    case Branch::kWindow: {
      using S = WindowSchedule<Traits::kBlockN>;
      launch_attn_fwd<Traits, S>(p, stream, "window_attn_fwd (sm90)", attn_fwd_sm90_kernel<Traits, S>);
      break;
    }
    case Branch::kSelected:
      throw std::runtime_error("nsa_cuda: selected_attn_fwd has no sm90 (wgmma) kernel");
  }
}

}  // namespace nsa::cuda
