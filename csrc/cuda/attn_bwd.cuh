// The attention backward of the three branches (FlashAttention-2 style, with
// delta preprocessing) and its launcher:
//   1. preprocess: delta = rowsum(o * do) - dlse per (token, query head);
//   2. dq, query-side: the forward's CTA tiling and KV schedules (kv_schedule.cuh);
//      dq += scale * dS K over the KV tiles a row visits;
//   3. dk/dv, KV-side: a CTA owns kBlockN keys of one (sequence, kv head) and
//      visits the query rows that see them (q_schedule.cuh); it computes the
//      transposed tiles S^T = K Q^T and dP^T = V dO^T so that P^T and dS^T are
//      already A operands in registers: dv += P^T dO, dk += scale * dS^T Q.
//      The compressed and selected branches split a key tile's queries over several
//      CTAs where there are many (q_schedule.cuh): fp32 partial sums, added in chunk
//      order by attn_bwd_dkdv_reduce_kernel.
// Every gradient row is written once by one CTA: no atomics, bitwise repeatable.
// Both kernels hold four tiles in smem: Q, dO (query rows) and K, V (keys); 64 rows
// each, except the streamed ones for Dk >= 128 (kBlockS = 32). The streamed tiles
// (dq: K, V; dk/dv: Q, dO) are double-buffered: the next step's cp.async copies
// run under this step's GEMMs, with one barrier per step.
#pragma once

#include <algorithm>
#include <cstdlib>

#include "cuda/attn_traits.cuh"
#include "cuda/kv_schedule.cuh"
#include "cuda/query_tile.cuh"
#include "cuda/q_schedule.cuh"

namespace nsa::cuda {

template <int kDk_, int kDv_, class Element_>
struct AttnBwdTraits : AttnTraits<kDk_, kDv_, Element_> {
  using Base = AttnTraits<kDk_, kDv_, Element_>;
  static_assert(Base::kBlockM == Base::kBlockN);
  // Rows of the streamed tiles: the dq kernel's KV tiles and the dk/dv kernel's
  // query tiles. Each kernel keeps a 64-row fp32 accumulator of width Dk (and Dv)
  // in registers, so for Dk >= 128 the S / dP tiles shrink to 64 x 32 to stay
  // within 255 registers. The fixed tiles (dq: Q, dO; dk/dv: K, V) keep 64 rows.
  static constexpr int kBlockS = Base::kDk >= 128 ? 32 : 64;
  using SmemLayoutSk = decltype(cute::tile_to_shape(typename Base::SmemAtom{},
                                                    cute::Shape<cute::Int<kBlockS>, cute::Int<Base::kDk>>{}));
  using SmemLayoutSv = decltype(cute::tile_to_shape(typename Base::SmemAtom{},
                                                     cute::Shape<cute::Int<kBlockS>, cute::Int<Base::kDv>>{}));
  using SmemLayoutSkt = decltype(cute::composition(
      SmemLayoutSk{}, cute::make_layout(cute::Shape<cute::Int<Base::kDk>, cute::Int<kBlockS>>{},
                                        cute::GenRowMajor{})));
  using SmemLayoutSvt = decltype(cute::composition(
      SmemLayoutSv{}, cute::make_layout(cute::Shape<cute::Int<Base::kDv>, cute::Int<kBlockS>>{},
                                         cute::GenRowMajor{})));
  using SmemLayoutSktNoSwizzle = decltype(cute::get_nonswizzle_portion(SmemLayoutSkt{}));
  using SmemLayoutSvtNoSwizzle = decltype(cute::get_nonswizzle_portion(SmemLayoutSvt{}));
  // Smem: two fixed 64-row tiles (Dk and Dv wide) and two streamed kBlockS-row
  // tiles, double-buffered so that the next step's copies overlap this step's
  // GEMMs. A stage of the streamed tiles is kStageElems elements (a multiple of the
  // swizzle period, so a stage is the stage-0 tensor moved by kStageElems). The
  // dk/dv kernel adds its per-row data (kRowWords words per query row and stage),
  // the dq kernel its KV schedule's data.
  static constexpr int kStageElems = kBlockS * (Base::kDk + Base::kDv);
  static_assert(kStageElems % 512 == 0 && (kBlockS * Base::kDk) % 512 == 0);
  static constexpr int kStages = 2;
  static constexpr int kSmemStreamTiles =
      Base::kSmemK + Base::kSmemV + kStages * kStageElems * int(sizeof(Element_));
  // The dk/dv kernel's row data: DkvRowData::kWords words per query row and stage.
  static constexpr int kSmemDkv = kSmemStreamTiles + kStages * 4 * kBlockS * 4;
  // The dQ / dK GEMMs have N = Dk: no B prefetch when that is wide (gemm_rs).
  static constexpr bool kPrefetchWideB = Base::kDk < 192;
};

// The gradient of o is dout_scale * dout: the scale of row (batch, row, head), 1
// without one.
__device__ __forceinline__ float dout_scale(const AttnBwdParams& p, int64_t batch, int64_t row,
                                            int64_t h) {
  if (p.dout_scale == nullptr) return 1.f;
  return static_cast<const float*>(p.dout_scale)[batch * p.ds_batch_stride +
                                                 row * p.ds_row_stride + h * p.ds_head_stride];
}

// --- 1. delta -----------------------------------------------------------------
// One warp per (token row, query head); 16-byte loads, fp32 sum.
template <class Element, int kDv>
__global__ void __launch_bounds__(128) attn_bwd_delta_kernel(const AttnBwdParams p,
                                                             const AttnBwdWorkspace ws) {
  static_assert(kDv % 8 == 0 && kDv / 8 <= 32);
  const SeqInfo si = token_seq_info(p.cu_seqlens, blockIdx.z, p.seqlen);
  const int64_t w = int64_t(blockIdx.x) * 4 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t t = w / p.num_heads_q, h = w % p.num_heads_q;
  if (t >= si.len) return;
  float sum = 0.f;
  if (lane < kDv / 8) {
    const Element* o = static_cast<const Element*>(p.o) + si.batch * p.o_batch_stride +
                       (si.row0 + t) * p.o_row_stride + h * p.o_head_stride + lane * 8;
    const Element* d = static_cast<const Element*>(p.dout) + si.batch * p.do_batch_stride +
                       (si.row0 + t) * p.do_row_stride + h * p.do_head_stride + lane * 8;
    const Vec8<Element> ov = load_vec8(o), dv = load_vec8(d);
#pragma unroll
    for (int i = 0; i < 8; ++i) sum += float(ov[i]) * float(dv[i]);
  }
  sum = quad_allreduce<32>(sum, SumOp{});
  if (lane == 0) {
    const int64_t idx = si.batch * p.lse_batch_stride + h * p.lse_head_stride + si.row0 + t;
    sum *= dout_scale(p, si.batch, si.row0 + t, h);
    if (p.dlse != nullptr) sum -= static_cast<const float*>(p.dlse)[idx];
    // A row with lse = -inf saw no key: P = 0 everywhere, and the CPU backward skips
    // it. delta = 0 keeps a non-finite dlse (or o . do) there out of
    // dS = P (dP - delta), where 0 * inf would be NaN.
    if (static_cast<const float*>(p.lse)[idx] == -INFINITY) sum = 0.f;
    ws.delta[idx] = sum;
  }
}

// log2-domain lse of a row; +inf for a row that saw no key (or no row), so that
// exp2(s * scale_log2 - lse2) is 0 there instead of NaN.
__device__ __forceinline__ float lse_log2(float lse) {
  return lse == -INFINITY ? INFINITY : lse * kLog2e;
}

// With g the row's dout scale (the gradient of o is g * dout, and dp holds dout . v):
// g * P, P = exp(scale * s - lse) where visible else 0, into `s` (dV's A operand);
// dS = P * (g * dp - delta) into `dp`. (rows, cols) views of two accumulators of one
// shape; info(mi, ni) gives {visible, lse2, delta, g} of an element.
template <class S, class DP, class Info>
__device__ __forceinline__ void probs_and_dscores(S& s, DP& dp, float scale_log2, const Info& info) {
  using namespace cute;
#pragma unroll
  for (int mi = 0; mi < size<0>(s); ++mi) {
#pragma unroll
    for (int ni = 0; ni < size<1>(s); ++ni) {
      const auto [vis, lse2, delta, g] = info(mi, ni);
      const float prob = vis ? exp2f(s(mi, ni) * scale_log2 - lse2) : 0.f;
      s(mi, ni) = prob * g;
      dp(mi, ni) = prob * (g * dp(mi, ni) - delta);
    }
  }
}

struct ElemInfo {
  bool visible;
  float lse2, delta, dout_scale;
};

// Zeroes rows [r_begin, r_end) of a [rows, heads, kCols] gradient for heads
// [h_begin, h_end) (varlen padding rows, owned by no sequence), grid-strided over
// blockIdx.x; with `add` (a gradient of the same layout to add), copies its rows.
template <int kCols, class Element>
__device__ void zero_rows(Element* base, const Element* add, int64_t row_stride,
                          int64_t head_stride, int64_t r_begin, int64_t r_end, int64_t h_begin,
                          int64_t h_end) {
  constexpr int kChunks = kCols / 8;
  const int64_t heads = h_end - h_begin;
  const int64_t total = (r_end - r_begin) * heads * kChunks;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = idx % kChunks, h = h_begin + (idx / kChunks) % heads;
    const int64_t r = r_begin + idx / (kChunks * heads);
    const int64_t off = r * row_stride + h * head_stride + c * 8;
    *reinterpret_cast<cute::uint128_t*>(base + off) =
        add == nullptr ? cute::uint128_t{0, 0}
                       : *reinterpret_cast<const cute::uint128_t*>(add + off);
  }
}

