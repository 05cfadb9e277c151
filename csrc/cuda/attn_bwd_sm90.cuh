// The Hopper (sm_90a) backward kernels, warpgroup MMAs in place of mma.sync
// (attn_bwd.cuh's run_attn_bwd picks them):
// 1. dq of the compressed and window branches. Dk <= 128: the query-side loop of
//    attn_bwd_dq_kernel on the forward's Hopper tiling (attn_fwd_sm90.cuh: two
//    warpgroups, 128 rows; 64 keys per tile, 32 for Dk >= 128):
//      S  = Q K^T     wgmma SS (Q, K K-major)
//      dP = dO V^T    wgmma SS (dO, V K-major), issued in the same group as S
//      dQ += dS K     wgmma RS (dS from registers, K^T MN-major), N = Dk
//    K and V tiles have three stages: tile j+1's cp.async and tile j-1's dQ GEMM run
//    under tile j's S and dP, and dS_j is computed while dS_{j-1} K_{j-1} finishes.
//    Dk = 192: two warpgroups per 64 rows split dQ by columns (AttnBwdDqPairTraitsSm90).
// 2. dk/dv of all three branches: the KV-side loop of attn_bwd_dkdv_kernel (the same
//    query schedules, row data and epilogue), pipelined the same way over three
//    stages of Q / dO tiles. Dk = 64: one warpgroup per 64 keys (AttnBwdDkvTraitsSm90);
//    Dk >= 128: two warpgroups per 64 keys, one per accumulator (AttnBwdDkvPairTraitsSm90).
// Nothing is in flight where control flow joins, so ptxas keeps the wgmmas async.
// The selected branch's dq stays on mma.sync: like its forward, a CTA visits the
// union of its tokens' blocks with a per-warp skip.
#pragma once

#include "cuda/attn_bwd.cuh"
#include "cuda/attn_fwd_sm90.cuh"

namespace nsa::cuda {

// The backward kernels' smem tiles: 64-element wide rows with the 128-byte swizzle
// (K-major operands), and their transposes (the MN-major B operands of dV and dK).
template <class Element>
struct DkvTilesSm90 {
  using SmemAtom = cute::GMMA::Layout_K_SW128_Atom<Element>;
  template <int kRows, int kCols>
  using Tile = decltype(cute::tile_to_shape(SmemAtom{}, cute::Shape<cute::Int<kRows>, cute::Int<kCols>>{}));
  template <int kRows, int kCols>
  using TileT = decltype(cute::composition(
      Tile<kRows, kCols>{}, cute::make_layout(cute::Shape<cute::Int<kCols>, cute::Int<kRows>>{}, cute::GenRowMajor{})));
};

// The backward kernels' step loop over three pipeline stages: step(i, stage, first)
// with the stage i % 3 a compile-time constant, the first step (nothing pending yet)
// peeled off so that no wgmma group is in flight where control flow joins (ptxas
// would serialize every wgmma of the kernel). Returns the stage of the last step
// (-1: none), for the GEMMs it left pending (with_stage).
template <class Step>
__device__ __forceinline__ int run_three_stage_steps(int64_t steps, Step&& step) {
  using namespace cute;
  if (steps <= 0) return -1;
  step(int64_t(0), _0{}, true_type{});
  int last_stage = 0;
  for (int64_t i = 1; i < steps; i += 3) {
    step(i, _1{}, false_type{});
    last_stage = 1;
    if (i + 1 >= steps) break;
    step(i + 1, _2{}, false_type{});
    last_stage = 2;
    if (i + 2 >= steps) break;
    step(i + 2, _0{}, false_type{});
    last_stage = 0;
  }
  return last_stage;
}

// f(stage) with stage 0, 1 or 2 as a compile-time constant (nothing for -1).
template <class F>
__device__ __forceinline__ void with_stage(int stage, F&& f) {
  if (stage == 0) f(cute::_0{});
  else if (stage == 1) f(cute::_1{});
  else if (stage == 2) f(cute::_2{});
}

// A warpgroup keeps a 64 x Dk fp32 dQ accumulator next to the S and dP tiles: for
// Dk >= 128 the KV tiles have 32 keys (as the SM80 dq kernel's) so that the S and
// dP accumulators halve and nothing spills (hdim 192 with 64 keys: 255 registers and
// 0.5 KB of spills).
template <int kDk_, int kDv_, class Element_>
struct AttnBwdDqTraitsSm90 : AttnTraitsSm90<kDk_, kDv_, Element_, 2, (kDk_ >= 128 ? 32 : 64)> {
  using Base = AttnTraitsSm90<kDk_, kDv_, Element_, 2, (kDk_ >= 128 ? 32 : 64)>;
  static constexpr bool kPaired = false;
  using typename Base::Element;
  using typename Base::WarpgroupLayout;
  using Base::kBlockM;
  using Base::kBlockN;
  using Base::kDk;
  using Base::kDv;
  // S = Q K^T and dP = dO V^T. At Dk = 64 Q and dO fit in registers next to dQ (245
  // registers, no spill; at 128 they spill in the loop): RS, so that the two GEMMs
  // stream only K and V from smem (an SS m64n64k16 reads 4 KB per 32 tensor-core
  // cycles, all of the SM's shared-memory bandwidth). Otherwise both from smem.
  static constexpr bool kQdOInRegisters = kDk == 64;
  using TiledMmaQdO = std::conditional_t<kQdOInRegisters, typename Base::TiledMmaSrs, typename Base::TiledMmaS>;
  // dQ += dS K: N = Dk (up to 192), K^T through a transposed view of sK.
  using TiledMmaDq = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<Element, Element, float,
                                 cute::Shape<cute::_64, cute::Int<kDk>, cute::Int<kBlockN>>,
                                 cute::GMMA::Major::K, cute::GMMA::Major::MN>(),
      WarpgroupLayout{}));
  using SmemLayoutKt = decltype(cute::composition(
      typename Base::SmemLayoutK{},
      cute::make_layout(cute::Shape<cute::Int<kDk>, cute::Int<kBlockN>>{}, cute::GenRowMajor{})));
  using SmemLayoutDo = typename Base::SmemLayoutO;  // kBlockM x Dv

  // Smem: Q and dO (kBlockM rows), then three stages of (K, V) tiles: tile j's
  // GEMMs, tile j-1's dQ GEMM (still running) and tile j+1's copies.
  static constexpr int kStages = 3;
  static constexpr int kSmemDo = kBlockM * kDv * int(sizeof(Element));
  static constexpr int kSmemStage = Base::kSmemK + Base::kSmemV;
  static_assert(kSmemDo % 1024 == 0 && kSmemStage % 1024 == 0, "swizzle atoms stay 1024-byte aligned");
  static constexpr int kOffStages = Base::kSmemQ + kSmemDo;
  static constexpr int kSmemTiles = kOffStages + kStages * kSmemStage;
};

// The opening of both Hopper dq kernels: the varlen padding rows, the CTA's query
// tile, its Q and dO rows into smem (cp.async, committed), the KV schedule; then the
// smem of Q, dO and the K/V stages (Traits: kSmemQ, kOffStages, kSmemStage, kSmemK,
// kSmemTiles, the layouts).
template <class Traits, class Schedule>
struct DqCtaSm90 {
  using Element = typename Traits::Element;
  char* smem = nullptr;
  QueryTile qt;
  Schedule sched;
  const Element* k = nullptr;
  const Element* v = nullptr;
  int64_t key_row0 = 0;

