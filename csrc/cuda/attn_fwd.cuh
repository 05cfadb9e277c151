// The attention forward mainloop shared by the compressed, selected and window
// branches, and its launcher. The branch is a KV-schedule policy
// (kv_schedule.cuh): which KV tiles a CTA visits and which keys each row sees; the
// CTA's query rows are a QueryTile (query_tile.cuh, group-centric).
#pragma once

#include "cuda/attn_traits.cuh"
#include "cuda/query_tile.cuh"
#include "cuda/softmax.cuh"

namespace nsa::cuda {

// Shared memory of the forward's tiles: Q, then kStages stages of K and V (stage s
// of K at s * kStageElems past stage 0, V likewise: [Q][K0][V0][K1][V1]).
template <class Traits, int kStages>
constexpr int fwd_smem_tiles() {
  if constexpr (kStages == 1) {
    return Traits::kSmemAttn;
  } else {
    return Traits::kSmemAttn + (kStages - 1) * (Traits::kSmemK + Traits::kSmemV);
  }
}

// kStages = 1 is FlashAttention-2's loop: one K and one V buffer, V of tile j
// copied under S_j and K of tile j + 1 under P_j V_j. Where every warp computes on
// every tile (compressed, window) that hides the copies. The selected branch's
// warps skip most of the union's tiles, so a tile costs about two dependent
// round trips to L2 with little to hide them, and the kernel's 255 registers
// allow two CTAs per SM whatever its shared memory. kStages = 2 copies the next
// tile's K and V together while this tile's products run: one round trip per
// tile and twice the bytes in flight, at the same occupancy.
template <class Traits, class Schedule, int kStages = 1>
__global__ void __launch_bounds__(Traits::kThreads)
    attn_fwd_kernel(const AttnFwdParams p) {
  static_assert(kStages == 1 || kStages == 2);
  using namespace cute;
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kDk = Traits::kDk;
  constexpr int kDv = Traits::kDv;
  constexpr int kThreads = Traits::kThreads;

  // 1024, as the wgmma kernels (same TUs) declare it: one alignment per name.
  extern __shared__ __align__(1024) char smem[];
  const int tid = threadIdx.x;
  const int hkv = blockIdx.y;
  QueryTile qt;
  if (!query_tile<Schedule>(p, kBlockM, qt)) return;
  const SeqInfo& si = qt.si;

  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem)), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(sQ.data() + size(sQ), typename Traits::SmemLayoutK{});
  Tensor sV = make_tensor(sK.data() + size(sK), typename Traits::SmemLayoutV{});
  Tensor sVt = make_tensor(sV.data(), typename Traits::SmemLayoutVt{});
  Tensor sVtNoSwizzle = make_tensor(sV.data().get(), typename Traits::SmemLayoutVtNoSwizzle{});
  Tensor sO = make_tensor(sQ.data(), typename Traits::SmemLayoutO{});  // after the mainloop
  char* smem_schedule = smem + fwd_smem_tiles<Traits, kStages>();
  constexpr int kStageElems = Traits::kBlockN * (kDk + kDv);
  static_assert(kStageElems % 512 == 0, "a stage moves whole swizzle periods (8 rows x 64)");

  const Element* q = static_cast<const Element*>(p.q) + si.batch * p.q_batch_stride;
  const Element* k = static_cast<const Element*>(p.k) + si.batch * p.k_batch_stride + hkv * p.k_head_stride;
  const Element* v = static_cast<const Element*>(p.v) + si.batch * p.v_batch_stride + hkv * p.v_head_stride;

  // Q: gather the tile's rows (token t, head hkv*G + g); rows past the sequence are zero.
  load_rows_async<kBlockM, kDk, kThreads>(
      sQ, [&](int r) { return qt.row(q, p.q_row_stride, p.q_head_stride, r); },
      static_cast<const Element*>(p.q), tid);
  cute::cp_async_fence();

  Schedule sched;
  sched.init(p, si, qt.t_lo, qt.t_hi, hkv, smem_schedule, tid);
  const int64_t key_row0 = sched.key_row0();

  typename Traits::TiledMma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);
  Tensor tSrK = thr_mma.partition_fragment_B(sK);
  Tensor tOrVt = thr_mma.partition_fragment_B(sVtNoSwizzle);
  Tensor acc_o = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kDv>>{});
  clear(acc_o);
  Tensor acc_o_rc = make_tensor(acc_o.data(), acc_rowcol(acc_o.layout()));

  auto copy_q = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, mma);
  auto thr_copy_q = copy_q.get_thread_slice(tid);
  Tensor tSsQ = thr_copy_q.partition_S(sQ);
  auto copy_k = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, mma);
  auto thr_copy_k = copy_k.get_thread_slice(tid);
  Tensor tSsK = thr_copy_k.partition_S(sK);
  auto copy_v = make_tiled_copy_B(typename Traits::SmemCopyAtomT{}, mma);
  auto thr_copy_v = copy_v.get_thread_slice(tid);
  Tensor tOsVt = thr_copy_v.partition_S(sVt);

  // (row, col) of each accumulator element of an S tile, in the rows x cols view.
  Tensor cS = make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor tScS = thr_mma.partition_C(cS);
  Tensor tScS_rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));
  constexpr int kRows = decltype(size<0>(tScS_rc))::value;
  int64_t row_t[kRows];
  bool row_ok[kRows];
  tile_row_tokens(qt, tScS_rc, row_t, row_ok);

  OnlineSoftmax<kRows> softmax;
  const float scale_log2 = float(p.scale) * kLog2e;

  KvTile tile;
  bool have = sched.next(tile);
  if constexpr (kStages == 1) {
    if (have) load_kv_tile<kBlockN, kDk, kThreads>(sK, k, p.k_row_stride, key_row0, tile, tid);
    cute::cp_async_fence();

    while (have) {
      cute::cp_async_wait<0>();
      __syncthreads();  // K (and Q) landed; everyone is done with the previous V
      load_kv_tile<kBlockN, kDv, kThreads>(sV, v, p.v_row_stride, key_row0, tile, tid);
      cute::cp_async_fence();

      // Warp-uniform: the loads and barriers above and below run for every warp.
      const bool warp_sees = warp_sees_tile(sched, tile, row_ok, row_t);
      Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
      Tensor rP = make_tensor<Element>(acc_s.layout());
      if (warp_sees) {
        clear(acc_s);
        gemm_ss(acc_s, tSrQ, tSrK, tSsQ, tSsK, mma, copy_q, copy_k, thr_copy_q, thr_copy_k);
        Tensor scores = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));
        if (tile.need_mask) mask_scores(scores, tScS_rc, sched, tile, row_ok, row_t);
        softmax.update(scores, acc_o_rc, scale_log2);
        convert_fragment(acc_s, rP);
      }
      Tensor tOrP = make_tensor(rP.data(), acc_as_a_operand(rP.layout()));

      cute::cp_async_wait<0>();
      __syncthreads();  // V landed; everyone is done reading K
      KvTile next_tile;
      const bool have_next = sched.next(next_tile);
      if (have_next) load_kv_tile<kBlockN, kDk, kThreads>(sK, k, p.k_row_stride, key_row0, next_tile, tid);
      cute::cp_async_fence();

      if (warp_sees) gemm_rs(acc_o, tOrP, tOrVt, tOsVt, mma, copy_v, thr_copy_v);
      tile = next_tile;
      have = have_next;
    }
  } else {
    auto load_kv = [&](auto stage, const KvTile& t) {
      constexpr int off = decltype(stage)::value * kStageElems;
      auto sK_st = shifted(sK, off);
      auto sV_st = shifted(sV, off);
      load_kv_tile<kBlockN, kDk, kThreads>(sK_st, k, p.k_row_stride, key_row0, t, tid);
      load_kv_tile<kBlockN, kDv, kThreads>(sV_st, v, p.v_row_stride, key_row0, t, tid);
    };
    // This warp's S = Q K^T of `tile`, its mask, the online softmax and P, with K
    // `off` elements past stage 0. (The one-stage loop above keeps its own copy of
    // these lines: through this helper ptxas spilled in the compressed and window
    // kernels, and inline here it spilled in this one; sass_report.py.)
    using TileP = decltype(make_tensor<Element>(
        partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{}).layout()));
    auto tile_probs = [&](const KvTile& t, int off, TileP& rP) {
      Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
      clear(acc_s);
      gemm_ss(acc_s, tSrQ, tSrK, tSsQ, shifted(tSsK, off), mma, copy_q, copy_k, thr_copy_q, thr_copy_k);
      Tensor scores = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));
      if (t.need_mask) mask_scores(scores, tScS_rc, sched, t, row_ok, row_t);
      softmax.update(scores, acc_o_rc, scale_log2);
      convert_fragment(acc_s, rP);
    };
    auto tile_pv = [&](const TileP& rP, int off) {
      Tensor tOrP = make_tensor(rP.data(), acc_as_a_operand(rP.layout()));
      gemm_rs(acc_o, tOrP, tOrVt, shifted(tOsVt, off), mma, copy_v, thr_copy_v);
    };
    // The stage a compile-time constant (tiles come in pairs), as in the dq kernel.
    auto run_tile = [&](auto stage) {
      constexpr int off = decltype(stage)::value * kStageElems;
      KvTile next_tile;
      const bool have_next = sched.next(next_tile);
      cute::cp_async_wait<0>();
      __syncthreads();  // this stage's K, V (and Q) landed; everyone is done with the other stage
      if (have_next) load_kv(Int<1 - decltype(stage)::value>{}, next_tile);
      cute::cp_async_fence();
      if (warp_sees_tile(sched, tile, row_ok, row_t)) {  // warp-uniform; no barrier below
        TileP rP;
        tile_probs(tile, off, rP);
        tile_pv(rP, off);
      }
      tile = next_tile;
      have = have_next;
    };
    if (have) load_kv(_0{}, tile);
    cute::cp_async_fence();
    while (have) {
      run_tile(_0{});
      if (have) run_tile(_1{});
    }
  }

  // Epilogue: normalise, write lse (one thread of each quad) and O (through smem
  // so that each row goes out in 16-byte stores).
  float lse[kRows];
  softmax.finalize(acc_o_rc, float(p.scale), lse);
  store_lse_rows(p, qt, tScS_rc, row_ok, row_t, lse, tid);
  Element* o = static_cast<Element*>(p.o) + si.batch * p.o_batch_stride;
  store_acc_rows<kBlockM, kDv, kThreads, Element>(
      acc_o, sO, thr_mma, tid, [&](int r) { return qt.row(o, p.o_row_stride, p.o_head_stride, r); });
}