// store_acc_rows' row_add for a gradient `out` with an input `in` to add (same
// layout; nullptr: none): the row of `in` at the offset the row has in `out`.
template <class Element>
__device__ __forceinline__ auto added_row(const Element* out, const Element* in) {
  return [=](int, const Element* dst) -> const Element* {
    return in == nullptr ? nullptr : in + (dst - out);
  };
}

// --- 2. dq (query-side) -------------------------------------------------------
// Shared by the SM80 dq kernel below and the Hopper one (attn_bwd_sm90.cuh).

// Varlen: the z slice past the last sequence zeroes (or, with dq_in, copies) the dq
// rows past cu_seqlens[-1] that no sequence owns; true when this CTA is that slice.
template <int kDk, class Element>
__device__ __forceinline__ bool dq_padding_rows(const AttnBwdParams& p, const AttnBwdWorkspace& ws) {
  if (blockIdx.z != p.num_seqs) return false;
  const int64_t hkv = blockIdx.y;
  zero_rows<kDk>(static_cast<Element*>(p.dq), static_cast<const Element*>(p.dq_in), p.dq_row_stride,
                 p.dq_head_stride, p.cu_seqlens[p.num_seqs], ws.q_rows, hkv * p.group,
                 (hkv + 1) * p.group);
  return true;
}

// Per accumulator row of this thread: its token and existence, lse in log2 units,
// delta and dout scale (rows past the sequence: see nothing, scale 0).
template <int kRows>
struct DqRows {
  int64_t t[kRows];
  bool ok[kRows];
  float lse2[kRows], delta[kRows], scale[kRows];

  template <class Coords>
  __device__ __forceinline__ DqRows(const AttnBwdParams& p, const AttnBwdWorkspace& ws,
                                    const QueryTile& qt, const Coords& coords) {
    using namespace cute;
    tile_row_tokens(qt, coords, t, ok);
    const float* lse = static_cast<const float*>(p.lse) + qt.si.batch * p.lse_batch_stride;
    const float* dl = ws.delta + qt.si.batch * p.lse_batch_stride;
#pragma unroll
    for (int mi = 0; mi < kRows; ++mi) {
      const int64_t f = qt.f0 + get<0>(coords(mi, 0));
      const int64_t h = qt.hkv * qt.group + f % qt.group;
      const int64_t idx = h * p.lse_head_stride + qt.si.row0 + t[mi];
      lse2[mi] = ok[mi] ? lse_log2(lse[idx]) : INFINITY;
      delta[mi] = ok[mi] ? dl[idx] : 0.f;
      scale[mi] = ok[mi] ? dout_scale(p, qt.si.batch, qt.si.row0 + t[mi], h) : 0.f;
    }
  }
  __device__ __forceinline__ ElemInfo info(int mi) const {
    return ElemInfo{true, lse2[mi], delta[mi], scale[mi]};
  }
};