  // false: nothing more for this CTA (it wrote padding rows, or has no query tile).
  __device__ __forceinline__ bool open(const AttnBwdParams& p, const AttnBwdWorkspace& ws, char* smem_, int tid) {
    smem = smem_;
    if (dq_padding_rows<Traits::kDk, Element>(p, ws)) return false;
    if (!query_tile<Schedule>(p, Traits::kBlockM, qt)) return false;
    const SeqInfo& si = qt.si;
    const int hkv = blockIdx.y;
    k = static_cast<const Element*>(p.k) + si.batch * p.k_batch_stride + hkv * p.k_head_stride;
    v = static_cast<const Element*>(p.v) + si.batch * p.v_batch_stride + hkv * p.v_head_stride;
    auto sQ = q_tile();
    auto sdO = do_tile();
    load_dq_query_tiles<Traits::kBlockM, Traits::kDk, Traits::kDv, Traits::kThreads, Element>(p, qt, sQ, sdO,
                                                                                               tid);
    cute::cp_async_fence();
    sched.init(p, si, qt.t_lo, qt.t_hi, hkv, smem + Traits::kSmemTiles, tid);
    key_row0 = sched.key_row0();
    return true;
  }
  __device__ __forceinline__ Element* q() const { return reinterpret_cast<Element*>(smem); }
  __device__ __forceinline__ auto q_tile() const {
    return cute::make_tensor(cute::make_smem_ptr(q()), typename Traits::SmemLayoutQ{});
  }
  __device__ __forceinline__ auto do_tile() const {
    return cute::make_tensor(cute::make_smem_ptr(reinterpret_cast<Element*>(smem + Traits::kSmemQ)),
                             typename Traits::SmemLayoutDo{});
  }
  __device__ __forceinline__ Element* stage_k(int s) const {
    return reinterpret_cast<Element*>(smem + Traits::kOffStages + s * Traits::kSmemStage);
  }
  __device__ __forceinline__ Element* stage_v(int s) const {
    return stage_k(s) + Traits::kSmemK / int(sizeof(Element));
  }
  // The K and V rows of `tile` into stage s.
  __device__ __forceinline__ void load_kv(const AttnBwdParams& p, int s, const KvTile& tile, int tid) const {
    auto sK = cute::make_tensor(cute::make_smem_ptr(stage_k(s)), typename Traits::SmemLayoutK{});
    auto sV = cute::make_tensor(cute::make_smem_ptr(stage_v(s)), typename Traits::SmemLayoutV{});
    load_kv_tile<Traits::kBlockN, Traits::kDk, Traits::kThreads>(sK, k, p.k_row_stride, key_row0, tile, tid);
    load_kv_tile<Traits::kBlockN, Traits::kDv, Traits::kThreads>(sV, v, p.v_row_stride, key_row0, tile, tid);
  }
};

template <class Traits, class Schedule>
__global__ void __launch_bounds__(Traits::kThreads)
    attn_bwd_dq_sm90_kernel(const AttnBwdParams p, const AttnBwdWorkspace ws) {
#if NSA_SM90_KERNEL_BODY
  using namespace cute;
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kDk = Traits::kDk;
  constexpr int kDv = Traits::kDv;
  constexpr int kThreads = Traits::kThreads;

  extern __shared__ __align__(1024) char smem[];
  const int tid = threadIdx.x;
  DqCtaSm90<Traits, Schedule> cta;
  if (!cta.open(p, ws, smem, tid)) return;
  const QueryTile& qt = cta.qt;
  Schedule& sched = cta.sched;
  Tensor sQ = cta.q_tile();
  Tensor sdO = cta.do_tile();

  typename Traits::TiledMmaQdO mma_s;  // S and dP: both 64 x kBlockN tiles, K-major operands
  typename Traits::TiledMmaDq mma_dq;
  auto thr_s = mma_s.get_thread_slice(tid);
  auto thr_dq = mma_dq.get_thread_slice(tid);
  Tensor tSrQ = thr_s.partition_fragment_A(sQ);  // registers (kQdOInRegisters) or smem descriptors
  Tensor tdPrdO = thr_s.partition_fragment_A(sdO);
  // The stages' operand descriptors (the stage is a compile-time constant below).
  auto k_operands = [&](auto stage) {
    constexpr int s = decltype(stage)::value;
    Tensor sK = make_tensor(make_smem_ptr(cta.stage_k(s)), typename Traits::SmemLayoutK{});
    Tensor sV = make_tensor(make_smem_ptr(cta.stage_v(s)), typename Traits::SmemLayoutV{});
    Tensor sKt = make_tensor(make_smem_ptr(cta.stage_k(s)), typename Traits::SmemLayoutKt{});
    return cute::make_tuple(thr_s.partition_fragment_B(sK), thr_s.partition_fragment_B(sV),
                            thr_dq.partition_fragment_B(sKt));
  };
  Tensor acc_dq = partition_fragment_C(mma_dq, Shape<Int<kBlockM>, Int<kDk>>{});
  clear(acc_dq);

  Tensor cS = make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor tScS = thr_s.partition_C(cS);
  Tensor tScS_rc = make_tensor(tScS.data(), gmma_acc_rowcol(tScS.layout()));
  const DqRows<decltype(size<0>(tScS_rc))::value> rows(p, ws, qt, tScS_rc);
  const float scale_log2 = float(p.scale) * kLog2e;

  auto load_kv = [&](auto stage, const KvTile& tile) { cta.load_kv(p, decltype(stage)::value, tile, tid); };

  // dS of the tile whose dQ GEMM is still to issue (its A operand).
  Tensor rdS = make_tensor<Element>(partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{}).layout());
  Tensor tdQrdS = make_tensor(rdS.data(), gmma_acc_as_a_operand(rdS.layout()));

  // Tile j in stage kStage: S_j and dP_j (two wgmma groups) and, with tile j-1
  // pending, its dQ GEMM from the previous stage (a third group), so that dS_j is
  // computed on the CUDA cores while the tensor cores finish dS_{j-1} K_{j-1}.
  // As in the forward, the first tile (no dQ GEMM pending) is peeled off the loop so
  // that no wgmma group is in flight where control flow joins (ptxas would serialize
  // every wgmma of the kernel).
  KvTile tile;
  bool have = sched.next(tile);
  auto run_tile = [&](auto stage, auto first) {
    constexpr int kStage = decltype(stage)::value;
    constexpr bool kFirst = decltype(first)::value;
    constexpr int kPrev = (kStage + Traits::kStages - 1) % Traits::kStages;
    constexpr int kNext = (kStage + 1) % Traits::kStages;
    KvTile next_tile;
    const bool have_next = sched.next(next_tile);
    cute::cp_async_wait<0>();
    fence_smem_for_wgmma();
    __syncthreads();  // tile j (and Q, dO) landed; every GEMM on stage kNext (tile j-2) retired
    if constexpr (kFirst && Traits::kQdOInRegisters) {
      cute::copy(thr_s.partition_A(sQ), tSrQ);
      cute::copy(thr_s.partition_A(sdO), tdPrdO);
    }
    if (have_next) load_kv(Int<kNext>{}, next_tile);
    cute::cp_async_fence();

    auto ops = k_operands(stage);
    Tensor acc_s = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
    Tensor acc_dp = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
    gemm_wgmma_issue</*kZeroInit=*/true>(mma_s, tSrQ, get<0>(ops), acc_s);
    gemm_wgmma_issue</*kZeroInit=*/true>(mma_s, tdPrdO, get<1>(ops), acc_dp);
    if constexpr (!kFirst) {
      auto prev = k_operands(Int<kPrev>{});
      gemm_wgmma_issue</*kZeroInit=*/false>(mma_dq, tdQrdS, get<2>(prev), acc_dq);
      warpgroup_wait<1>();  // S_j and dP_j (the older groups)
    } else {
      warpgroup_wait<0>();
    }
    warpgroup_fence_operand(acc_s);
    warpgroup_fence_operand(acc_dp);

    Tensor scores = make_tensor(acc_s.data(), gmma_acc_rowcol(acc_s.layout()));
    Tensor dscores = make_tensor(acc_dp.data(), gmma_acc_rowcol(acc_dp.layout()));
    dq_tile_dscores(acc_s, scores, dscores, tScS_rc, sched, tile, rows, scale_log2);
    if constexpr (!kFirst) {
      warpgroup_wait<0>();  // dS_{j-1} K_{j-1}: rdS is free
      warpgroup_fence_operand(acc_dq);
      warpgroup_fence_operand(rdS);
    }
    convert_fragment(acc_dp, rdS);
    tile = next_tile;
    have = have_next;
  };
  if (have) load_kv(_0{}, tile);
  cute::cp_async_fence();
  if (have) {
    run_tile(_0{}, cute::true_type{});
    int last_stage = 0;
    while (have) {
      run_tile(_1{}, cute::false_type{});
      last_stage = 1;
      if (!have) break;
      run_tile(_2{}, cute::false_type{});
      last_stage = 2;
      if (!have) break;
      run_tile(_0{}, cute::false_type{});
      last_stage = 0;
    }
    // The last tile's dQ GEMM (its K landed at its step's barrier).
    auto last_dq = [&](auto stage) {
      auto ops = k_operands(stage);
      gemm_wgmma</*kZeroInit=*/false>(mma_dq, tdQrdS, get<2>(ops), acc_dq);
    };
    if (last_stage == 0) last_dq(_0{});
    else if (last_stage == 1) last_dq(_1{});
    else last_dq(_2{});
  }

  store_dq_rows<kBlockM, kDk, kThreads, Element>(p, qt, acc_dq, sQ, thr_dq, tid);