// Launches a forward kernel of either family (`kernel`: attn_fwd_kernel here, or the
// Hopper attn_fwd_sm90_kernel) over the query tiles: one CTA per (kBlockM rows,
// kv head, sequence), fwd_smem_tiles bytes of tiles plus the schedule's.
template <class Traits, class Schedule, int kStages = 1, class Kernel>
void launch_attn_fwd(const AttnFwdParams& p, cudaStream_t stream, const char* what, Kernel kernel) {
  const int64_t m_blocks = (p.seqlen * p.group + Traits::kBlockM - 1) / Traits::kBlockM;
  if (m_blocks == 0 || p.num_heads_kv == 0 || p.num_seqs == 0) return;
  if (m_blocks > INT32_MAX || p.num_heads_kv > 65535 || p.num_seqs > 65535)
    throw std::runtime_error(std::string("nsa_cuda: ") + what + ": problem too large for the grid");
  const int smem = fwd_smem_tiles<Traits, kStages>() + Schedule::smem_bytes(p);
  set_smem_limit(kernel, smem, what, Schedule::smem_hint(p));
  dim3 grid(unsigned(m_blocks), unsigned(p.num_heads_kv), unsigned(p.num_seqs));
  NSA_LAUNCH(grid, Traits::kThreads, smem, stream, kernel)(p);
  check_launch(what);
}