// The dq kernels' fixed tiles: the query rows of q (Dk) and of dout (Dv).
template <int kBlockM, int kDk, int kDv, int kThreads, class Element, class SQ, class SdO>
__device__ __forceinline__ void load_dq_query_tiles(const AttnBwdParams& p, const QueryTile& qt,
                                                    SQ& sQ, SdO& sdO, int tid) {
  const Element* q = static_cast<const Element*>(p.q) + qt.si.batch * p.q_batch_stride;
  const Element* dout = static_cast<const Element*>(p.dout) + qt.si.batch * p.do_batch_stride;
  load_rows_async<kBlockM, kDk, kThreads>(
      sQ, [&](int r) { return qt.row(q, p.q_row_stride, p.q_head_stride, r); },
      static_cast<const Element*>(p.q), tid);
  load_rows_async<kBlockM, kDv, kThreads>(
      sdO, [&](int r) { return qt.row(dout, p.do_row_stride, p.do_head_stride, r); },
      static_cast<const Element*>(p.dout), tid);
}

// S (acc_s) and dP (acc_dp) of a dq tile -> g * P in acc_s and dS in acc_dp, through
// their (rows, cols) views. Scale before masking (as the forward does): a masked
// -inf scaled afterwards would be +inf for scale < 0 and NaN for scale == 0 (both
// allowed); masked entries then give exp2(-inf - lse2) = 0 for any scale.
template <class AccS, class Scores, class DScores, class Coords, class Schedule, class Rows>
__device__ __forceinline__ void dq_tile_dscores(AccS& acc_s, Scores& scores, DScores& dscores,
                                                const Coords& coords, const Schedule& sched,
                                                const KvTile& tile, const Rows& rows, float scale_log2) {
#pragma unroll
  for (int i = 0; i < cute::size(acc_s); ++i) acc_s(i) *= scale_log2;
  if (tile.need_mask) mask_scores(scores, coords, sched, tile, rows.ok, rows.t);
  probs_and_dscores(scores, dscores, 1.f, [&](int mi, int) { return rows.info(mi); });
}

// The dq rows staged in `s` (kBlockM x kDk, already scaled) to dq (+ dq_in), by
// kThreads threads.
template <int kBlockM, int kDk, int kThreads, class Element, class SmemTensor>
__device__ __forceinline__ void store_staged_dq_rows(const AttnBwdParams& p, const QueryTile& qt,
                                                     const SmemTensor& s, int tid) {
  Element* dq = static_cast<Element*>(p.dq);
  Element* dq_b = dq + qt.si.batch * p.dq_batch_stride;
  store_staged_rows<kBlockM, kDk, kThreads, Element>(
      s, tid, [&](int r) { return qt.row(dq_b, p.dq_row_stride, p.dq_head_stride, r); },
      added_row(dq, static_cast<const Element*>(p.dq_in)));
}

// dq = scale * acc_dq (+ dq_in), written through the smem tile `s`.
template <int kBlockM, int kDk, int kThreads, class Element, class Acc, class SmemTensor, class ThrMma>
__device__ __forceinline__ void store_dq_rows(const AttnBwdParams& p, const QueryTile& qt, Acc& acc_dq,
                                              SmemTensor& s, const ThrMma& thr_mma, int tid) {
#pragma unroll
  for (int i = 0; i < cute::size(acc_dq); ++i) acc_dq(i) *= float(p.scale);
  stage_acc<Element>(acc_dq, s, thr_mma);
  store_staged_dq_rows<kBlockM, kDk, kThreads, Element>(p, qt, s, tid);
}

template <class Traits, class Schedule>
__global__ void __launch_bounds__(Traits::kThreads)
    attn_bwd_dq_kernel(const AttnBwdParams p, const AttnBwdWorkspace ws) {
  using namespace cute;
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockS;  // keys per KV tile (the schedule's kBlockN)
  constexpr int kDk = Traits::kDk;
  constexpr int kDv = Traits::kDv;
  constexpr int kThreads = Traits::kThreads;

  // 1024, as the wgmma kernels (same TUs) declare it: one alignment per name.
  extern __shared__ __align__(1024) char smem[];
  const int tid = threadIdx.x;
  const int hkv = blockIdx.y;
  if (dq_padding_rows<kDk, Element>(p, ws)) return;
  QueryTile qt;
  if (!query_tile<Schedule>(p, kBlockM, qt)) return;
  const SeqInfo& si = qt.si;

  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem)), typename Traits::SmemLayoutQ{});
  Tensor sdO = make_tensor(sQ.data() + size(sQ), typename Traits::SmemLayoutO{});
  // Stage 0 of K, V; stage 1 is the same tensors moved by kStageElems.
  Tensor sK = make_tensor(sdO.data() + size(sdO), typename Traits::SmemLayoutSk{});
  Tensor sV = make_tensor(sK.data() + size(sK), typename Traits::SmemLayoutSv{});
  Tensor sKt = make_tensor(sK.data(), typename Traits::SmemLayoutSkt{});
  Tensor sKtNoSwizzle = make_tensor(sK.data().get(), typename Traits::SmemLayoutSktNoSwizzle{});
  char* smem_schedule = smem + Traits::kSmemStreamTiles;

  const Element* k = static_cast<const Element*>(p.k) + si.batch * p.k_batch_stride + hkv * p.k_head_stride;
  const Element* v = static_cast<const Element*>(p.v) + si.batch * p.v_batch_stride + hkv * p.v_head_stride;
  load_dq_query_tiles<kBlockM, kDk, kDv, kThreads, Element>(p, qt, sQ, sdO, tid);
  cute::cp_async_fence();

  Schedule sched;
  sched.init(p, si, qt.t_lo, qt.t_hi, hkv, smem_schedule, tid);
  const int64_t key_row0 = sched.key_row0();

  typename Traits::TiledMma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);
  Tensor tSrK = thr_mma.partition_fragment_B(sK);
  Tensor tdPrdO = thr_mma.partition_fragment_A(sdO);
  Tensor tdPrV = thr_mma.partition_fragment_B(sV);
  Tensor tdQrKt = thr_mma.partition_fragment_B(sKtNoSwizzle);
  Tensor acc_dq = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kDk>>{});
  clear(acc_dq);

  auto copy_a = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, mma);
  auto thr_copy_a = copy_a.get_thread_slice(tid);
  auto copy_b = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, mma);
  auto thr_copy_b = copy_b.get_thread_slice(tid);
  auto copy_bt = make_tiled_copy_B(typename Traits::SmemCopyAtomT{}, mma);
  auto thr_copy_bt = copy_bt.get_thread_slice(tid);
  Tensor tSsQ = thr_copy_a.partition_S(sQ);
  Tensor tdPsdO = thr_copy_a.partition_S(sdO);
  Tensor tSsK = thr_copy_b.partition_S(sK);
  Tensor tdPsV = thr_copy_b.partition_S(sV);
  Tensor tdQsKt = thr_copy_bt.partition_S(sKt);

  Tensor cS = make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor tScS = thr_mma.partition_C(cS);
  Tensor tScS_rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));
  const DqRows<decltype(size<0>(tScS_rc))::value> rows(p, ws, qt, tScS_rc);
  const float scale_log2 = float(p.scale) * kLog2e;

  auto load_kv = [&](auto stage, const KvTile& tile) {
    constexpr int kOff = decltype(stage)::value * Traits::kStageElems;
    auto sK_st = shifted(sK, kOff);
    auto sV_st = shifted(sV, kOff);
    load_kv_tile<kBlockN, kDk, kThreads>(sK_st, k, p.k_row_stride, key_row0, tile, tid);
    load_kv_tile<kBlockN, kDv, kThreads>(sV_st, v, p.v_row_stride, key_row0, tile, tid);
  };

  // Two-stage pipeline, the stage a compile-time constant (tiles come in pairs):
  // the next KV tile's copies are in flight while this one's three GEMMs run.
  KvTile tile;
  bool have = sched.next(tile);
  auto run_tile = [&](auto stage) {
    constexpr int kStage = decltype(stage)::value;
    constexpr int off = kStage * Traits::kStageElems;
    KvTile next_tile;
    const bool have_next = sched.next(next_tile);
    cute::cp_async_wait<0>();
    __syncthreads();  // this stage's K, V (and Q, dO) landed; everyone is done with the other stage
    if (have_next) load_kv(Int<1 - kStage>{}, next_tile);
    cute::cp_async_fence();

    if (warp_sees_tile(sched, tile, rows.ok, rows.t)) {  // warp-uniform; no barrier below
      Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
      clear(acc_s);
      gemm_ss(acc_s, tSrQ, tSrK, tSsQ, shifted(tSsK, off), mma, copy_a, copy_b, thr_copy_a,
              thr_copy_b);
      Tensor acc_dp = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
      clear(acc_dp);
      gemm_ss(acc_dp, tdPrdO, tdPrV, tdPsdO, shifted(tdPsV, off), mma, copy_a, copy_b, thr_copy_a,
              thr_copy_b);

      Tensor scores = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));
      Tensor dscores = make_tensor(acc_dp.data(), acc_rowcol(acc_dp.layout()));
      dq_tile_dscores(acc_s, scores, dscores, tScS_rc, sched, tile, rows, scale_log2);

      Tensor rdS = make_tensor<Element>(acc_dp.layout());
      convert_fragment(acc_dp, rdS);
      Tensor tdQrdS = make_tensor(rdS.data(), acc_as_a_operand(rdS.layout()));
      gemm_rs<Traits::kPrefetchWideB>(acc_dq, tdQrdS, tdQrKt, shifted(tdQsKt, off), mma, copy_bt,
                                      thr_copy_bt);
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

  store_dq_rows<kBlockM, kDk, kThreads, Element>(p, qt, acc_dq, sQ, thr_mma, tid);
}