#endif  // NSA_SM90_KERNEL_BODY
}

// dq for Dk = 192: two warpgroups share 64 query rows and each KV tile of 64 keys,
// and split dQ by columns, so that neither holds the whole 64 x 192 fp32 accumulator
// next to the S and dP tiles (one warpgroup doing all of it spills):
//   P side  (warpgroup 0): S = Q K^T (SS); P = exp(scale S - lse), masked, to smem in
//                          fp32; dQ[:, 128:] += dS K[:, 128:] (SS, dS from smem)
//   dS side (warpgroup 1): dP = dO V^T (SS); dS = P (g dP - delta), P from smem; dS to
//                          smem (bf16); dQ[:, :128] += dS K[:, :128] (RS)
// Per tile each side does 64 * 64 * (Dk + Dv) / 2 multiply-adds (192 + 64 = 128 + 128
// for (192, 128)). Each side defers its dQ GEMM to the next tile, under that tile's S
// or dP, so the K/V tiles have three stages. Two barriers per tile: A (the tile
// landed; the last dS written, made visible to the async proxy; the last P read) and
// B (this tile's P written; the last dQ GEMM on the P side retired, so dS may be
// overwritten). P and dS cross in accumulator order; the math is the one-warpgroup
// kernel's.
template <int kDk_, int kDv_, class Element_>
struct AttnBwdDqPairTraitsSm90 : DkvTilesSm90<Element_> {
  using Element = Element_;
  static constexpr int kDk = kDk_;
  static constexpr int kDv = kDv_;
  static constexpr bool kPaired = true;
  static constexpr int kThreads = 256;  // the P side, then the dS side
  static constexpr int kBlockM = 64;    // query rows of the CTA
  static constexpr int kBlockN = 64;    // keys per KV tile
  static constexpr int kDqLo = 128;     // dQ columns of the dS side; the P side has the rest
  static constexpr int kDqHi = kDk - kDqLo;
  static_assert(kDqHi > 0 && kDqHi % 64 == 0, "the column split falls on 64-column smem atoms");

  using OneWarpgroup = cute::Layout<cute::Shape<cute::_1, cute::_1, cute::_1>>;
  using TiledMmaS = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, float,
                                 cute::Shape<cute::_64, cute::Int<kBlockN>, cute::Int<kDk>>>(),
      OneWarpgroup{}));
  using TiledMmaDqHi = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, float, cute::Shape<cute::_64, cute::Int<kDqHi>, cute::Int<kBlockN>>,
                                 cute::GMMA::Major::K, cute::GMMA::Major::MN>(),
      OneWarpgroup{}));
  using TiledMmaDqLo = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<Element, Element, float, cute::Shape<cute::_64, cute::Int<kDqLo>, cute::Int<kBlockN>>,
                                 cute::GMMA::Major::K, cute::GMMA::Major::MN>(),
      OneWarpgroup{}));

  template <int kRows, int kCols>
  using Tile = typename DkvTilesSm90<Element>::template Tile<kRows, kCols>;
  template <int kRows, int kCols>
  using TileT = typename DkvTilesSm90<Element>::template TileT<kRows, kCols>;
  // A Tile's 64-column atom blocks lie one after the other (tile_to_shape orders the
  // 8 x 64 atoms down the rows first), so columns [128, Dk) of a K tile are a Tile of
  // their own at element offset kBlockN * 128.
  using SmemLayoutQ = Tile<kBlockM, kDk>;
  using SmemLayoutDo = Tile<kBlockM, kDv>;
  using SmemLayoutK = Tile<kBlockN, kDk>;
  using SmemLayoutV = Tile<kBlockN, kDv>;
  using SmemLayoutKtLo = TileT<kBlockN, kDqLo>;
  using SmemLayoutKtHi = TileT<kBlockN, kDqHi>;
  using SmemLayoutDs = Tile<kBlockM, kBlockN>;
  using SmemLayoutDqLo = Tile<kBlockM, kDqLo>;  // the epilogue's staging, over sQ
  using SmemLayoutDqHi = Tile<kBlockM, kDqHi>;

  static constexpr int kStages = 3;
  static constexpr int kSmemQ = kBlockM * kDk * int(sizeof(Element));
  static constexpr int kSmemDo = kBlockM * kDv * int(sizeof(Element));
  static constexpr int kSmemK = kBlockN * kDk * int(sizeof(Element));
  static constexpr int kSmemStage = kSmemK + kBlockN * kDv * int(sizeof(Element));
  static constexpr int kSmemP = kBlockM * kBlockN * 4;
  static constexpr int kSmemDs = kBlockM * kBlockN * int(sizeof(Element));
  static_assert(kSmemQ % 1024 == 0 && kSmemDo % 1024 == 0 && kSmemStage % 1024 == 0 && kSmemDs % 1024 == 0,
                "swizzle atoms stay 1024-byte aligned");
  static constexpr int kOffStages = kSmemQ + kSmemDo;
  static constexpr int kOffDs = kOffStages + kStages * kSmemStage;
  static constexpr int kOffP = kOffDs + kSmemDs;
  static constexpr int kSmemTiles = kOffP + kSmemP;  // (192, 128): 184 KB
};

