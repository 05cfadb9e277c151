// The Hopper (sm_90a) dq kernel of the compressed and window backward: the query-side
// loop of attn_bwd.cuh's attn_bwd_dq_kernel with warpgroup MMAs, on the forward's
// Hopper tiling (attn_fwd_sm90.cuh: two warpgroups, 128 rows; 64 keys per tile, 32
// for Dk >= 128):
//   S  = Q K^T     wgmma SS (Q, K K-major)
//   dP = dO V^T    wgmma SS (dO, V K-major), issued in the same group as S
//   dQ += dS K     wgmma RS (dS from registers, K^T MN-major), N = Dk
// K and V tiles have three stages: tile j+1's cp.async and tile j-1's dQ GEMM run
// under tile j's S and dP, and dS_j is computed while dS_{j-1} K_{j-1} finishes. The
// dk/dv kernel and the selected branch stay on mma.sync.
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
  KvTile tile;
  bool have = sched.next(tile);
  bool pending = false;
  auto run_tile = [&](auto stage) {
    constexpr int kStage = decltype(stage)::value;
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
    if (pending) {
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
    if (pending) {
      warpgroup_wait<0>();  // dS_{j-1} K_{j-1}: rdS is free
      warpgroup_fence_operand(acc_dq);
      warpgroup_fence_operand(rdS);
    }
    convert_fragment(acc_dp, rdS);
    pending = true;
    tile = next_tile;
    have = have_next;
  };
  if (have) load_kv(_0{}, tile);
  cute::cp_async_fence();
  int last_stage = 0;
  while (have) {
    run_tile(_0{});
    last_stage = 0;
    if (!have) break;
    run_tile(_1{});
    last_stage = 1;
    if (!have) break;
    run_tile(_2{});
    last_stage = 2;
  }
  if (pending) {  // the last tile's dQ GEMM (its K landed at its step's barrier)
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

}  // namespace nsa::cuda