// --- 3. dk, dv (KV-side) ------------------------------------------------------
// Shared by the SM80 dk/dv kernel below and the Hopper one (attn_bwd_sm90.cuh).

// Varlen: the z slice past the last sequence zeroes (or, with dk_in / dv_in, copies)
// the key rows owned by no sequence; true when this CTA is that slice.
template <int kDk, int kDv, class Element, class QSchedule>
__device__ __forceinline__ bool dkv_padding_rows(const AttnBwdParams& p) {
  if (blockIdx.z != p.num_seqs) return false;
  const int64_t hkv = blockIdx.y, r0 = QSchedule::tail_begin(p);
  zero_rows<kDk>(static_cast<Element*>(p.dk), static_cast<const Element*>(p.dk_in), p.dk_row_stride,
                 p.dk_head_stride, r0, p.k_rows, hkv, hkv + 1);
  zero_rows<kDv>(static_cast<Element*>(p.dv), static_cast<const Element*>(p.dv_in), p.dv_row_stride,
                 p.dv_head_stride, r0, p.k_rows, hkv, hkv + 1);
  return true;
}

// The query rows a dk/dv CTA visits, flattened as the forward's: row f is position
// f / G of the query schedule and head hkv * G + f % G.
template <class QSchedule>
struct DkvQueries {
  const AttnBwdParams& p;
  const AttnBwdWorkspace& ws;
  const QSchedule& qs;
  SeqInfo si;
  int64_t hkv, group, total;

  __device__ DkvQueries(const AttnBwdParams& p_, const AttnBwdWorkspace& ws_, const QSchedule& qs_,
                        const SeqInfo& si_, int64_t hkv_)
      : p(p_), ws(ws_), qs(qs_), si(si_), hkv(hkv_), group(p_.group), total(qs_.n_pos * p_.group) {}
  // The token of row f (-1: none).
  __device__ int64_t token(int64_t f) const { return f < total ? qs.token(f / group) : -1; }
  __device__ int64_t head(int64_t f) const { return hkv * group + f % group; }
  __device__ int64_t steps(int rows_per_step) const { return (total + rows_per_step - 1) / rows_per_step; }

  // The rows [step * kRows, +kRows) of q (Dk) and dout (Dv) into sQ and sdO (a
  // stage). Each copying thread finds its rows' tokens itself, so the copies of a
  // step can be issued in the same barrier interval as its row data is written.
  template <int kRows, int kDk, int kDv, int kThreads, class Element, class SQ, class SdO>
  __device__ void load_tiles(int64_t step, SQ&& sQ, SdO&& sdO, int tid) const {
    const int64_t f0 = step * kRows;
    auto query_row = [&](const void* base, int64_t batch_stride, int64_t row_stride, int64_t head_stride) {
      const Element* b = static_cast<const Element*>(base) + si.batch * batch_stride;
      return [=, this](int r) -> const Element* {
        const int64_t t = token(f0 + r);
        return t < 0 ? nullptr : b + (si.row0 + t) * row_stride + head(f0 + r) * head_stride;
      };
    };
    load_rows_async<kRows, kDk, kThreads>(sQ, query_row(p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride),
                                          static_cast<const Element*>(p.q), tid);
    load_rows_async<kRows, kDv, kThreads>(
        sdO, query_row(p.dout, p.do_batch_stride, p.do_row_stride, p.do_head_stride),
        static_cast<const Element*>(p.dout), tid);
  }
};

// Per query row of a dk/dv step, in smem (one copy per pipeline stage): the CTA's
// keys it sees, [lo, hi) as offsets from kb packed in one word (so that a thread
// holds one per column), its log2-domain lse, delta and dout scale.
struct DkvRowData {
  static constexpr int kWords = 4;
  uint32_t* range;
  float *lse2, *delta, *scale;

