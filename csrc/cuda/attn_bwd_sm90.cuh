// The Hopper (sm_90a) backward kernels, warpgroup MMAs in place of mma.sync
// (attn_bwd.cuh's run_attn_bwd picks them):
// 1. dq of the compressed and window branches, Dk <= 128: the query-side loop of
//    attn_bwd_dq_kernel on the forward's Hopper tiling (attn_fwd_sm90.cuh: two
//    warpgroups, 128 rows; 64 keys per tile, 32 for Dk >= 128):
//      S  = Q K^T     wgmma SS (Q, K K-major)
//      dP = dO V^T    wgmma SS (dO, V K-major), issued in the same group as S
//      dQ += dS K     wgmma RS (dS from registers, K^T MN-major), N = Dk
//    K and V tiles have three stages: tile j+1's cp.async and tile j-1's dQ GEMM run
//    under tile j's S and dP, and dS_j is computed while dS_{j-1} K_{j-1} finishes.
// 2. dk/dv of all three branches: the KV-side loop of attn_bwd_dkdv_kernel (the same
//    query schedules, row data and epilogue), pipelined the same way over three
//    stages of Q / dO tiles (AttnBwdDkvTraitsSm90).
// The selected branch's dq stays on mma.sync: like its forward, a CTA visits the
// union of its tokens' blocks with a per-warp skip.
#pragma once

#include "cuda/attn_bwd.cuh"
#include "cuda/attn_fwd_sm90.cuh"

namespace nsa::cuda {

// A warpgroup keeps a 64 x Dk fp32 dQ accumulator next to the S and dP tiles: for
// Dk >= 128 the KV tiles have 32 keys (as the SM80 dq kernel's) so that the S and
// dP accumulators halve and nothing spills (hdim 192 with 64 keys: 255 registers and
// 0.5 KB of spills).
template <int kDk_, int kDv_, class Element_>
struct AttnBwdDqTraitsSm90 : AttnTraitsSm90<kDk_, kDv_, Element_, 2, (kDk_ >= 128 ? 32 : 64)> {
  using Base = AttnTraitsSm90<kDk_, kDv_, Element_, 2, (kDk_ >= 128 ? 32 : 64)>;
  using typename Base::Element;
  using typename Base::WarpgroupLayout;
  using Base::kBlockM;
  using Base::kBlockN;
  using Base::kDk;
  using Base::kDv;
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
  static constexpr int kSmemTiles = Base::kSmemQ + kSmemDo + kStages * kSmemStage;
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
  const int hkv = blockIdx.y;
  if (dq_padding_rows<kDk, Element>(p, ws)) return;
  QueryTile qt;
  if (!query_tile<Schedule>(p, kBlockM, qt)) return;
  const SeqInfo& si = qt.si;

  Element* smem_q = reinterpret_cast<Element*>(smem);
  Element* smem_do = reinterpret_cast<Element*>(smem + Traits::kSmemQ);
  char* smem_stage0 = smem + Traits::kSmemQ + Traits::kSmemDo;
  auto stage_k = [&](int s) { return reinterpret_cast<Element*>(smem_stage0 + s * Traits::kSmemStage); };
  auto stage_v = [&](int s) {
    return reinterpret_cast<Element*>(smem_stage0 + s * Traits::kSmemStage + Traits::kSmemK);
  };
  Tensor sQ = make_tensor(make_smem_ptr(smem_q), typename Traits::SmemLayoutQ{});
  Tensor sdO = make_tensor(make_smem_ptr(smem_do), typename Traits::SmemLayoutDo{});
  char* smem_schedule = smem + Traits::kSmemTiles;

  const Element* k = static_cast<const Element*>(p.k) + si.batch * p.k_batch_stride + hkv * p.k_head_stride;
  const Element* v = static_cast<const Element*>(p.v) + si.batch * p.v_batch_stride + hkv * p.v_head_stride;
  load_dq_query_tiles<kBlockM, kDk, kDv, kThreads, Element>(p, qt, sQ, sdO, tid);
  cute::cp_async_fence();