template <class Traits, class Schedule>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    attn_bwd_dq_pair_sm90_kernel(const AttnBwdParams p, const AttnBwdWorkspace ws) {
#if NSA_SM90_KERNEL_BODY
  using namespace cute;
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kDk = Traits::kDk;
  constexpr int kDv = Traits::kDv;
  constexpr int kThreads = Traits::kThreads;
  constexpr int kStages = Traits::kStages;

  extern __shared__ __align__(1024) char smem[];
  const int tid = threadIdx.x;
  DqCtaSm90<Traits, Schedule> cta;
  if (!cta.open(p, ws, smem, tid)) return;
  const QueryTile& qt = cta.qt;
  Schedule& sched = cta.sched;
  Element* smem_q = cta.q();
  Tensor sQ = cta.q_tile();
  Tensor sdO = cta.do_tile();
  auto stage_k = [&](int s) { return cta.stage_k(s); };
  auto stage_v = [&](int s) { return cta.stage_v(s); };
  Tensor sdS = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem + Traits::kOffDs)),
                           typename Traits::SmemLayoutDs{});
  float2* sP = reinterpret_cast<float2*>(smem + Traits::kOffP);
  auto load_kv = [&](int s, const KvTile& tile) { cta.load_kv(p, s, tile, tid); };

  const int wg_tid = tid % 128;
  typename Traits::TiledMmaS mma_s;  // S and dP: 64 x kBlockN tiles, K-major operands
  auto thr_s = mma_s.get_thread_slice(wg_tid);
  Tensor tScS = thr_s.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor tScS_rc = make_tensor(tScS.data(), gmma_acc_rowcol(tScS.layout()));
  const DqRows<decltype(size<0>(tScS_rc))::value> rows(p, ws, qt, tScS_rc);
  using AccLayout = decltype(partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{}).layout());
  constexpr int kAcc = decltype(size(AccLayout{}))::value;
  const float scale_log2 = float(p.scale) * kLog2e;

  // Tile j in stage kStage, for every thread of both sides: barrier A, then tile
  // j + 1's copies into the stage that tile j - 2 used.
  KvTile tile;
  bool have = sched.next(tile);
  if (have) load_kv(0, tile);
  cute::cp_async_fence();
  auto open_tile = [&](auto stage) {
    constexpr int kNext = (decltype(stage)::value + 1) % kStages;
    KvTile next_tile;
    const bool have_next = sched.next(next_tile);
    cute::cp_async_wait<0>();
    fence_smem_for_wgmma();
    __syncthreads();
    if (have_next) load_kv(kNext, next_tile);
    cute::cp_async_fence();
    return cute::make_tuple(next_tile, have_next);
  };
  auto prev_stage = [](auto stage) { return Int<(decltype(stage)::value + kStages - 1) % kStages>{}; };
  // The tiles, the first peeled off (nothing pending yet), as in
  // run_three_stage_steps; returns the stage of the last tile (-1: none), whose dQ
  // GEMMs are still to issue, after one more barrier (the last tile's dS in smem).
  auto run_tiles = [&](auto&& step) __attribute__((always_inline)) {
    if (!have) return -1;
    step(_0{}, true_type{});
    int last_stage = 0;
    while (have) {
      step(_1{}, false_type{});
      last_stage = 1;
      if (!have) break;
      step(_2{}, false_type{});
      last_stage = 2;
      if (!have) break;
      step(_0{}, false_type{});
      last_stage = 0;
    }
    cute::cp_async_wait<0>();
    fence_smem_for_wgmma();
    __syncthreads();
    return last_stage;
  };

  // The side is the same for every thread of a warpgroup; the shuffle lets ptxas know
  // the branch does not diverge within a warp.
  if (__shfl_sync(0xffffffffu, tid / 128, 0) == 0) {
    // --- P side: S, P, dQ[:, 128:] from smem dS.
    typename Traits::TiledMmaDqHi mma_dq;
    auto thr_dq = mma_dq.get_thread_slice(wg_tid);
    Tensor tSrQ = thr_s.partition_fragment_A(sQ);
    Tensor tdQsdS = thr_dq.partition_fragment_A(sdS);
    auto kt_operand = [&](auto stage) {
      return thr_dq.partition_fragment_B(make_tensor(
          make_smem_ptr(stage_k(decltype(stage)::value) + kBlockN * Traits::kDqLo), typename Traits::SmemLayoutKtHi{}));
    };
    Tensor acc_dq = partition_fragment_C(mma_dq, Shape<Int<kBlockM>, Int<Traits::kDqHi>>{});
    clear(acc_dq);
    auto step = [&](auto stage, auto first) __attribute__((always_inline)) {
      auto [next_tile, have_next] = open_tile(stage);
      Tensor acc_s = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
      Tensor tSrK = thr_s.partition_fragment_B(
          make_tensor(make_smem_ptr(stage_k(decltype(stage)::value)), typename Traits::SmemLayoutK{}));
      gemm_wgmma_issue</*kZeroInit=*/true>(mma_s, tSrQ, tSrK, acc_s);
      if constexpr (!decltype(first)::value) {
        auto tdQrKt = kt_operand(prev_stage(stage));
        gemm_wgmma_issue</*kZeroInit=*/false>(mma_dq, tdQsdS, tdQrKt, acc_dq);
        warpgroup_wait<1>();  // S (the older group)
      } else {
        warpgroup_wait<0>();
      }
      warpgroup_fence_operand(acc_s);
      // Scaled before the mask, as the forward does (see dq_tile_dscores).
#pragma unroll
      for (int i = 0; i < kAcc; ++i) acc_s(i) *= scale_log2;
      Tensor scores = make_tensor(acc_s.data(), gmma_acc_rowcol(acc_s.layout()));
      if (tile.need_mask) mask_scores(scores, tScS_rc, sched, tile, rows.ok, rows.t);
#pragma unroll
      for (int mi = 0; mi < size<0>(scores); ++mi) {
#pragma unroll
        for (int ni = 0; ni < size<1>(scores); ++ni) scores(mi, ni) = exp2f(scores(mi, ni) - rows.lse2[mi]);
      }
#pragma unroll
      for (int j = 0; j < kAcc / 2; ++j) sP[j * 128 + wg_tid] = float2{acc_s(2 * j), acc_s(2 * j + 1)};
      if constexpr (!decltype(first)::value) {
        warpgroup_wait<0>();  // the last dQ GEMM: sdS may be overwritten
        warpgroup_fence_operand(acc_dq);
      }
      __syncthreads();  // barrier B
      tile = next_tile;
      have = have_next;
    };
    with_stage(run_tiles(step), [&](auto stage) {
      auto tdQrKt = kt_operand(stage);
      gemm_wgmma</*kZeroInit=*/false>(mma_dq, tdQsdS, tdQrKt, acc_dq);
    });
#pragma unroll
    for (int i = 0; i < size(acc_dq); ++i) acc_dq(i) *= float(p.scale);
    stage_acc<Element>(acc_dq,
                       make_tensor(make_smem_ptr(smem_q + kBlockM * Traits::kDqLo), typename Traits::SmemLayoutDqHi{}),
                       thr_dq);
  } else {
    // --- dS side: dP, dS, dQ[:, :128] from registers.
    typename Traits::TiledMmaDqLo mma_dq;
    auto thr_dq = mma_dq.get_thread_slice(wg_tid);
    Tensor tdPrdO = thr_s.partition_fragment_A(sdO);
    Tensor tsdS = thr_s.partition_C(sdS);
    auto kt_operand = [&](auto stage) {
      return thr_dq.partition_fragment_B(
          make_tensor(make_smem_ptr(stage_k(decltype(stage)::value)), typename Traits::SmemLayoutKtLo{}));
    };
    Tensor acc_dq = partition_fragment_C(mma_dq, Shape<Int<kBlockM>, Int<Traits::kDqLo>>{});
    clear(acc_dq);
    Tensor rdS = make_tensor<Element>(AccLayout{});  // dS of the tile whose dQ GEMM is pending
    Tensor tdQrdS = make_tensor(rdS.data(), gmma_acc_as_a_operand(rdS.layout()));
    auto step = [&](auto stage, auto first) __attribute__((always_inline)) {
      auto [next_tile, have_next] = open_tile(stage);
      Tensor acc_dp = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
      Tensor tdPrV = thr_s.partition_fragment_B(
          make_tensor(make_smem_ptr(stage_v(decltype(stage)::value)), typename Traits::SmemLayoutV{}));
      gemm_wgmma_issue</*kZeroInit=*/true>(mma_s, tdPrdO, tdPrV, acc_dp);
      if constexpr (!decltype(first)::value) {
        auto tdQrKt = kt_operand(prev_stage(stage));
        gemm_wgmma_issue</*kZeroInit=*/false>(mma_dq, tdQrdS, tdQrKt, acc_dq);
        warpgroup_wait<1>();  // dP (the older group)
      } else {
        warpgroup_wait<0>();
      }
      warpgroup_fence_operand(acc_dp);
      __syncthreads();  // barrier B: this tile's P is in smem, the last dS read
      if constexpr (!decltype(first)::value) {
        warpgroup_wait<0>();  // the last dQ GEMM: rdS is free
        warpgroup_fence_operand(acc_dq);
        warpgroup_fence_operand(rdS);
      }
      Tensor prob = make_tensor<float>(AccLayout{});
#pragma unroll
      for (int j = 0; j < kAcc / 2; ++j) {
        const float2 pr = sP[j * 128 + wg_tid];
        prob(2 * j) = pr.x;
        prob(2 * j + 1) = pr.y;
      }
      Tensor prob_rc = make_tensor(prob.data(), gmma_acc_rowcol(prob.layout()));
      Tensor dscores = make_tensor(acc_dp.data(), gmma_acc_rowcol(acc_dp.layout()));
#pragma unroll
      for (int mi = 0; mi < size<0>(dscores); ++mi) {
#pragma unroll
        for (int ni = 0; ni < size<1>(dscores); ++ni)
          dscores(mi, ni) = prob_rc(mi, ni) * (rows.scale[mi] * dscores(mi, ni) - rows.delta[mi]);
      }
      convert_fragment(acc_dp, rdS);
#pragma unroll
      for (int i = 0; i < kAcc; ++i) tsdS(i) = rdS(i);
      tile = next_tile;
      have = have_next;
    };
    with_stage(run_tiles(step), [&](auto stage) {
      auto tdQrKt = kt_operand(stage);
      gemm_wgmma</*kZeroInit=*/false>(mma_dq, tdQrdS, tdQrKt, acc_dq);
    });
#pragma unroll
    for (int i = 0; i < size(acc_dq); ++i) acc_dq(i) *= float(p.scale);
    stage_acc<Element>(acc_dq, make_tensor(make_smem_ptr(smem_q), typename Traits::SmemLayoutDqLo{}), thr_dq);
  }
  store_staged_dq_rows<kBlockM, kDk, kThreads, Element>(p, qt, sQ, tid);