template <int kDk, int kDv, DType kDType>
void run_attn_fwd(const AttnFwdParams& p, cudaStream_t stream) {
  using Traits = AttnTraits<kDk, kDv, typename ElementOf<kDType>::type>;
#ifdef NSA_SM90A_BUILT
  if (p.branch != Branch::kSelected && use_sm90_kernels()) return run_attn_fwd_sm90<kDk, kDv, kDType>(p, stream);
#endif
  switch (p.branch) {
    case Branch::kCompressed: {
      using S = CompressedSchedule<Traits::kBlockN>;
      launch_attn_fwd<Traits, S>(p, stream, "compressed_attn_fwd", attn_fwd_kernel<Traits, S>);
      break;
    }
    case Branch::kSelected: {
      using S = SelectedSchedule<Traits::kBlockM, Traits::kBlockN, Traits::kThreads>;
      if (selected_fwd_stages(fwd_smem_tiles<Traits, 2>() + S::smem_bytes(p)) == 2) {
        launch_attn_fwd<Traits, S, 2>(p, stream, "selected_attn_fwd", attn_fwd_kernel<Traits, S, 2>);
      } else {
        launch_attn_fwd<Traits, S>(p, stream, "selected_attn_fwd", attn_fwd_kernel<Traits, S, 1>);
      }
      break;
    }
    case Branch::kWindow: {
      using S = WindowSchedule<Traits::kBlockN>;
      launch_attn_fwd<Traits, S>(p, stream, "window_attn_fwd", attn_fwd_kernel<Traits, S>);
      break;
    }
  }
}

}  // namespace nsa::cuda