  Schedule sched;
  sched.init(p, si, qt.t_lo, qt.t_hi, hkv, smem_schedule, tid);
  const int64_t key_row0 = sched.key_row0();

  typename Traits::TiledMmaS mma_s;  // S and dP: both 64 x kBlockN tiles, K-major operands
  typename Traits::TiledMmaDq mma_dq;
  auto thr_s = mma_s.get_thread_slice(tid);
  auto thr_dq = mma_dq.get_thread_slice(tid);
  Tensor tSrQ = thr_s.partition_fragment_A(sQ);
  Tensor tdPrdO = thr_s.partition_fragment_A(sdO);
  // The stages' operand descriptors (the stage is a compile-time constant below).
  auto k_operands = [&](auto stage) {
    constexpr int s = decltype(stage)::value;
    Tensor sK = make_tensor(make_smem_ptr(stage_k(s)), typename Traits::SmemLayoutK{});
    Tensor sV = make_tensor(make_smem_ptr(stage_v(s)), typename Traits::SmemLayoutV{});
    Tensor sKt = make_tensor(make_smem_ptr(stage_k(s)), typename Traits::SmemLayoutKt{});
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

  auto load_kv = [&](auto stage, const KvTile& tile) {
    constexpr int s = decltype(stage)::value;
    Tensor sK = make_tensor(make_smem_ptr(stage_k(s)), typename Traits::SmemLayoutK{});
    Tensor sV = make_tensor(make_smem_ptr(stage_v(s)), typename Traits::SmemLayoutV{});
    load_kv_tile<kBlockN, kDk, kThreads>(sK, k, p.k_row_stride, key_row0, tile, tid);
    load_kv_tile<kBlockN, kDv, kThreads>(sV, v, p.v_row_stride, key_row0, tile, tid);
  };

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

// The dk/dv kernel's tiling: kWarpgroups warpgroups of 64 keys each (a CTA owns
// kBlockN = 64 * kWarpgroups keys; two for the compressed and window branches, whose
// CTAs visit long runs of queries, so that each Q / dO tile serves 128 keys; one for
// the selected branch, whose blocks are l' = 64 keys). Per step, kBlockM query rows
// (64; 32 for Dk = 128 as the SM80 kernel's, 16 for Dk = 192, so that the 64 x Dk
// and 64 x Dv fp32 accumulators of dK and dV leave room for the S^T and dP^T tiles):
//   S^T  = K Q^T     wgmma SS (K, Q K-major), M = keys, N = query rows
//   dP^T = V dO^T    wgmma SS (V, dO K-major), one more group
//   dV  += P^T dO    wgmma RS (P^T from registers, dO^T MN-major), N = Dv
//   dK  += dS^T Q    wgmma RS (dS^T from registers, Q^T MN-major), N = Dk
template <int kDk_, int kDv_, class Element_, int kWarpgroups_>
struct AttnBwdDkvTraitsSm90 {
  using Element = Element_;
  static constexpr int kDk = kDk_;
  static constexpr int kDv = kDv_;
  static constexpr int kWarpgroups = kWarpgroups_;
  static constexpr int kThreads = 128 * kWarpgroups;
  static constexpr int kBlockN = 64 * kWarpgroups;  // keys of the CTA
  static constexpr int kBlockM = kDk >= 192 ? 16 : kDk >= 128 ? 32 : 64;  // query rows per step

  using WarpgroupLayout = cute::Layout<cute::Shape<cute::Int<kWarpgroups>, cute::_1, cute::_1>>;
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

  using SmemAtom = cute::GMMA::Layout_K_SW128_Atom<Element>;
  template <int kRows, int kCols>
  using Tile = decltype(cute::tile_to_shape(SmemAtom{}, cute::Shape<cute::Int<kRows>, cute::Int<kCols>>{}));
  // The transpose (kCols x kRows) of a Tile: the MN-major B operand of dV and dK.
  template <int kRows, int kCols>
  using TileT = decltype(cute::composition(
      Tile<kRows, kCols>{}, cute::make_layout(cute::Shape<cute::Int<kCols>, cute::Int<kRows>>{}, cute::GenRowMajor{})));
  using SmemLayoutK = Tile<kBlockN, kDk>;
  using SmemLayoutV = Tile<kBlockN, kDv>;
  using SmemLayoutQ = Tile<kBlockM, kDk>;
  using SmemLayoutDo = Tile<kBlockM, kDv>;
  using SmemLayoutQt = TileT<kBlockM, kDk>;
  using SmemLayoutDot = TileT<kBlockM, kDv>;

  // Smem: K and V (kBlockN rows), then three stages of (Q, dO) tiles (step i's S^T
  // and dP^T GEMMs, step i-1's dV and dK GEMMs, still running, and step i+1's
  // copies), then three stages of row data (DkvRowData).
  static constexpr int kStages = 3;
  static constexpr int kSmemK = kBlockN * kDk * int(sizeof(Element));
  static constexpr int kSmemV = kBlockN * kDv * int(sizeof(Element));
  static constexpr int kSmemQ = kBlockM * kDk * int(sizeof(Element));
  static constexpr int kSmemStage = kSmemQ + kBlockM * kDv * int(sizeof(Element));
  static_assert(kSmemK % 1024 == 0 && kSmemV % 1024 == 0 && kSmemQ % 1024 == 0 && kSmemStage % 1024 == 0,
                "swizzle atoms stay 1024-byte aligned");
  static constexpr int kSmemTiles = kSmemK + kSmemV + kStages * kSmemStage;
  static constexpr int kSmemRowData = DkvRowData::kWords * kBlockM * 4;
  static constexpr int kSmem = kSmemTiles + kStages * kSmemRowData;
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

  Tensor sK = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem)), typename Traits::SmemLayoutK{});
  Tensor sV = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem + Traits::kSmemK)),
                          typename Traits::SmemLayoutV{});
  auto stage_q = [&](int s) {
    return reinterpret_cast<Element*>(smem + Traits::kSmemK + Traits::kSmemV + s * Traits::kSmemStage);
  };
  auto stage_do = [&](int s) { return reinterpret_cast<Element*>(reinterpret_cast<char*>(stage_q(s)) + Traits::kSmemQ); };
  auto row_data = [&](int s) { return DkvRowData(smem + Traits::kSmemTiles + s * Traits::kSmemRowData, kBlockM); };

  load_dkv_key_tiles<kBlockN, kDk, kDv, kThreads, Element>(qr, sK, sV, tid);
  cute::cp_async_fence();

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
    Tensor sQ = make_tensor(make_smem_ptr(stage_q(s)), typename Traits::SmemLayoutQ{});
    Tensor sdO = make_tensor(make_smem_ptr(stage_do(s)), typename Traits::SmemLayoutDo{});
    Tensor sQt = make_tensor(make_smem_ptr(stage_q(s)), typename Traits::SmemLayoutQt{});
    Tensor sdOt = make_tensor(make_smem_ptr(stage_do(s)), typename Traits::SmemLayoutDot{});
    return cute::make_tuple(thr_s.partition_fragment_B(sQ), thr_s.partition_fragment_B(sdO),
                            thr_dk.partition_fragment_B(sQt), thr_dv.partition_fragment_B(sdOt));
  };
  auto load_q_tiles = [&](int64_t step, int s) {
    qr.template load_tiles<kBlockM, kDk, kDv, kThreads, Element>(
        step, make_tensor(make_smem_ptr(stage_q(s)), typename Traits::SmemLayoutQ{}),
        make_tensor(make_smem_ptr(stage_do(s)), typename Traits::SmemLayoutDo{}), tid);
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
  const int64_t steps = qr.steps(kBlockM);

  // g P^T and dS^T of the step whose dV and dK GEMMs are still to issue (their A operands).
  using AccLayout = decltype(partition_fragment_C(mma_s, Shape<Int<kBlockN>, Int<kBlockM>>{}).layout());
  Tensor rP = make_tensor<Element>(AccLayout{});
  Tensor rdS = make_tensor<Element>(AccLayout{});
  Tensor tdVrP = make_tensor(rP.data(), gmma_acc_as_a_operand(rP.layout()));
  Tensor tdKrdS = make_tensor(rdS.data(), gmma_acc_as_a_operand(rdS.layout()));

  // Step i in stage kStage: S^T_i and dP^T_i (two wgmma groups) and, with step i-1
  // pending, its dV and dK GEMMs from the previous stage (two more), so that P_i and
  // dS_i are computed on the CUDA cores while the tensor cores finish step i-1.
  // The first step (nothing pending) is peeled off the loop, as in the forward.
  auto run_step = [&](int64_t step, auto stage, auto first) {
    constexpr int kStage = decltype(stage)::value;
    constexpr bool kFirst = decltype(first)::value;
    constexpr int kPrev = (kStage + kStages - 1) % kStages;
    constexpr int kNext = (kStage + 1) % kStages;
    cute::cp_async_wait<0>();
    fence_smem_for_wgmma();
    __syncthreads();  // step i's Q, dO, row data (and K, V) landed; every GEMM of step i-2 retired
    if (step + 1 < steps) load_q_tiles(step + 1, kNext);
    cute::cp_async_fence();
    if (step + 1 < steps) row_data(kNext).template fill<kBlockM>(qr, step + 1, tid);

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

    const DkvRowData rd = row_data(kStage);
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
  if (steps > 0) {
    row_data(0).template fill<kBlockM>(qr, 0, tid);
    load_q_tiles(0, 0);
  }
  cute::cp_async_fence();
  if (steps > 0) {
    run_step(0, _0{}, cute::true_type{});
    int last_stage = 0;
    for (int64_t step = 1; step < steps; step += kStages) {
      run_step(step, _1{}, cute::false_type{});
      last_stage = 1;
      if (step + 1 >= steps) break;
      run_step(step + 1, _2{}, cute::false_type{});
      last_stage = 2;
      if (step + 2 >= steps) break;
      run_step(step + 2, _0{}, cute::false_type{});
      last_stage = 0;
    }
    // The last step's dV and dK (its Q and dO landed at its barrier).
    auto last = [&](auto stage) {
      auto ops = q_operands(stage);
      gemm_wgmma_issue</*kZeroInit=*/false>(mma_dv, tdVrP, get<3>(ops), acc_dv);
      gemm_wgmma</*kZeroInit=*/false>(mma_dk, tdKrdS, get<2>(ops), acc_dk);
      warpgroup_fence_operand(acc_dv);
      warpgroup_fence_operand(rP);
    };
    if (last_stage == 0) last(_0{});
    else if (last_stage == 1) last(_1{});
    else last(_2{});
  }

  store_dkdv_rows<kBlockN, kDk, kDv, kThreads, Element>(qr, acc_dk, acc_dv, sK, sV, thr_dk, thr_dv, tid);
#endif  // NSA_SM90_KERNEL_BODY
}

template <class Traits, class Schedule>
void launch_attn_bwd_dq_sm90(const AttnBwdParams& p, const AttnBwdWorkspace& ws, cudaStream_t stream,
                             const char* what) {
  if (p.num_heads_kv == 0 || p.num_seqs == 0 || p.seqlen == 0) return;
  const int64_t z = p.num_seqs + (p.cu_seqlens != nullptr ? 1 : 0);
  const int64_t m_blocks = (p.seqlen * p.group + Traits::kBlockM - 1) / Traits::kBlockM;
  check_grid(m_blocks, p, z, what);
  const int smem = Traits::kSmemTiles + Schedule::smem_bytes(p);
  auto kernel = attn_bwd_dq_sm90_kernel<Traits, Schedule>;
  set_smem_limit(kernel, smem, what);
  NSA_LAUNCH(dim3(unsigned(m_blocks), unsigned(p.num_heads_kv), unsigned(z)), Traits::kThreads, smem,
             stream, kernel)(p, ws);
  check_launch(what);
}

template <int kDk, int kDv, DType kDType>
void run_attn_bwd_dq_sm90(const AttnBwdParams& p, const AttnBwdWorkspace& ws, cudaStream_t stream) {
  using Traits = AttnBwdDqTraitsSm90<kDk, kDv, typename ElementOf<kDType>::type>;
  switch (p.branch) {
    case Branch::kCompressed:
      launch_attn_bwd_dq_sm90<Traits, CompressedSchedule<Traits::kBlockN>>(p, ws, stream,
                                                                           "compressed_attn_bwd (sm90 dq)");
      break;
    case Branch::kWindow:
      launch_attn_bwd_dq_sm90<Traits, WindowSchedule<Traits::kBlockN>>(p, ws, stream,
                                                                       "window_attn_bwd (sm90 dq)");
      break;
    case Branch::kSelected:
      throw std::runtime_error("nsa_cuda: selected_attn_bwd has no sm90 (wgmma) dq kernel");
  }
}

template <class Traits, class QSchedule>
void launch_attn_bwd_dkdv_sm90(const AttnBwdParams& p, const AttnBwdWorkspace& ws, cudaStream_t stream,
                               const char* what) {
  const int64_t z = p.num_seqs + (p.cu_seqlens != nullptr ? 1 : 0);
  AttnBwdWorkspace w = ws;
  const int64_t n_blocks = plan_dkv_split<QSchedule, Traits::kBlockN, Traits::kDk, Traits::kDv>(p, w, stream);
  if (n_blocks == 0) return;
  check_grid(n_blocks, p, z, what);
  auto kernel = attn_bwd_dkdv_sm90_kernel<Traits, QSchedule>;
  set_smem_limit(kernel, Traits::kSmem, what);
  NSA_LAUNCH(dim3(unsigned(n_blocks), unsigned(p.num_heads_kv), unsigned(z)), Traits::kThreads,
             Traits::kSmem, stream, kernel)(p, w);
  check_launch(what);
  launch_dkv_reduce<QSchedule, Traits::kBlockN, Traits::kDk, Traits::kDv, typename Traits::Element>(p, w, stream,
                                                                                                  what);
}

template <int kDk, int kDv, DType kDType>
void run_attn_bwd_dkdv_sm90(const AttnBwdParams& p, const AttnBwdWorkspace& ws, cudaStream_t stream) {
  using Element = typename ElementOf<kDType>::type;
  using Wide = AttnBwdDkvTraitsSm90<kDk, kDv, Element, 2>;
  using Narrow = AttnBwdDkvTraitsSm90<kDk, kDv, Element, 1>;
  switch (p.branch) {
    case Branch::kCompressed:
      launch_attn_bwd_dkdv_sm90<Wide, CompressedQuerySchedule<Wide::kBlockN>>(p, ws, stream,
                                                                             "compressed_attn_bwd (sm90 dk/dv)");
      break;
    case Branch::kWindow:
      launch_attn_bwd_dkdv_sm90<Wide, WindowQuerySchedule<Wide::kBlockN>>(p, ws, stream,
                                                                         "window_attn_bwd (sm90 dk/dv)");
      break;
    case Branch::kSelected:
      launch_attn_bwd_dkdv_sm90<Narrow, SelectedQuerySchedule<Narrow::kBlockN>>(p, ws, stream,
                                                                               "selected_attn_bwd (sm90 dk/dv)");
      break;
  }
}

}  // namespace nsa::cuda