  __device__ DkvRowData(void* base, int rows) : range(static_cast<uint32_t*>(base)) {
    float* words = reinterpret_cast<float*>(range + rows);
    lse2 = words, delta = words + rows, scale = words + 2 * rows;
  }
  // {visible, lse2, delta, g} of the element (key r of the CTA, query row c).
  __device__ __forceinline__ ElemInfo info(int r, int c) const {
    const uint32_t rg = range[c];
    return ElemInfo{uint32_t(r) >= (rg & 0xffffu) && uint32_t(r) < (rg >> 16), lse2[c], delta[c], scale[c]};
  }

  // Threads 0 .. kRows-1 write the rows [step * kRows, +kRows).
  template <int kRows, class QSchedule>
  __device__ void fill(const DkvQueries<QSchedule>& qr, int64_t step, int tid) const {
    static_assert(kRows < 65536);
    if (tid >= kRows) return;
    const AttnBwdParams& p = qr.p;
    const int64_t f = step * kRows + tid;
    const int64_t t = qr.token(f);
    int32_t lo = 0, hi = 0;
    float l2 = INFINITY, dl = 0.f, g = 0.f;
    if (t >= 0) {
      const int64_t h = qr.head(f);
      const int64_t idx = qr.si.batch * p.lse_batch_stride + h * p.lse_head_stride + qr.si.row0 + t;
      l2 = lse_log2(static_cast<const float*>(p.lse)[idx]);
      dl = qr.ws.delta[idx];
      g = dout_scale(p, qr.si.batch, qr.si.row0 + t, h);
      int64_t klo, khi;
      qr.qs.key_range(t, klo, khi);
      lo = int32_t(max(klo - qr.qs.kb, int64_t(0)));
      hi = int32_t(max(min(khi, qr.qs.ke) - qr.qs.kb, int64_t(0)));
    }
    range[tid] = uint32_t(lo) | uint32_t(hi) << 16;
    lse2[tid] = l2;
    delta[tid] = dl;
    scale[tid] = g;
  }
};

// The CTA's key rows [kb, ke) of k and v into sK and sV (kBlockN rows; zeros past ke).
template <int kBlockN, int kDk, int kDv, int kThreads, class Element, class QSchedule, class SK, class SV>
__device__ __forceinline__ void load_dkv_key_tiles(const DkvQueries<QSchedule>& qr, SK& sK, SV& sV, int tid) {
  const AttnBwdParams& p = qr.p;
  const QSchedule& qs = qr.qs;
  auto key_row = [&](const void* base, int64_t batch_stride, int64_t row_stride, int64_t head_stride) {
    const Element* b = static_cast<const Element*>(base) + qr.si.batch * batch_stride + qr.hkv * head_stride;
    return [=](int r) -> const Element* {
      return qs.kb + r < qs.ke ? b + (qs.key_row0 + qs.kb + r) * row_stride : nullptr;
    };
  };
  load_rows_async<kBlockN, kDk, kThreads>(sK, key_row(p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride),
                                          static_cast<const Element*>(p.k), tid);
  load_rows_async<kBlockN, kDv, kThreads>(sV, key_row(p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride),
                                          static_cast<const Element*>(p.v), tid);
}

// A kRows x kCols fp32 accumulator into the row-major `out` (a partial sum).
template <int kRows, int kCols, class Acc, class ThrMma>
__device__ __forceinline__ void store_acc_partial(const Acc& acc, float* out, const ThrMma& thr_mma) {
  using namespace cute;
  Tensor g = make_tensor(make_gmem_ptr(out), make_layout(Shape<Int<kRows>, Int<kCols>>{}, LayoutRight{}));
  Tensor tg = thr_mma.partition_C(g);
#pragma unroll
  for (int i = 0; i < size(acc); ++i) tg(i) = acc(i);
}

// One gradient of the CTA's key rows: dk = scale * acc (+ dk_in) with kIsDk, else
// dv = acc (+ dv_in), staged through `s` (sK or sV, no longer read). Every owned key
// row is written, zeros where no query saw it; a split tile's chunk writes its fp32
// partial sum instead. kThreads threads (tid among them) take part.
template <bool kIsDk, int kBlockN, int kDk, int kDv, int kThreads, class Element, class QSchedule, class Acc,
          class S, class Thr>
__device__ __forceinline__ void store_dkv_rows(const DkvQueries<QSchedule>& qr, Acc& acc, S& s, const Thr& thr,
                                               int tid) {
  const AttnBwdParams& p = qr.p;
  const QSchedule& qs = qr.qs;
  constexpr int kD = kIsDk ? kDk : kDv;
  if constexpr (kIsDk) {
#pragma unroll
    for (int i = 0; i < cute::size(acc); ++i) acc(i) *= float(p.scale);
  }
  if constexpr (QSchedule::kSplits) {
    if (qs.slot >= 0) {  // one chunk of the tile's queries: fp32 partial sums [dk | dv]
      float* part = qr.ws.dkv_partial +
                    ((int64_t(blockIdx.z) * p.num_heads_kv + qr.hkv) * qr.ws.dkv_slots + qs.slot) *
                        (kBlockN * (kDk + kDv));
      store_acc_partial<kBlockN, kD>(acc, kIsDk ? part : part + kBlockN * kDk, thr);
      return;
    }
  }
  Element* out = static_cast<Element*>(kIsDk ? p.dk : p.dv);
  const int64_t batch_stride = kIsDk ? p.dk_batch_stride : p.dv_batch_stride;
  const int64_t row_stride = kIsDk ? p.dk_row_stride : p.dv_row_stride;
  const int64_t head_stride = kIsDk ? p.dk_head_stride : p.dv_head_stride;
  Element* b = out + qr.si.batch * batch_stride + qr.hkv * head_stride;
  store_acc_rows<kBlockN, kD, kThreads, Element>(
      acc, s, thr, tid,
      [=, &qs](int r) -> Element* { return qs.kb + r < qs.ke ? b + (qs.key_row0 + qs.kb + r) * row_stride : nullptr; },
      added_row(out, static_cast<const Element*>(kIsDk ? p.dk_in : p.dv_in)));
}

// Both gradients, by all kThreads threads: dk through sK, then dv through sV.
template <int kBlockN, int kDk, int kDv, int kThreads, class Element, class QSchedule, class AccK,
          class AccV, class SK, class SV, class ThrK, class ThrV>