#endif  // NSA_SM90_KERNEL_BODY
}

// The dk/dv kernels' smem: K and V (kBlockN keys), three stages of (Q, dO) tiles of
// kBlockM query rows (step i's S^T / dP^T, step i-1's dV / dK, step i+1's copies),
// kExtra bytes at kOffExtra, then three stages of row data (DkvRowData).
template <class Element, int kDk, int kDv, int kBlockN, int kBlockM, int kExtra = 0>
struct DkvSmemSm90 : DkvTilesSm90<Element> {
  template <int kRows, int kCols>
  using Tile = typename DkvTilesSm90<Element>::template Tile<kRows, kCols>;
  template <int kRows, int kCols>
  using TileT = typename DkvTilesSm90<Element>::template TileT<kRows, kCols>;
  using SmemLayoutK = Tile<kBlockN, kDk>;
  using SmemLayoutV = Tile<kBlockN, kDv>;
  using SmemLayoutQ = Tile<kBlockM, kDk>;
  using SmemLayoutDo = Tile<kBlockM, kDv>;
  using SmemLayoutQt = TileT<kBlockM, kDk>;
  using SmemLayoutDot = TileT<kBlockM, kDv>;

  static constexpr int kStages = 3;
  static constexpr int kSmemK = kBlockN * kDk * int(sizeof(Element));
  static constexpr int kSmemV = kBlockN * kDv * int(sizeof(Element));
  static constexpr int kSmemQ = kBlockM * kDk * int(sizeof(Element));
  static constexpr int kSmemStage = kSmemQ + kBlockM * kDv * int(sizeof(Element));
  static_assert(kSmemK % 1024 == 0 && kSmemV % 1024 == 0 && kSmemQ % 1024 == 0 && kSmemStage % 1024 == 0,
                "swizzle atoms stay 1024-byte aligned");
  static constexpr int kOffExtra = kSmemK + kSmemV + kStages * kSmemStage;
  static constexpr int kSmemTiles = kOffExtra + kExtra;
  static constexpr int kSmemRowData = DkvRowData::kWords * kBlockM * 4;
  static constexpr int kSmem = kSmemTiles + kStages * kSmemRowData;
};

// The stages of a dk/dv CTA (Traits: a DkvSmemSm90) and the copies into them, shared
// by every thread.
template <class Traits, class QSchedule>
struct DkvStagesSm90 {
  using Element = typename Traits::Element;
  char* smem;
  const DkvQueries<QSchedule>& qr;
  int64_t steps;
  int tid;

  __device__ __forceinline__ Element* q(int s) const {
    return reinterpret_cast<Element*>(smem + Traits::kSmemK + Traits::kSmemV + s * Traits::kSmemStage);
  }
  __device__ __forceinline__ Element* dout(int s) const {
    return reinterpret_cast<Element*>(smem + Traits::kSmemK + Traits::kSmemV + s * Traits::kSmemStage +
                                      Traits::kSmemQ);
  }
  __device__ __forceinline__ DkvRowData row_data(int s) const {
    return DkvRowData(smem + Traits::kSmemTiles + s * Traits::kSmemRowData, Traits::kBlockM);
  }
  __device__ __forceinline__ auto k_tile() const {
    return cute::make_tensor(cute::make_smem_ptr(reinterpret_cast<Element*>(smem)), typename Traits::SmemLayoutK{});
  }
  __device__ __forceinline__ auto v_tile() const {
    return cute::make_tensor(cute::make_smem_ptr(reinterpret_cast<Element*>(smem + Traits::kSmemK)),
                             typename Traits::SmemLayoutV{});
  }
  // Step `step`'s Q, dO and row data into stage s.
  __device__ __forceinline__ void load(int64_t step, int s) const {
    qr.template load_tiles<Traits::kBlockM, Traits::kDk, Traits::kDv, Traits::kThreads, Element>(
        step, cute::make_tensor(cute::make_smem_ptr(q(s)), typename Traits::SmemLayoutQ{}),
        cute::make_tensor(cute::make_smem_ptr(dout(s)), typename Traits::SmemLayoutDo{}), tid);
    cute::cp_async_fence();
    row_data(s).template fill<Traits::kBlockM>(qr, step, tid);
  }
  // The CTA's K and V, then step 0 into stage 0.
  __device__ __forceinline__ void load_first() const {
    auto sK = k_tile();
    auto sV = v_tile();
    load_dkv_key_tiles<Traits::kBlockN, Traits::kDk, Traits::kDv, Traits::kThreads, Element>(qr, sK, sV, tid);
    cute::cp_async_fence();
    if (steps > 0) load(0, 0);
    else cute::cp_async_fence();
  }
  // The opening of step `step`: the barrier after which its stage, its row data (and
  // K, V) have landed and every GEMM of step - 2 has retired, then step + 1 into its
  // stage. That stage is computed at run time, although the callers know it: then
  // ptxas keeps one set of swizzled smem offsets plus a base rather than three folded
  // sets of copy addresses (hdim 192 pair kernel: half the in-loop spill reloads;
  // hdim 128: no spill).
  __device__ __forceinline__ void open(int64_t step) const {
    cute::cp_async_wait<0>();
    fence_smem_for_wgmma();
    __syncthreads();
    if (step + 1 < steps) load(step + 1, int((step + 1) % Traits::kStages));
    else cute::cp_async_fence();
  }
};

// The dk/dv kernels' MMAs, per warpgroup layout: S^T = K Q^T and dP^T = V dO^T
// (both operands in smem, K-major) over kBlockM query rows, and the accumulating
// dK += dS^T Q, dV += P^T dO (the left operand from registers, the right MN-major).
template <class Element, int kDk, int kDv, int kBlockM, class WarpgroupLayout>
struct DkvMmasSm90 {
  using TiledMmaS = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, float,
                                 cute::Shape<cute::_64, cute::Int<kBlockM>, cute::Int<kDk>>>(),
      WarpgroupLayout{}));
  template <int kN>
  using TiledMmaAcc = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<Element, Element, float, cute::Shape<cute::_64, cute::Int<kN>, cute::Int<kBlockM>>,
                                 cute::GMMA::Major::K, cute::GMMA::Major::MN>(),
      WarpgroupLayout{}));
  using TiledMmaDk = TiledMmaAcc<kDk>;
  using TiledMmaDv = TiledMmaAcc<kDv>;
};

template <int kDk_, int kDv_, class Element_, int kWarpgroups_>
struct AttnBwdDkvTraitsSm90
    : DkvSmemSm90<Element_, kDk_, kDv_, 64 * kWarpgroups_, (kDk_ >= 192 ? 16 : kDk_ >= 128 ? 32 : 64)> {
  using Element = Element_;
  static constexpr int kDk = kDk_;
  static constexpr int kDv = kDv_;
  static constexpr int kWarpgroups = kWarpgroups_;
  static constexpr int kThreads = 128 * kWarpgroups;
  static constexpr int kBlockN = 64 * kWarpgroups;  // keys of the CTA
  static constexpr int kBlockM = kDk >= 192 ? 16 : kDk >= 128 ? 32 : 64;  // query rows per step

  using WarpgroupLayout = cute::Layout<cute::Shape<cute::Int<kWarpgroups>, cute::_1, cute::_1>>;
  using Mmas = DkvMmasSm90<Element, kDk, kDv, kBlockM, WarpgroupLayout>;
  using TiledMmaS = typename Mmas::TiledMmaS;
  using TiledMmaDk = typename Mmas::TiledMmaDk;
  using TiledMmaDv = typename Mmas::TiledMmaDv;
  static constexpr bool kPaired = false;
};

template <class Traits, class QSchedule>
__global__ void __launch_bounds__(Traits::kThreads)
    attn_bwd_dkdv_sm90_kernel(const AttnBwdParams p, const AttnBwdWorkspace ws) {
#if NSA_SM90_KERNEL_BODY
  using namespace cute;
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;  // query rows per step
  constexpr int kBlockN = Traits::kBlockN;  // keys of the CTA
  constexpr int kDk = Traits::kDk;
  constexpr int kDv = Traits::kDv;
  constexpr int kThreads = Traits::kThreads;
  constexpr int kStages = Traits::kStages;

  extern __shared__ __align__(1024) char smem[];
  const int tid = threadIdx.x;
  SeqInfo si;
  QSchedule qs;
  if (!dkv_cta<kDk, kDv, Element>(p, ws, si, qs)) return;
  const DkvQueries<QSchedule> qr(p, ws, qs, si, blockIdx.y);
  const DkvStagesSm90<Traits, QSchedule> st{smem, qr, qr.steps(kBlockM), tid};
  const int64_t steps = st.steps;
  Tensor sK = st.k_tile();
  Tensor sV = st.v_tile();
  st.load_first();

  typename Traits::TiledMmaS mma_s;  // S^T and dP^T: kBlockN x kBlockM tiles, K-major operands
  typename Traits::TiledMmaDk mma_dk;
  typename Traits::TiledMmaDv mma_dv;
  auto thr_s = mma_s.get_thread_slice(tid);
  auto thr_dk = mma_dk.get_thread_slice(tid);
  auto thr_dv = mma_dv.get_thread_slice(tid);
  Tensor tSrK = thr_s.partition_fragment_A(sK);
  Tensor tdPrV = thr_s.partition_fragment_A(sV);
  // The operand descriptors of a stage's Q and dO (the stage a compile-time constant).
  auto q_operands = [&](auto stage) {
    constexpr int s = decltype(stage)::value;
    Tensor sQ = make_tensor(make_smem_ptr(st.q(s)), typename Traits::SmemLayoutQ{});
    Tensor sdO = make_tensor(make_smem_ptr(st.dout(s)), typename Traits::SmemLayoutDo{});
    Tensor sQt = make_tensor(make_smem_ptr(st.q(s)), typename Traits::SmemLayoutQt{});
    Tensor sdOt = make_tensor(make_smem_ptr(st.dout(s)), typename Traits::SmemLayoutDot{});
    return cute::make_tuple(thr_s.partition_fragment_B(sQ), thr_s.partition_fragment_B(sdO),
                            thr_dk.partition_fragment_B(sQt), thr_dv.partition_fragment_B(sdOt));
  };
  Tensor acc_dk = partition_fragment_C(mma_dk, Shape<Int<kBlockN>, Int<kDk>>{});
  Tensor acc_dv = partition_fragment_C(mma_dv, Shape<Int<kBlockN>, Int<kDv>>{});
  clear(acc_dk);
  clear(acc_dv);

  // (key, query row) of each element of an S^T tile.
  Tensor cS = make_identity_tensor(Shape<Int<kBlockN>, Int<kBlockM>>{});
  Tensor tScS = thr_s.partition_C(cS);
  Tensor tScS_rc = make_tensor(tScS.data(), gmma_acc_rowcol(tScS.layout()));
  const float scale_log2 = float(p.scale) * kLog2e;

  // g P^T and dS^T of the step whose dV and dK GEMMs are still to issue (their A operands).
  using AccLayout = decltype(partition_fragment_C(mma_s, Shape<Int<kBlockN>, Int<kBlockM>>{}).layout());
  Tensor rP = make_tensor<Element>(AccLayout{});
  Tensor rdS = make_tensor<Element>(AccLayout{});
  Tensor tdVrP = make_tensor(rP.data(), gmma_acc_as_a_operand(rP.layout()));
  Tensor tdKrdS = make_tensor(rdS.data(), gmma_acc_as_a_operand(rdS.layout()));

  // Step i in stage kStage: S^T_i and dP^T_i (two wgmma groups) and, with step i-1
  // pending, its dV and dK GEMMs from the previous stage (two more), so that P_i and
  // dS_i are computed on the CUDA cores while the tensor cores finish step i-1.
  auto run_step = [&](int64_t step, auto stage, auto first) __attribute__((always_inline)) {
    constexpr int kStage = decltype(stage)::value;
    constexpr bool kFirst = decltype(first)::value;
    constexpr int kPrev = (kStage + kStages - 1) % kStages;
    st.open(step);  // step i's tiles landed; step i+1's copies go out

    auto ops = q_operands(stage);
    Tensor acc_s = partition_fragment_C(mma_s, Shape<Int<kBlockN>, Int<kBlockM>>{});
    Tensor acc_dp = partition_fragment_C(mma_s, Shape<Int<kBlockN>, Int<kBlockM>>{});
    gemm_wgmma_issue</*kZeroInit=*/true>(mma_s, tSrK, get<0>(ops), acc_s);
    gemm_wgmma_issue</*kZeroInit=*/true>(mma_s, tdPrV, get<1>(ops), acc_dp);
    if constexpr (!kFirst) {
      auto prev = q_operands(Int<kPrev>{});
      gemm_wgmma_issue</*kZeroInit=*/false>(mma_dv, tdVrP, get<3>(prev), acc_dv);
      gemm_wgmma_issue</*kZeroInit=*/false>(mma_dk, tdKrdS, get<2>(prev), acc_dk);
      warpgroup_wait<2>();  // S^T_i and dP^T_i (the older groups)
    } else {
      warpgroup_wait<0>();
    }
    warpgroup_fence_operand(acc_s);
    warpgroup_fence_operand(acc_dp);

    const DkvRowData rd = st.row_data(kStage);
    Tensor scores = make_tensor(acc_s.data(), gmma_acc_rowcol(acc_s.layout()));
    Tensor dscores = make_tensor(acc_dp.data(), gmma_acc_rowcol(acc_dp.layout()));
    probs_and_dscores(scores, dscores, scale_log2, [&](int mi, int ni) {
      return rd.info(get<0>(tScS_rc(mi, ni)), get<1>(tScS_rc(mi, ni)));
    });
    if constexpr (!kFirst) {
      warpgroup_wait<0>();  // step i-1's dV and dK: rP and rdS are free
      warpgroup_fence_operand(acc_dv);
      warpgroup_fence_operand(acc_dk);
      warpgroup_fence_operand(rP);
      warpgroup_fence_operand(rdS);
    }
    convert_fragment(acc_s, rP);
    convert_fragment(acc_dp, rdS);
  };
  const int last_stage = run_three_stage_steps(steps, run_step);
  with_stage(last_stage, [&](auto stage) {  // the last step's dV and dK
    auto ops = q_operands(stage);
    gemm_wgmma_issue</*kZeroInit=*/false>(mma_dv, tdVrP, get<3>(ops), acc_dv);
    gemm_wgmma</*kZeroInit=*/false>(mma_dk, tdKrdS, get<2>(ops), acc_dk);
    warpgroup_fence_operand(acc_dv);
    warpgroup_fence_operand(rP);
  });

  store_dkdv_rows<kBlockN, kDk, kDv, kThreads, Element>(qr, acc_dk, acc_dv, sK, sV, thr_dk, thr_dv, tid);
#endif  // NSA_SM90_KERNEL_BODY
}

// dk/dv for Dk >= 128: two warpgroups share the CTA's 64 keys and split the work by
// accumulator, so that each holds one of the 64 x Dk and 64 x Dv fp32 accumulators.
// (One warpgroup holding both leaves room for only 16 query rows per step at Dk = 192,
// whose m64n16 wgmmas read more smem than the tensor cores can use, and spills.)
// With 64 query rows per step:
//   P side  (warpgroup 0): S^T = K Q^T (SS); P = exp(scale S - lse) where visible, to
//                          smem in fp32; dV += (g P)^T dO (RS, dO^T MN-major)
//   dS side (warpgroup 1): dP^T = V dO^T (SS); dS = P (g dP - delta) with P from smem;
//                          dK += dS^T Q (RS, Q^T MN-major)
// Both sides do 64 * rows * (Dk + Dv) multiply-adds per step. Each defers its dV / dK
// GEMM to the next step, under that step's S^T / dP^T; P crosses in the accumulator
// order (thread t of one side hands value i to thread t of the other), so the math is
// the single-warpgroup kernel's, bit for bit. Per step, two barriers: the stage
// landed (and the last P read), and this step's P written.
template <int kDk_, int kDv_, class Element_>
struct AttnBwdDkvPairTraitsSm90 : DkvSmemSm90<Element_, kDk_, kDv_, 64, 64, 64 * 64 * 4> {
  using Element = Element_;
  static constexpr int kDk = kDk_;
  static constexpr int kDv = kDv_;
  static constexpr bool kPaired = true;
  static constexpr int kThreads = 256;  // the P side, then the dS side
  static constexpr int kBlockN = 64;    // keys of the CTA, the M of every wgmma
  static constexpr int kBlockM = 64;    // query rows per step