__device__ __forceinline__ void store_dkdv_rows(const DkvQueries<QSchedule>& qr, AccK& acc_dk, AccV& acc_dv,
                                                SK& sK, SV& sV, const ThrK& thr_dk, const ThrV& thr_dv,
                                                int tid) {
  store_dkv_rows<true, kBlockN, kDk, kDv, kThreads, Element>(qr, acc_dk, sK, thr_dk, tid);
  store_dkv_rows<false, kBlockN, kDk, kDv, kThreads, Element>(qr, acc_dv, sV, thr_dv, tid);
}

// The opening of both dk/dv kernels: the varlen padding slice does its rows and
// stops; otherwise the CTA's sequence and query schedule (false: no key row here).
template <int kDk, int kDv, class Element, class QSchedule>
__device__ __forceinline__ bool dkv_cta(const AttnBwdParams& p, const AttnBwdWorkspace& ws, SeqInfo& si,
                                        QSchedule& qs) {
  if (dkv_padding_rows<kDk, kDv, Element, QSchedule>(p)) return false;
  si = QSchedule::seq(p, blockIdx.z);
  return qs.init(p, ws, si, blockIdx.x, blockIdx.y);
}

template <class Traits, class QSchedule>
__global__ void __launch_bounds__(Traits::kThreads)
    attn_bwd_dkdv_kernel(const AttnBwdParams p, const AttnBwdWorkspace ws) {
  using namespace cute;
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockS;  // query rows per step
  constexpr int kBlockN = Traits::kBlockN;  // keys of the CTA
  constexpr int kDk = Traits::kDk;
  constexpr int kDv = Traits::kDv;
  constexpr int kThreads = Traits::kThreads;

  // 1024, as the wgmma kernels (same TUs) declare it: one alignment per name.
  extern __shared__ __align__(1024) char smem[];
  const int tid = threadIdx.x;
  SeqInfo si;
  QSchedule qs;
  if (!dkv_cta<kDk, kDv, Element>(p, ws, si, qs)) return;
  const DkvQueries<QSchedule> qr(p, ws, qs, si, blockIdx.y);

  // Key-side tiles in the A-operand roles, query-side tiles as B operands.
  Tensor sK = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem)), typename Traits::SmemLayoutK{});
  Tensor sV = make_tensor(sK.data() + size(sK), typename Traits::SmemLayoutV{});
  Tensor sQ = make_tensor(sV.data() + size(sV), typename Traits::SmemLayoutSk{});
  Tensor sdO = make_tensor(sQ.data() + size(sQ), typename Traits::SmemLayoutSv{});
  Tensor sQt = make_tensor(sQ.data(), typename Traits::SmemLayoutSkt{});
  Tensor sQtNoSwizzle = make_tensor(sQ.data().get(), typename Traits::SmemLayoutSktNoSwizzle{});
  Tensor sdOt = make_tensor(sdO.data(), typename Traits::SmemLayoutSvt{});
  Tensor sdOtNoSwizzle = make_tensor(sdO.data().get(), typename Traits::SmemLayoutSvtNoSwizzle{});
  auto row_data = [&](auto stage) {
    return DkvRowData(smem + Traits::kSmemStreamTiles + decltype(stage)::value * DkvRowData::kWords * kBlockM * 4,
                      kBlockM);
  };

  load_dkv_key_tiles<kBlockN, kDk, kDv, kThreads, Element>(qr, sK, sV, tid);
  cute::cp_async_fence();

  typename Traits::TiledMma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  Tensor tSrK = thr_mma.partition_fragment_A(sK);
  Tensor tSrQ = thr_mma.partition_fragment_B(sQ);
  Tensor tdPrV = thr_mma.partition_fragment_A(sV);
  Tensor tdPrdO = thr_mma.partition_fragment_B(sdO);
  Tensor tdVrdOt = thr_mma.partition_fragment_B(sdOtNoSwizzle);
  Tensor tdKrQt = thr_mma.partition_fragment_B(sQtNoSwizzle);
  Tensor acc_dk = partition_fragment_C(mma, Shape<Int<kBlockN>, Int<kDk>>{});
  Tensor acc_dv = partition_fragment_C(mma, Shape<Int<kBlockN>, Int<kDv>>{});
  clear(acc_dk);
  clear(acc_dv);

  auto copy_a = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, mma);
  auto thr_copy_a = copy_a.get_thread_slice(tid);
  auto copy_b = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, mma);
  auto thr_copy_b = copy_b.get_thread_slice(tid);
  auto copy_bt = make_tiled_copy_B(typename Traits::SmemCopyAtomT{}, mma);
  auto thr_copy_bt = copy_bt.get_thread_slice(tid);
  Tensor tSsK = thr_copy_a.partition_S(sK);
  Tensor tdPsV = thr_copy_a.partition_S(sV);
  Tensor tSsQ = thr_copy_b.partition_S(sQ);
  Tensor tdPsdO = thr_copy_b.partition_S(sdO);
  Tensor tdVsdOt = thr_copy_bt.partition_S(sdOt);
  Tensor tdKsQt = thr_copy_bt.partition_S(sQt);

  // (key, query row) of each element of an S^T tile.
  Tensor cS = make_identity_tensor(Shape<Int<kBlockN>, Int<kBlockM>>{});
  Tensor tScS = thr_mma.partition_C(cS);
  Tensor tScS_rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));
  const float scale_log2 = float(p.scale) * kLog2e;
  const int64_t steps = qr.steps(kBlockM);

  // Two-stage pipeline, the stage a compile-time constant (steps come in pairs):
  // step i computes with stage i % 2 while the copies and the row data of step
  // i + 1 go to the other stage, last read by step i - 1 before this step's barrier.
  auto run_step = [&](int64_t step, auto stage) {
    constexpr int kStage = decltype(stage)::value;
    constexpr int kOff = kStage * Traits::kStageElems;
    constexpr int kNextOff = (1 - kStage) * Traits::kStageElems;
    cute::cp_async_wait<0>();
    __syncthreads();  // this step's Q, dO, row data (and K, V) landed; step - 1 is done
    if (step + 1 < steps)
      qr.template load_tiles<kBlockM, kDk, kDv, kThreads, Element>(step + 1, shifted(sQ, kNextOff),
                                                                   shifted(sdO, kNextOff), tid);
    cute::cp_async_fence();
    if (step + 1 < steps) row_data(Int<1 - kStage>{}).template fill<kBlockM>(qr, step + 1, tid);
    const DkvRowData rd = row_data(stage);

    Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBlockN>, Int<kBlockM>>{});
    clear(acc_s);
    gemm_ss(acc_s, tSrK, tSrQ, tSsK, shifted(tSsQ, kOff), mma, copy_a, copy_b, thr_copy_a, thr_copy_b);
    Tensor acc_dp = partition_fragment_C(mma, Shape<Int<kBlockN>, Int<kBlockM>>{});
    clear(acc_dp);
    gemm_ss(acc_dp, tdPrV, tdPrdO, tdPsV, shifted(tdPsdO, kOff), mma, copy_a, copy_b, thr_copy_a,
            thr_copy_b);

    Tensor scores = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));
    Tensor dscores = make_tensor(acc_dp.data(), acc_rowcol(acc_dp.layout()));
    probs_and_dscores(scores, dscores, scale_log2, [&](int mi, int ni) {
      return rd.info(get<0>(tScS_rc(mi, ni)), get<1>(tScS_rc(mi, ni)));
    });

    Tensor rP = make_tensor<Element>(acc_s.layout());
    convert_fragment(acc_s, rP);
    Tensor tdVrP = make_tensor(rP.data(), acc_as_a_operand(rP.layout()));
    gemm_rs(acc_dv, tdVrP, tdVrdOt, shifted(tdVsdOt, kOff), mma, copy_bt, thr_copy_bt);
    Tensor rdS = make_tensor<Element>(acc_dp.layout());
    convert_fragment(acc_dp, rdS);
    Tensor tdKrdS = make_tensor(rdS.data(), acc_as_a_operand(rdS.layout()));
    gemm_rs<Traits::kPrefetchWideB>(acc_dk, tdKrdS, tdKrQt, shifted(tdKsQt, kOff), mma, copy_bt,
                                    thr_copy_bt);
  };
  if (steps > 0) {
    row_data(_0{}).template fill<kBlockM>(qr, 0, tid);
    qr.template load_tiles<kBlockM, kDk, kDv, kThreads, Element>(0, sQ, sdO, tid);
  }
  cute::cp_async_fence();
  for (int64_t step = 0; step < steps; step += 2) {
    run_step(step, _0{});
    if (step + 1 < steps) run_step(step + 1, _1{});
  }

  store_dkdv_rows<kBlockN, kDk, kDv, kThreads, Element>(qr, acc_dk, acc_dv, sK, sV, thr_mma, thr_mma, tid);
}