  // Each side is one warpgroup (its own TiledMma thread slice: tid % 128).
  using Mmas = DkvMmasSm90<Element, kDk, kDv, kBlockM, cute::Layout<cute::Shape<cute::_1, cute::_1, cute::_1>>>;
  using TiledMmaS = typename Mmas::TiledMmaS;
  using TiledMmaDk = typename Mmas::TiledMmaDk;
  using TiledMmaDv = typename Mmas::TiledMmaDv;

  // After the stages, P (fp32, kBlockN x kBlockM). Dk = 192: 179 KB in all.
  static constexpr int kOffP = DkvSmemSm90<Element_, kDk_, kDv_, 64, 64, 64 * 64 * 4>::kOffExtra;
};

template <class Traits, class QSchedule>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    attn_bwd_dkdv_pair_sm90_kernel(const AttnBwdParams p, const AttnBwdWorkspace ws) {
#if NSA_SM90_KERNEL_BODY
  using namespace cute;
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;  // query rows per step
  constexpr int kBlockN = Traits::kBlockN;  // keys of the CTA
  constexpr int kDk = Traits::kDk;
  constexpr int kDv = Traits::kDv;
  constexpr int kStages = Traits::kStages;

  extern __shared__ __align__(1024) char smem[];
  const int tid = threadIdx.x;
  SeqInfo si;
  QSchedule qs;
  if (!dkv_cta<kDk, kDv, Element>(p, ws, si, qs)) return;
  const DkvQueries<QSchedule> qr(p, ws, qs, si, blockIdx.y);
  const DkvStagesSm90<Traits, QSchedule> st{smem, qr, qr.steps(kBlockM), tid};
  const int64_t steps = st.steps;
  Tensor sK = st.k_tile();
  Tensor sV = st.v_tile();
  st.load_first();

  // The opening of step `step` (stage kStage), for every thread of both sides:
  // barrier A (the stage and its row data landed; every read of the last P and
  // every GEMM of step - 2 are done), then the copies of step + 1.
  auto open_step = [&](int64_t step, auto) { st.open(step); };
  auto prev_stage = [](auto stage) { return Int<(decltype(stage)::value + kStages - 1) % kStages>{}; };
  auto q_tile = [&](auto stage) {
    return make_tensor(make_smem_ptr(st.q(decltype(stage)::value)), typename Traits::SmemLayoutQ{});
  };
  auto do_tile = [&](auto stage) {
    return make_tensor(make_smem_ptr(st.dout(decltype(stage)::value)), typename Traits::SmemLayoutDo{});
  };

  const int wg_tid = tid % 128;
  typename Traits::TiledMmaS mma_s;  // S^T and dP^T: kBlockN x kBlockM tiles, K-major operands
  auto thr_s = mma_s.get_thread_slice(wg_tid);
  // (key, query row) of each element of an S^T tile, in the accumulator's order.
  Tensor tScS = thr_s.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kBlockM>>{}));
  using AccLayout = decltype(partition_fragment_C(mma_s, Shape<Int<kBlockN>, Int<kBlockM>>{}).layout());
  constexpr int kAcc = decltype(size(AccLayout{}))::value;
  static_assert(kAcc % 2 == 0);
  // P between the sides: value pair j of thread t at sP[j * 128 + t] (no bank conflict).
  float2* sP = reinterpret_cast<float2*>(smem + Traits::kOffP);
  const float scale_log2 = float(p.scale) * kLog2e;
  auto info = [&](const DkvRowData& rd, int i) { return rd.info(get<0>(tScS(i)), get<1>(tScS(i))); };

  // The side is the same for every thread of a warpgroup; the shuffle lets ptxas know
  // the branch does not diverge within a warp.
  if (__shfl_sync(0xffffffffu, tid / 128, 0) == 0) {
    // --- P side: S^T, P, dV.
    typename Traits::TiledMmaDv mma_dv;
    auto thr_dv = mma_dv.get_thread_slice(wg_tid);
    Tensor tSrK = thr_s.partition_fragment_A(sK);
    auto dot_operand = [&](auto stage) {
      return thr_dv.partition_fragment_B(
          make_tensor(make_smem_ptr(st.dout(decltype(stage)::value)), typename Traits::SmemLayoutDot{}));
    };
    Tensor acc_dv = partition_fragment_C(mma_dv, Shape<Int<kBlockN>, Int<kDv>>{});
    clear(acc_dv);
    Tensor rP = make_tensor<Element>(AccLayout{});  // g P of the step whose dV GEMM is pending
    Tensor tdVrP = make_tensor(rP.data(), gmma_acc_as_a_operand(rP.layout()));

    auto step = [&](int64_t i, auto stage, auto first) __attribute__((always_inline)) {
      open_step(i, stage);
      Tensor acc_s = partition_fragment_C(mma_s, Shape<Int<kBlockN>, Int<kBlockM>>{});
      Tensor tSrQ = thr_s.partition_fragment_B(q_tile(stage));
      gemm_wgmma_issue</*kZeroInit=*/true>(mma_s, tSrK, tSrQ, acc_s);
      if constexpr (!decltype(first)::value) {
        auto tdVrdOt = dot_operand(prev_stage(stage));
        gemm_wgmma_issue</*kZeroInit=*/false>(mma_dv, tdVrP, tdVrdOt, acc_dv);
        warpgroup_wait<1>();  // S^T (the older group)
      } else {
        warpgroup_wait<0>();
      }
      warpgroup_fence_operand(acc_s);
      const DkvRowData rd = st.row_data(decltype(stage)::value);
#pragma unroll
      for (int j = 0; j < kAcc / 2; ++j) {
        float pr[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const ElemInfo in = info(rd, 2 * j + e);
          pr[e] = in.visible ? exp2f(acc_s(2 * j + e) * scale_log2 - in.lse2) : 0.f;
          acc_s(2 * j + e) = pr[e] * in.dout_scale;
        }
        sP[j * 128 + wg_tid] = float2{pr[0], pr[1]};
      }
      __syncthreads();  // barrier B: P is in smem for the dS side
      if constexpr (!decltype(first)::value) {
        warpgroup_wait<0>();  // the last step's dV: rP is free
        warpgroup_fence_operand(acc_dv);
        warpgroup_fence_operand(rP);
      }
      convert_fragment(acc_s, rP);
    };
    with_stage(run_three_stage_steps(steps, step), [&](auto stage) {  // the last step's dV
      auto tdVrdOt = dot_operand(stage);
      gemm_wgmma</*kZeroInit=*/false>(mma_dv, tdVrP, tdVrdOt, acc_dv);
    });
    store_dkv_rows</*kIsDk=*/false, kBlockN, kDk, kDv, 128, Element>(qr, acc_dv, sV, thr_dv, wg_tid);
  } else {
    // --- dS side: dP^T, dS, dK.
    typename Traits::TiledMmaDk mma_dk;
    auto thr_dk = mma_dk.get_thread_slice(wg_tid);
    Tensor tdPrV = thr_s.partition_fragment_A(sV);
    auto qt_operand = [&](auto stage) {
      return thr_dk.partition_fragment_B(
          make_tensor(make_smem_ptr(st.q(decltype(stage)::value)), typename Traits::SmemLayoutQt{}));
    };
    Tensor acc_dk = partition_fragment_C(mma_dk, Shape<Int<kBlockN>, Int<kDk>>{});
    clear(acc_dk);
    Tensor rdS = make_tensor<Element>(AccLayout{});  // dS of the step whose dK GEMM is pending
    Tensor tdKrdS = make_tensor(rdS.data(), gmma_acc_as_a_operand(rdS.layout()));

    auto step = [&](int64_t i, auto stage, auto first) __attribute__((always_inline)) {
      open_step(i, stage);
      Tensor acc_dp = partition_fragment_C(mma_s, Shape<Int<kBlockN>, Int<kBlockM>>{});
      Tensor tdPrdO = thr_s.partition_fragment_B(do_tile(stage));
      gemm_wgmma_issue</*kZeroInit=*/true>(mma_s, tdPrV, tdPrdO, acc_dp);
      if constexpr (!decltype(first)::value) {
        auto tdKrQt = qt_operand(prev_stage(stage));
        gemm_wgmma_issue</*kZeroInit=*/false>(mma_dk, tdKrdS, tdKrQt, acc_dk);
        warpgroup_wait<1>();  // dP^T (the older group)
      } else {
        warpgroup_wait<0>();
      }
      warpgroup_fence_operand(acc_dp);
      __syncthreads();  // barrier B: this step's P is in smem
      if constexpr (!decltype(first)::value) {
        warpgroup_wait<0>();  // the last step's dK: rdS is free
        warpgroup_fence_operand(acc_dk);
        warpgroup_fence_operand(rdS);
      }
      const DkvRowData rd = st.row_data(decltype(stage)::value);
#pragma unroll
      for (int j = 0; j < kAcc / 2; ++j) {
        const float2 pr = sP[j * 128 + wg_tid];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const ElemInfo in = info(rd, 2 * j + e);
          acc_dp(2 * j + e) = (e == 0 ? pr.x : pr.y) * (in.dout_scale * acc_dp(2 * j + e) - in.delta);
        }
      }
      convert_fragment(acc_dp, rdS);
    };
    with_stage(run_three_stage_steps(steps, step), [&](auto stage) {  // the last step's dK
      auto tdKrQt = qt_operand(stage);
      gemm_wgmma</*kZeroInit=*/false>(mma_dk, tdKrdS, tdKrQt, acc_dk);
    });
    store_dkv_rows</*kIsDk=*/true, kBlockN, kDk, kDv, 128, Element>(qr, acc_dk, sK, thr_dk, wg_tid);
  }