// --- launchers ----------------------------------------------------------------
inline void check_grid(int64_t x, const AttnBwdParams& p, int64_t z, const char* what) {
  if (x > INT32_MAX || p.num_heads_kv > 65535 || z > 65535)
    throw std::runtime_error(std::string("nsa_cuda: ") + what + ": problem too large for the grid");
}

// The split tiles' partial sums, added up in chunk order: dk = sum (+ dk_in), dv
// likewise, for the key rows of tile blockIdx.x that exist in the sequence. One
// thread per 4 columns of a row; bitwise the same every run.
template <int kBlockN, int kDk, int kDv, class Element, class QSchedule>
__global__ void __launch_bounds__(256) attn_bwd_dkdv_reduce_kernel(const AttnBwdParams p,
                                                                   const AttnBwdWorkspace ws) {
  const int64_t j = blockIdx.x, hkv = blockIdx.y;
  const SeqInfo si = QSchedule::seq(p, blockIdx.z);
  QSchedule qs;
  if (!qs.init(p, ws, si, -1, int(hkv), j) || qs.qchunks <= 1) return;
  const int64_t nch = qs.qchunks;
  constexpr int kCols = kDk + kDv, kSlot = kBlockN * kCols;
  const float* part = ws.dkv_partial + ((int64_t(blockIdx.z) * p.num_heads_kv + hkv) * ws.dkv_slots + qs.slot) * kSlot;
  for (int idx = threadIdx.x; idx < kBlockN * kCols / 4; idx += blockDim.x) {
    const int r = idx / (kCols / 4), col = idx % (kCols / 4) * 4;
    if (qs.kb + r >= qs.ke) continue;
    const bool is_k = col < kDk;
    const int off = is_k ? r * kDk + col : kBlockN * kDk + r * kDv + (col - kDk);
    float4 sum = *reinterpret_cast<const float4*>(part + off);
    for (int64_t c = 1; c < nch; ++c) {
      const float4 x = *reinterpret_cast<const float4*>(part + c * kSlot + off);
      sum.x += x.x, sum.y += x.y, sum.z += x.z, sum.w += x.w;
    }
    const int64_t row = qs.key_row0 + qs.kb + r;
    Element* out = is_k ? static_cast<Element*>(p.dk) + si.batch * p.dk_batch_stride + hkv * p.dk_head_stride +
                              row * p.dk_row_stride + col
                        : static_cast<Element*>(p.dv) + si.batch * p.dv_batch_stride + hkv * p.dv_head_stride +
                              row * p.dv_row_stride + (col - kDk);
    const Element* in = static_cast<const Element*>(is_k ? p.dk_in : p.dv_in);
    float v[4] = {sum.x, sum.y, sum.z, sum.w};
    if (in != nullptr) {  // as store_chunk: the gradient rounded, then the input added
      const Element* a = in + (out - static_cast<Element*>(is_k ? p.dk : p.dv));
#pragma unroll
      for (int i = 0; i < 4; ++i) v[i] = float(Element(v[i])) + float(a[i]);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) out[i] = Element(v[i]);
  }
}

// Query positions per chunk of the dk/dv split: NSA_DKV_CHUNK_ROWS (read per call;
// default 65536) flattened query rows, over the group's heads.
inline int64_t dkv_chunk_positions(const AttnBwdParams& p) {
  const char* env = std::getenv("NSA_DKV_CHUNK_ROWS");
  int64_t rows = 65536;
  if (env != nullptr && *env != '\0') {
    char* end = nullptr;
    rows = std::strtoll(env, &end, 10);
    if (*end != '\0' || rows <= 0)
      throw std::runtime_error(std::string("NSA_DKV_CHUNK_ROWS must be a positive integer, got '") + env + "'");
  }
  return std::max<int64_t>(1, rows / std::max<int64_t>(1, p.group));
}