#endif  // NSA_SM90_KERNEL_BODY
}

template <class Traits, class Schedule, class Kernel>
void launch_attn_bwd_dq_sm90(const AttnBwdParams& p, const AttnBwdWorkspace& ws, cudaStream_t stream,
                             const char* what, Kernel kernel) {
  if (p.num_heads_kv == 0 || p.num_seqs == 0 || p.seqlen == 0) return;
  const int64_t z = p.num_seqs + (p.cu_seqlens != nullptr ? 1 : 0);
  const int64_t m_blocks = (p.seqlen * p.group + Traits::kBlockM - 1) / Traits::kBlockM;
  check_grid(m_blocks, p, z, what);
  const int smem = Traits::kSmemTiles + Schedule::smem_bytes(p);
  set_smem_limit(kernel, smem, what);
  NSA_LAUNCH(dim3(unsigned(m_blocks), unsigned(p.num_heads_kv), unsigned(z)), Traits::kThreads, smem,
             stream, kernel)(p, ws);
  check_launch(what);
}

// Dk <= 128: one warpgroup per 64 query rows; Dk = 192: the paired warpgroups of
// attn_bwd_dq_pair_sm90_kernel.
template <int kDk, int kDv, DType kDType>
void run_attn_bwd_dq_sm90(const AttnBwdParams& p, const AttnBwdWorkspace& ws, cudaStream_t stream) {
  using Element = typename ElementOf<kDType>::type;
  using Traits = std::conditional_t<(kDk > 128), AttnBwdDqPairTraitsSm90<kDk, kDv, Element>,
                                    AttnBwdDqTraitsSm90<kDk, kDv, Element>>;
  auto launch = [&](auto schedule, const char* what) {
    using Schedule = typename decltype(schedule)::type;
    if constexpr (Traits::kPaired)
      launch_attn_bwd_dq_sm90<Traits, Schedule>(p, ws, stream, what, attn_bwd_dq_pair_sm90_kernel<Traits, Schedule>);
    else
      launch_attn_bwd_dq_sm90<Traits, Schedule>(p, ws, stream, what, attn_bwd_dq_sm90_kernel<Traits, Schedule>);
  };
  switch (p.branch) {
    case Branch::kCompressed:
      launch(std::type_identity<CompressedSchedule<Traits::kBlockN>>{}, "compressed_attn_bwd (sm90 dq)");
      break;
    case Branch::kWindow:
      launch(std::type_identity<WindowSchedule<Traits::kBlockN>>{}, "window_attn_bwd (sm90 dq)");
      break;
    case Branch::kSelected:
      throw std::runtime_error("nsa_cuda: selected_attn_bwd has no sm90 (wgmma) dq kernel");
  }
}

template <class Traits, class QSchedule, class Kernel>
void launch_attn_bwd_dkdv_sm90(const AttnBwdParams& p, const AttnBwdWorkspace& ws, cudaStream_t stream,
                               const char* what, Kernel kernel) {
  const int64_t z = p.num_seqs + (p.cu_seqlens != nullptr ? 1 : 0);
  AttnBwdWorkspace w = ws;
  const int64_t n_blocks = plan_dkv_split<QSchedule, Traits::kBlockN, Traits::kDk, Traits::kDv>(p, w, stream);
  if (n_blocks == 0) return;
  check_grid(n_blocks, p, z, what);
  set_smem_limit(kernel, Traits::kSmem, what);
  NSA_LAUNCH(dim3(unsigned(n_blocks), unsigned(p.num_heads_kv), unsigned(z)), Traits::kThreads,
             Traits::kSmem, stream, kernel)(p, w);
  check_launch(what);
  launch_dkv_reduce<QSchedule, Traits::kBlockN, Traits::kDk, Traits::kDv, typename Traits::Element>(p, w, stream,
                                                                                                  what);
}

// Dk = 64: one warpgroup per 64 keys (two per CTA for the compressed and window
// branches). Dk >= 128: the paired warpgroups of attn_bwd_dkdv_pair_sm90_kernel.
template <int kDk, int kDv, DType kDType>
void run_attn_bwd_dkdv_sm90(const AttnBwdParams& p, const AttnBwdWorkspace& ws, cudaStream_t stream) {
  using Element = typename ElementOf<kDType>::type;
  auto launch = [&](auto traits, auto q_schedule, const char* what) {
    using Traits = typename decltype(traits)::type;
    using QSchedule = typename decltype(q_schedule)::type;
    if constexpr (Traits::kPaired)
      launch_attn_bwd_dkdv_sm90<Traits, QSchedule>(p, ws, stream, what,
                                                   attn_bwd_dkdv_pair_sm90_kernel<Traits, QSchedule>);
    else
      launch_attn_bwd_dkdv_sm90<Traits, QSchedule>(p, ws, stream, what, attn_bwd_dkdv_sm90_kernel<Traits, QSchedule>);
  };
  using Wide = std::conditional_t<(kDk >= 128), AttnBwdDkvPairTraitsSm90<kDk, kDv, Element>,
                                  AttnBwdDkvTraitsSm90<kDk, kDv, Element, 2>>;
  using Narrow = std::conditional_t<(kDk >= 128), AttnBwdDkvPairTraitsSm90<kDk, kDv, Element>,
                                    AttnBwdDkvTraitsSm90<kDk, kDv, Element, 1>>;
  switch (p.branch) {
    case Branch::kCompressed:
      launch(std::type_identity<Wide>{}, std::type_identity<CompressedQuerySchedule<Wide::kBlockN>>{},
             "compressed_attn_bwd (sm90 dk/dv)");
      break;
    case Branch::kWindow:
      launch(std::type_identity<Wide>{}, std::type_identity<WindowQuerySchedule<Wide::kBlockN>>{},
             "window_attn_bwd (sm90 dk/dv)");
      break;
    case Branch::kSelected:
      launch(std::type_identity<Narrow>{}, std::type_identity<SelectedQuerySchedule<Narrow::kBlockN>>{},
             "selected_attn_bwd (sm90 dk/dv)");
      break;
  }
}

}  // namespace nsa::cuda