// The dk/dv launch of QSchedule at kBlockN keys per CTA: its CTA count along grid x,
// and for a splitting schedule the chunking, the device-side plan and the partial
// sums in `w` (allocated here). With no key tile (no complete compressed block),
// varlen still has the padding rows to zero: one CTA.
template <class QSchedule, int kBlockN, int kDk, int kDv>
int64_t plan_dkv_split(const AttnBwdParams& p, AttnBwdWorkspace& w, cudaStream_t stream) {
  int64_t n = QSchedule::key_tiles(p);
  if constexpr (QSchedule::kSplits) {
    if (w.alloc != nullptr && n > 0) {
      w.dkv_chunk_pos = dkv_chunk_positions(p);
      int64_t slots = 0;
      QSchedule::split_size(p, w.dkv_chunk_pos, n, slots);
      w.dkv_slots = slots;
      if (slots > 0) {  // else no tile can have two chunks: nothing to plan
        QSchedule::plan_split(p, w, stream);
        const int64_t z = p.num_seqs + (p.cu_seqlens != nullptr ? 1 : 0);
        w.dkv_partial = static_cast<float*>(
            w.alloc(w.alloc_ctx, z * p.num_heads_kv * slots * kBlockN * (kDk + kDv) * int64_t(sizeof(float))));
      }
    }
  }
  return n == 0 && p.cu_seqlens != nullptr && p.k_rows > 0 ? 1 : n;
}

// After the dk/dv kernel of a split launch: the reduce kernel.
template <class QSchedule, int kBlockN, int kDk, int kDv, class Element>
void launch_dkv_reduce(const AttnBwdParams& p, const AttnBwdWorkspace& w, cudaStream_t stream, const char* what) {
  if constexpr (QSchedule::kSplits) {
    if (w.dkv_slots == 0) return;
    const int64_t tiles = QSchedule::key_tiles(p);
    check_grid(tiles, p, p.num_seqs, what);
    NSA_LAUNCH(dim3(unsigned(tiles), unsigned(p.num_heads_kv), unsigned(p.num_seqs)), 256, 0, stream,
               attn_bwd_dkdv_reduce_kernel<kBlockN, kDk, kDv, Element, QSchedule>)(p, w);
    check_launch(what);
  }
}

// The dq or dk/dv launch of another kernel family (the Hopper one), or nullptr.
using BwdLauncher = void (*)(const AttnBwdParams&, const AttnBwdWorkspace&, cudaStream_t);

template <class Traits, class Schedule, class QSchedule>
void launch_attn_bwd(const AttnBwdParams& p, const AttnBwdWorkspace& ws, cudaStream_t stream,
                     const char* what, BwdLauncher dq_launcher = nullptr,
                     BwdLauncher dkv_launcher = nullptr) {
  using Element = typename Traits::Element;
  if (p.num_heads_kv == 0 || p.num_seqs == 0 || p.seqlen == 0) return;
  // Varlen: one more z slice zeroes the padding rows owned by no sequence.
  const int64_t z = p.num_seqs + (p.cu_seqlens != nullptr ? 1 : 0);

  if (p.delta_in == nullptr) {  // else ws.delta is the caller's
    const int64_t warps = p.seqlen * p.num_heads_q;
    const int64_t delta_blocks = (warps + 3) / 4;
    check_grid(delta_blocks, p, p.num_seqs, what);
    NSA_LAUNCH(dim3(unsigned(delta_blocks), 1, unsigned(p.num_seqs)), 128, 0, stream,
               attn_bwd_delta_kernel<Element, Traits::kDv>)(p, ws);
    check_launch(what);
  }

  if (dq_launcher != nullptr) {
    dq_launcher(p, ws, stream);
  } else {
    const int64_t m_blocks = (p.seqlen * p.group + Traits::kBlockM - 1) / Traits::kBlockM;
    check_grid(m_blocks, p, z, what);
    const int smem_dq = Traits::kSmemStreamTiles + Schedule::smem_bytes(p);
    auto dq_kernel = attn_bwd_dq_kernel<Traits, Schedule>;
    set_smem_limit(dq_kernel, smem_dq, what);
    NSA_LAUNCH(dim3(unsigned(m_blocks), unsigned(p.num_heads_kv), unsigned(z)), Traits::kThreads,
               smem_dq, stream, dq_kernel)(p, ws);
    check_launch(what);
  }

  if (dkv_launcher != nullptr) return dkv_launcher(p, ws, stream);
  AttnBwdWorkspace w = ws;
  const int64_t n_blocks = plan_dkv_split<QSchedule, Traits::kBlockN, Traits::kDk, Traits::kDv>(p, w, stream);
  if (n_blocks == 0) return;
  check_grid(n_blocks, p, z, what);
  const int smem_dkv = Traits::kSmemDkv;
  auto dkv_kernel = attn_bwd_dkdv_kernel<Traits, QSchedule>;
  set_smem_limit(dkv_kernel, smem_dkv, what);
  NSA_LAUNCH(dim3(unsigned(n_blocks), unsigned(p.num_heads_kv), unsigned(z)), Traits::kThreads,
             smem_dkv, stream, dkv_kernel)(p, w);
  check_launch(what);
  launch_dkv_reduce<QSchedule, Traits::kBlockN, Traits::kDk, Traits::kDv, Element>(p, w, stream, what);
}

template <int kDk, int kDv, DType kDType>
void run_attn_bwd(const AttnBwdParams& p, const AttnBwdWorkspace& ws, cudaStream_t stream) {
  using Traits = AttnBwdTraits<kDk, kDv, typename ElementOf<kDType>::type>;
  constexpr int kN = Traits::kBlockN;  // keys per dk/dv CTA
  constexpr int kS = Traits::kBlockS;  // keys per dq KV tile
  BwdLauncher dq_sm90 = nullptr, dkv_sm90 = nullptr;
#ifdef NSA_SM90A_BUILT
  if (use_sm90_kernels()) {
    dkv_sm90 = &run_attn_bwd_dkdv_sm90<kDk, kDv, kDType>;
    // Not the selected branch's dq: its CTA visits the union of its tokens' blocks
    // with a per-warp skip, as its forward does.
    if (p.branch != Branch::kSelected) dq_sm90 = &run_attn_bwd_dq_sm90<kDk, kDv, kDType>;
  }
#endif
  switch (p.branch) {
    case Branch::kCompressed:
      launch_attn_bwd<Traits, CompressedSchedule<kS>, CompressedQuerySchedule<kN>>(
          p, ws, stream, "compressed_attn_bwd", dq_sm90, dkv_sm90);
      break;
    case Branch::kSelected:
      launch_attn_bwd<Traits, SelectedSchedule<Traits::kBlockM, kS, Traits::kThreads>,
                      SelectedQuerySchedule<kN>>(p, ws, stream, "selected_attn_bwd", nullptr, dkv_sm90);
      break;
    case Branch::kWindow:
      launch_attn_bwd<Traits, WindowSchedule<kS>, WindowQuerySchedule<kN>>(p, ws, stream, "window_attn_bwd",
                                                                          dq_sm90, dkv_sm90);
      break;
  }
}

}  // namespace nsa::cuda
